"""Sequence parallelism's pieces that one process can check: the layout of the sequence chunks the
collectives move, what shard_model swaps in, and the dropout streams. What the sharded model
computes, against the full one, is checked over two ranks in test_tensor_parallel.py."""

import torch
import torch.nn as nn

from lm.config import ModelConfig
from lm.model import GPT
from lm.parallel import ParallelGroups, dropout_stream, shard_model
from lm.parallel.sequence import SequenceParallelNorm, SequenceSplit, chunks_first, chunks_joined


def test_chunk_r_of_the_sequence_is_entry_r_of_what_the_collectives_move():
    x = torch.randn(3, 8, 5)  # (B, T, C), split over 4 ranks along T
    stacked = chunks_first(x, 4)
    assert stacked.shape == (4, 3, 2, 5) and stacked.is_contiguous()
    for rank in range(4):
        assert torch.equal(stacked[rank], x[:, 2 * rank : 2 * rank + 2])
    assert torch.equal(chunks_joined(stacked), x)
    # what gloo gives and takes: the ranks' chunks concatenated along dim 0
    assert torch.equal(chunks_joined(stacked.flatten(0, 1).unflatten(0, (4, 3))), x)


def test_sequence_parallelism_swaps_the_norms_and_the_split_and_keeps_the_state_dict():
    config = ModelConfig(vocab_size=96, block_size=16, n_layer=2, n_head=4, n_embd=32, d_ff=64)
    groups = ParallelGroups(tp_size=2, tp_rank=1, tp_group=None, dp_size=1, dp_rank=0, dp_group=None)
    full = GPT(config)
    plain, split = shard_model(GPT(config), groups), shard_model(GPT(config), groups, sequence_parallel=True)
    assert isinstance(plain.sequence_split, nn.Identity) and isinstance(split.sequence_split, SequenceSplit)
    norms = [m for m in split.modules() if isinstance(m, SequenceParallelNorm)]
    assert len(norms) == 2 * config.n_layer + 1
    assert not any(isinstance(m, (nn.LayerNorm, nn.RMSNorm)) for m in split.modules())
    shapes = {name: value.shape for name, value in plain.state_dict().items()}
    assert {name: value.shape for name, value in split.state_dict().items()} == shapes
    assert list(split.state_dict()) == list(full.state_dict())


def test_each_rank_draws_its_own_dropout_stream_only_under_sequence_parallelism():
    layout = [ParallelGroups(2, rank % 2, None, 2, rank // 2, None) for rank in range(4)]  # TP2 x DP2
    assert [dropout_stream(g, False) for g in layout] == [0, 0, 1, 1]  # one per data-parallel rank
    assert [dropout_stream(g, True) for g in layout] == [0, 1, 2, 3]  # one per rank
