"""Window sampling: which tokens a training or evaluation step sees."""

import numpy as np
import pytest
import torch

from core.errors import UserError
from lm.data import WindowBatches, eval_windows, rank_rows, split_among_ranks

SEQ = 4


def shards(*sizes):
    """Token arrays whose values are unique (shard * 1000 + position), to trace windows."""
    return [np.arange(n, dtype=np.uint16) + 1000 * i for i, n in enumerate(sizes)]


def test_shard_of_n_tokens_gives_floor_n_minus_1_over_seq_len_windows():
    # (9-1)//4 = 2, (8-1)//4 = 1, (5-1)//4 = 1, (4-1)//4 = 0
    assert WindowBatches(shards(9, 8, 5, 4), SEQ, 1, seed=0).num_windows == 4


def test_windows_are_seq_len_plus_one_tokens_and_never_cross_shards():
    data = WindowBatches(shards(9, 3, 6), SEQ, 1, seed=0)
    windows = [data.window(i).tolist() for i in range(data.num_windows)]
    assert windows == [[0, 1, 2, 3, 4], [4, 5, 6, 7, 8], [2000, 2001, 2002, 2003, 2004]]


def test_batches_are_int64_of_shape_batch_by_seq_len_plus_one():
    batch = WindowBatches(shards(100), SEQ, 3, seed=0).global_batch(0)
    assert batch.dtype == torch.int64 and batch.shape == (3, SEQ + 1)


def test_same_seed_gives_same_batches_and_another_seed_different_ones():
    a = WindowBatches(shards(400, 300), SEQ, 8, seed=1)
    b = WindowBatches(shards(400, 300), SEQ, 8, seed=1)
    c = WindowBatches(shards(400, 300), SEQ, 8, seed=2)
    assert all(torch.equal(a.global_batch(k), b.global_batch(k)) for k in range(5))
    assert not all(torch.equal(a.global_batch(k), c.global_batch(k)) for k in range(5))


def test_batch_k_is_a_pure_function_of_seed_and_k():
    data = WindowBatches(shards(400, 300), SEQ, 8, seed=3)
    in_order = [data.global_batch(k) for k in range(30)]
    fresh = WindowBatches(shards(400, 300), SEQ, 8, seed=3)
    for k in [29, 3, 17, 0, 17, 12]:  # jumping around, across epochs, as a resume would
        assert torch.equal(fresh.global_batch(k), in_order[k])


def test_an_epoch_visits_each_window_once_and_drops_the_remainder():
    data = WindowBatches(shards(41), SEQ, 3, seed=0)  # 10 windows -> 3 batches, 1 dropped
    assert data.batches_per_epoch == 3
    firsts = torch.cat([data.global_batch(k) for k in range(3)])[:, 0].tolist()
    assert len(set(firsts)) == 9 and set(firsts) <= set(range(0, 40, SEQ))


def test_batches_wrap_into_a_freshly_shuffled_next_epoch():
    data = WindowBatches(shards(41), SEQ, 3, seed=0)
    epoch0 = torch.cat([data.global_batch(k) for k in range(0, 3)])
    epoch1 = torch.cat([data.global_batch(k) for k in range(3, 6)])
    assert data.epoch_of(2) == 0 and data.epoch_of(3) == 1
    assert not torch.equal(epoch0, epoch1)
    assert len(set(epoch1[:, 0].tolist())) == 9


def test_too_few_windows_for_one_batch_is_a_user_error_naming_the_numbers():
    expected = "only 2 windows.*batch of 4.*smaller batch size or seq_len"
    with pytest.raises(UserError, match=expected):
        WindowBatches(shards(9), SEQ, 4, seed=0)


def test_ranks_rows_of_a_global_batch_are_disjoint_and_cover_it():
    world, micro = 3, 2
    batch = WindowBatches(shards(500), SEQ, 12, seed=0).global_batch(0)
    accum = 12 // (world * micro)
    assert accum == 2
    rows = [rank_rows(batch, r, world, micro, m) for m in range(accum) for r in range(world)]
    firsts = torch.cat(rows)[:, 0].tolist()
    assert sorted(firsts) == sorted(batch[:, 0].tolist()) and len(set(firsts)) == 12


def test_rank_rows_match_a_single_process_with_world_times_the_accumulation():
    world, micro = 2, 3
    batch = WindowBatches(shards(500), SEQ, 12, seed=0).global_batch(5)
    single = [rank_rows(batch, 0, 1, micro, m) for m in range(12 // micro)]
    for m in range(12 // (world * micro)):
        for r in range(world):
            assert torch.equal(rank_rows(batch, r, world, micro, m), single[m * world + r])


def test_batch_that_does_not_divide_among_ranks_is_refused():
    batch = WindowBatches(shards(500), SEQ, 10, seed=0).global_batch(0)
    with pytest.raises(ValueError, match="does not split"):
        rank_rows(batch, 0, 4, 2, 0)


def test_eval_windows_are_in_shard_order_and_capped():
    windows = eval_windows(shards(9, 6), SEQ, max_windows=None)
    assert [w[0].item() for w in windows] == [0, 4, 1000]
    assert all(w.dtype == torch.int64 and w.shape == (SEQ + 1,) for w in windows)
    assert [w[0].item() for w in eval_windows(shards(9, 6), SEQ, max_windows=2)] == [0, 4]


def test_eval_on_too_little_data_is_a_user_error():
    with pytest.raises(UserError, match="too few"):
        eval_windows(shards(4), SEQ, None)


def test_split_among_ranks_is_strided_and_covers_everything():
    parts = [split_among_ranks(list(range(7)), r, 3) for r in range(3)]
    assert parts == [[0, 3, 6], [1, 4], [2, 5]]
