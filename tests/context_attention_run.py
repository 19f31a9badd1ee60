"""Context-parallel attention over a real process group against the one-process materialised reference,
on every rank (run by torchrun; used by test_context_attention.py).

    python -m torch.distributed.run --nproc_per_node N tests/context_attention_run.py OUT.json

Every rank draws the same whole sequence, computes the reference's output and its gradients for a
fixed upstream gradient, then runs ring_attention (its zigzag rows) or ulysses_attention (its
contiguous rows) on its own chunk: the worst relative error over the ranks of out, dq, dk and dv
against the reference's rows, whether dtypes were kept, and how many exchanges forward and
backward issued on each rank. With 4 ranks also the 2-rank groups {0, 2} and {1, 3}, whose group
ranks are not the global ones. And the messages ulysses refuses heads with. Rank 0 writes OUT.json.
"""

import json
import sys
from unittest import mock

import torch
import torch.distributed as dist

from lm.attention import (
    softmax_attention,
    softmax_attention_reference,
    twicing_attention_reference,
    twicing_attention_sdpa,
)
from lm.parallel.ring import zigzag_positions
from lm.parallel.ring_group import ring_attention
from lm.parallel.ulysses import ulysses_attention

B, C, D = 2, 8, 8  # batch, tokens a rank, head size
KINDS = {  # twicing?, the attention ulysses runs, the reference
    "softmax": (False, softmax_attention, softmax_attention_reference),
    "twicing": (True, twicing_attention_sdpa, twicing_attention_reference),
}


def rows(impl: str, n: int, r: int) -> torch.Tensor:
    return zigzag_positions(n * C, n)[r] if impl == "ring" else torch.arange(r * C, (r + 1) * C)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b).norm() / b.norm()).item()


def count_calls(name: str, calls: list):
    real = getattr(dist, name)
    return mock.patch.object(dist, name, lambda *a, **kw: calls.append(name) or real(*a, **kw))


def run_case(impl: str, kind: str, heads: int, kv_heads: int, dtype: torch.dtype, group) -> dict:
    n, r = dist.get_world_size(group), dist.get_rank(group)
    twice, attend, reference = KINDS[kind]
    g = torch.Generator().manual_seed(heads * 10 + kv_heads)  # the same sequence on every rank
    shapes = [(B, heads, n * C, D), (B, kv_heads, n * C, D), (B, kv_heads, n * C, D)]
    q, k, v = [torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True) for s in shapes]
    d_out = torch.randn(shapes[0], generator=g, dtype=torch.float64)
    out = reference(q, k, v)
    want = [out, *torch.autograd.grad(out, (q, k, v), d_out)]
    index = rows(impl, n, r)
    mine = [x.detach()[..., index, :].to(dtype).requires_grad_() for x in (q, k, v)]
    forward, backward = [], []
    exchange = "batch_isend_irecv" if impl == "ring" else "all_to_all_single"
    with count_calls(exchange, forward):
        got = ring_attention(*mine, group, twice) if impl == "ring" else ulysses_attention(*mine, group, attend)
    with count_calls(exchange, backward):
        got = [got, *torch.autograd.grad(got, mine, d_out[..., index, :].to(dtype))]
    errors = torch.tensor([relative(a, b[..., index, :]) for a, b in zip(got, want)])
    dist.all_reduce(errors, op=dist.ReduceOp.MAX, group=group)
    kept = torch.tensor([all(x.dtype == dtype for x in got)], dtype=torch.int32)
    dist.all_reduce(kept, op=dist.ReduceOp.MIN, group=group)
    return {
        **dict(zip(("out", "dq", "dk", "dv"), errors.tolist())),
        "dtypes_kept": bool(kept.item()),
        "exchanges": [len(forward), len(backward)],
        "group_size": n,
    }


def cases(n: int) -> dict:
    """name -> (impl, kind, heads, kv heads, dtype): float64 everywhere, and fp32/bf16 smoke tests."""
    heads = {"MHA": (4, 4), "GQA": (2 * n, n)}
    found = {}
    for impl in ("ring", "ulysses"):
        for kind in KINDS:
            for name, (h, h_kv) in heads.items():
                found[f"{impl} {kind} {name} {h}/{h_kv} float64"] = (impl, kind, h, h_kv, torch.float64)
            for dtype in (torch.float32, torch.bfloat16):
                found[f"{impl} {kind} GQA {2 * n}/{n} {str(dtype)[6:]}"] = (impl, kind, 2 * n, n, dtype)
        found[f"ring {kind} MQA 4/1 float64"] = ("ring", kind, 4, 1, torch.float64)  # ulysses cannot
    return found


def refusals(group) -> dict:
    n = dist.get_world_size(group)
    found = {}
    for h, h_kv in ((2 * n + 1, 1), (2 * n, 1)):
        q, kv = torch.zeros(1, h, C, D), torch.zeros(1, h_kv, C, D)
        try:
            ulysses_attention(q, kv, kv, group, softmax_attention)
        except ValueError as error:
            found[f"{h}/{h_kv}"] = str(error)
    return found


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    results = {name: run_case(*case, None) for name, case in cases(world).items()}
    if world == 4:  # two groups of 2, group rank 1 being global rank 2 or 3
        halves = [dist.new_group([0, 2]), dist.new_group([1, 3])]
        half = halves[rank % 2]
        for impl in ("ring", "ulysses"):
            results[f"{impl} twicing GQA 4/2 float64 in group {{{rank % 2}, {rank % 2 + 2}}}"] = run_case(
                impl, "twicing", 4, 2, torch.float64, half
            )
    refused = refusals(None)
    gathered = [None] * world
    dist.all_gather_object(gathered, results)
    if rank == 0:
        merged = {name: case for part in gathered for name, case in part.items()}  # both subgroups' cases
        with open(out_path, "w") as f:
            json.dump({"world": world, "cases": merged, "refused": refused}, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
