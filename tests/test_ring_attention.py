"""Specification of ring attention (lm.parallel.ring), in one process and float64: softmax and twicing
over chunks with any boundaries give the materialised attention's output and gradients; every score
block is one chunk pair; masked blocks are skipped and masked rows weigh nothing; zigzag chunking
balances the causal work."""

import pytest
import torch

from lm.attention import causal_attention_matrix, softmax_attention_reference, twicing_attention_reference
from lm.parallel import ring
from lm.parallel.ring import (
    attend_block,
    attend_block_backward,
    block_scores,
    merge_block,
    reattend_block,
    ring_softmax_attention,
    ring_twicing_attention,
    split_chunks,
    zigzag_merge,
    zigzag_positions,
    zigzag_split,
)
from tensor_probes import LargestTensorSeen

TOLERANCE = 1e-10
B, D = 2, 8


def contiguous(*sizes: int) -> list[torch.Tensor]:
    return list(torch.arange(sum(sizes)).split(list(sizes)))


SPLITS = {  # each rank's global positions
    "contiguous 5+3+5": contiguous(5, 3, 5),
    "uneven 1+7+3": contiguous(1, 7, 3),
    "strided over 3": [torch.arange(r, 13, 3) for r in range(3)],  # every block partly masked
    "scrambled 4+6+3": list(torch.randperm(13, generator=torch.Generator().manual_seed(1)).split([4, 6, 3])),
    "zigzag N=2": zigzag_positions(12, 2),
    "zigzag N=3": zigzag_positions(18, 3),
    "one rank": contiguous(9),
}
HEADS = {"MHA 4/4": (4, 4), "GQA 4/2": (4, 2), "MQA 4/1": (4, 1)}
KINDS = {
    "softmax": (ring_softmax_attention, softmax_attention_reference),
    "twicing": (ring_twicing_attention, twicing_attention_reference),
}


def random_qkv(t: int, heads: int = 4, kv_heads: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(B, heads, t, D), (B, kv_heads, t, D), (B, kv_heads, t, D)]
    return [torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True) for s in shapes]


def output_and_grads(fn, q, k, v, d_out):
    out = fn(q, k, v)
    return [out, *torch.autograd.grad(out, (q, k, v), d_out)]


def max_error(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


# --------------------------------------------------------------------------- against the reference


# Every split with one kv head per query head and with groups of two; one kv head for all on two splits.
CASES = [(s, h) for s in SPLITS for h in ("MHA 4/4", "GQA 4/2")] + [
    ("zigzag N=3", "MQA 4/1"),
    ("scrambled 4+6+3", "MQA 4/1"),
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("split, heads", CASES)
def test_ring_gives_the_materialised_output_and_gradients(split, heads, kind):
    positions = SPLITS[split]
    t = sum(len(p) for p in positions)
    q, k, v = random_qkv(t, *HEADS[heads])
    d_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ring_fn, reference = KINDS[kind]
    got = output_and_grads(lambda *x: ring_fn(*x, positions), q, k, v, d_out)
    want = output_and_grads(reference, q, k, v, d_out)
    assert max_error(got, want) < TOLERANCE  # out, dQ, dK, dV


def test_twicing_ring_is_two_a_minus_a_squared_times_v():
    # Stated as the paper writes it, independently of lm.attention's reference function.
    q, k, v = random_qkv(13)
    a = causal_attention_matrix(q, k)
    out = ring_twicing_attention(q, k, v, SPLITS["contiguous 5+3+5"])
    assert (out - (2 * a - a @ a) @ v).abs().max() < TOLERANCE


# --------------------------------------------------------------------------- blocks and masks


def test_no_score_block_is_larger_than_one_chunk_pair(monkeypatch):
    positions = SPLITS["contiguous 5+3+5"]
    shapes = []

    def recording(q, k, q_pos, k_pos):
        s = block_scores(q, k, q_pos, k_pos)
        assert s.shape[-2:] == (len(q_pos), len(k_pos))
        shapes.append(s.shape[-2:])
        return s

    monkeypatch.setattr(ring, "block_scores", recording)
    q, k, v = random_qkv(13, 4, 2)
    with LargestTensorSeen() as seen:
        out = ring_twicing_attention(q, k, v, positions)
        out.backward(torch.ones_like(out))
    assert shapes and max(a * b for a, b in shapes) == 5 * 5
    assert seen.largest < B * 4 * 13 * 13  # nothing of any op is as large as one T x T matrix per head


def count_blocks(monkeypatch, fn, positions) -> int:
    calls = []
    monkeypatch.setattr(ring, "block_scores", lambda *a: calls.append(1) or block_scores(*a))
    t = sum(len(p) for p in positions)
    fn(*random_qkv(t), positions)
    return len(calls)


def test_blocks_entirely_in_the_future_are_skipped(monkeypatch):
    contiguous_split = SPLITS["contiguous 5+3+5"]  # rank i sees chunks j <= i: 6 of 9 pairs
    assert count_blocks(monkeypatch, ring_softmax_attention, contiguous_split) == 6
    assert count_blocks(monkeypatch, ring_twicing_attention, contiguous_split) == 2 * 6
    # Under zigzag every rank holds an early and a late piece, so no pair of chunks is all masked.
    assert count_blocks(monkeypatch, ring_twicing_attention, SPLITS["zigzag N=3"]) == 2 * 9


def test_a_block_in_the_future_gives_nothing():
    q, k, v = random_qkv(8)
    q_pos, k_pos = torch.arange(4), torch.arange(4, 8)
    lse = torch.zeros(B, 4, 4, dtype=torch.float64)
    assert attend_block(q[..., :4, :], k[..., 4:, :], v[..., 4:, :], q_pos, k_pos) is None
    assert reattend_block(q[..., :4, :], k[..., 4:, :], v[..., 4:, :], q_pos, k_pos, lse) is None
    args = q[..., :4, :], k[..., 4:, :], v[..., 4:, :], q_pos, k_pos, lse, q[..., :4, :], lse
    assert attend_block_backward(*args) is None


def test_keys_all_in_the_past_are_unmasked_and_the_diagonal_block_is_causal():
    q, k, _ = random_qkv(8)
    past = block_scores(q[..., 4:, :], k[..., :4, :], torch.arange(4, 8), torch.arange(4))
    assert torch.isfinite(past).all()
    diagonal = block_scores(q, k, torch.arange(8), torch.arange(8))
    assert torch.equal(torch.isinf(diagonal[0, 0, 0]), torch.ones(8, 8, dtype=torch.bool).triu(1))


def test_a_row_that_sees_no_key_of_a_block_weighs_nothing():
    # Zigzag-like query chunk: rows at 0, 1 are before every key at 4..7, rows at 10, 11 after them all.
    q, k, v = random_qkv(12, 1, 1)
    q_pos, k_pos = torch.tensor([0, 1, 10, 11]), torch.arange(4, 8)
    out, lse = attend_block(q[..., q_pos, :], k[..., k_pos, :], v[..., k_pos, :], q_pos, k_pos)
    assert torch.equal(lse[..., :2], torch.full_like(lse[..., :2], float("-inf")))
    assert torch.equal(out[..., :2, :], torch.zeros_like(out[..., :2, :]))
    seen = (q[..., [10, 11], :] @ k[..., k_pos, :].transpose(-2, -1) / D**0.5).softmax(-1) @ v[..., k_pos, :]
    assert (out[..., 2:, :] - seen).abs().max() < TOLERANCE
    # Merged into a ring's start (nothing seen yet), then with itself: no NaN anywhere.
    start = torch.zeros_like(out), torch.full_like(lse, float("-inf"))
    merged, merged_lse = merge_block(*start, out, lse)
    assert torch.equal(merged, out) and torch.equal(merged_lse, lse)
    twice, _ = merge_block(merged, merged_lse, out, lse)
    assert not twice.isnan().any() and (twice - out).abs().max() < TOLERANCE


def test_ring_2s_blocks_normalised_by_ring_1s_lse_are_the_rows_of_a():
    # Every row of A sums to one: with W = 1, the second pass's blocks must add up to exactly that.
    positions = SPLITS["strided over 3"]
    q, k, v = (x.detach() for x in random_qkv(13, 4, 2))
    qs, ks, vs = (split_chunks(x, positions) for x in (q, k, v))
    _, lses = ring._ring_attend(qs, ks, vs, positions)
    for i, q_i in enumerate(qs):
        parts = [
            reattend_block(q_i, ks[j], torch.ones_like(qs[j]), positions[i], positions[j], lses[i]) for j in range(3)
        ]
        row_sums = sum(p for p in parts if p is not None)
        assert (row_sums - 1).abs().max() < TOLERANCE


def test_positions_must_cover_the_sequence_once():
    q, k, v = random_qkv(6)
    with pytest.raises(ValueError, match="cover 0..5 once"):
        ring_twicing_attention(q, k, v, [torch.arange(4), torch.arange(3, 6)])


# --------------------------------------------------------------------------- zigzag chunking


def test_zigzag_gives_rank_r_pieces_r_and_2n_minus_1_minus_r():
    assert [p.tolist() for p in zigzag_positions(8, 2)] == [[0, 1, 6, 7], [2, 3, 4, 5]]
    assert [p.tolist() for p in zigzag_positions(12, 3)] == [[0, 1, 10, 11], [2, 3, 8, 9], [4, 5, 6, 7]]


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_zigzag_merge_inverts_zigzag_split(n):
    x = torch.randn(2, 3, 24, 5)
    chunks = zigzag_split(x, n)
    assert [c.size(-2) for c in chunks] == [24 // n] * n
    assert torch.equal(zigzag_merge(chunks), x)


def causal_work(q_pos: torch.Tensor) -> int:
    """Visible (query, key) pairs of a query chunk over the whole sequence: query p sees p + 1 keys."""
    return int((q_pos + 1).sum())


@pytest.mark.parametrize("n", [2, 3, 4])
def test_zigzag_gives_every_rank_the_same_causal_work(n):
    assert len({causal_work(p) for p in zigzag_positions(8 * n, n)}) == 1
    assert len({causal_work(p) for p in contiguous(*[8] * n)}) == n  # what zigzag is for


@pytest.mark.parametrize("n", [2, 3])
def test_zigzag_ranks_compute_equal_score_blocks(monkeypatch, n):
    # Each rank's scores of one ring: C x C on the diagonal, C x C/2 for each of the n - 1 others.
    c = 4  # tokens a rank
    positions = zigzag_positions(c * n, n)
    rank_of = {int(p): r for r, ps in enumerate(positions) for p in ps}
    work = [0] * n

    def recording(q, k, q_pos, k_pos):
        work[rank_of[int(q_pos[0])]] += len(q_pos) * len(k_pos)
        return block_scores(q, k, q_pos, k_pos)

    monkeypatch.setattr(ring, "block_scores", recording)
    ring_softmax_attention(*random_qkv(c * n), positions)
    assert work == [c * c + (n - 1) * c * c // 2] * n


def test_zigzag_refuses_a_length_not_divisible_by_2n():
    with pytest.raises(ValueError, match="divisible by 6, not 15"):
        zigzag_positions(15, 3)
