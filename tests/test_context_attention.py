"""Specification of context-parallel attention over a process group (lm.parallel.ring_group and
lm.parallel.ulysses): each rank's output and gradients are the matching rows of the materialised
attention of the whole sequence, for softmax and twicing, with and without grouped-query attention;
the rings make the hops the derivation counts; a group of one rank needs no process group at all."""

import json

import pytest
import torch
import torch.distributed as dist

from conftest import run_torchrun
from lm.attention import (
    softmax_attention,
    softmax_attention_reference,
    twicing_attention_reference,
    twicing_attention_sdpa,
)
from lm.parallel.ring_group import ring_attention
from lm.parallel.ulysses import ulysses_attention

FLOAT64_TOLERANCE = 1e-10
FP32_TOLERANCE = 1e-5
BF16_TOLERANCE = 2e-2  # measured: at most 6.4e-3 relative against float64, over 2 and 4 ranks


@pytest.fixture(scope="module", params=[2, 4], ids=["2 ranks", "4 ranks"])
def launch(request, tmp_path_factory) -> dict:
    """One torchrun of tests/context_attention_run.py per world size: every case's worst errors."""
    out = tmp_path_factory.mktemp("context-attention") / "results.json"
    result = run_torchrun(request.param, "context_attention_run.py", str(out), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


def errors(case: dict) -> float:
    return max(case[name] for name in ("out", "dq", "dk", "dv"))


@pytest.mark.slow
def test_every_rank_gets_the_materialised_rows_and_their_gradients_in_float64(launch):
    cases = {name: case for name, case in launch["cases"].items() if name.endswith("float64") or "in group" in name}
    n = launch["world"]
    for impl in ("ring", "ulysses"):
        for kind in ("softmax", "twicing"):
            assert f"{impl} {kind} MHA 4/4 float64" in cases and f"{impl} {kind} GQA {2 * n}/{n} float64" in cases
    assert "ring twicing MQA 4/1 float64" in cases
    if n == 4:  # groups whose ranks are not the global ones, where p2p must map one to the other
        assert sum("in group" in name for name in cases) == 4
    for name, case in cases.items():
        assert errors(case) <= FLOAT64_TOLERANCE, (name, case)
        assert case["dtypes_kept"], name


@pytest.mark.slow
def test_fp32_and_bf16_keep_their_dtype_and_come_close(launch):
    cases = {name: case for name, case in launch["cases"].items() if name.endswith(("float32", "bfloat16"))}
    assert len(cases) == 2 * 2 * 2  # ring and ulysses, softmax and twicing, two dtypes
    for name, case in cases.items():
        assert errors(case) <= (FP32_TOLERANCE if name.endswith("float32") else BF16_TOLERANCE), (name, case)
        assert case["dtypes_kept"], name


@pytest.mark.slow
def test_each_ring_makes_n_minus_1_hops_and_its_backward_n_more_for_the_accumulators(launch):
    for name, case in launch["cases"].items():
        n, rings = case["group_size"], 2 if " twicing " in name else 1
        if name.startswith("ring"):
            assert case["exchanges"] == [rings * (n - 1), rings * (2 * n - 1)], name
        else:  # one all-to-all in, one back, however many passes `attend` makes
            assert case["exchanges"] == [2, 2], name


@pytest.mark.slow
def test_ulysses_refuses_heads_that_the_group_size_does_not_divide(launch):
    n = launch["world"]
    refused = launch["refused"]
    assert sorted(refused) == sorted([f"{2 * n + 1}/1", f"{2 * n}/1"])
    assert refused[f"{2 * n}/1"] == (
        f"all-to-all context parallelism over {n} ranks needs query heads ({2 * n}) and kv heads (1) divisible by {n}"
    )


# --------------------------------------------------------------------------- a group of one rank


@pytest.fixture
def one_rank_world(monkeypatch):
    """A gloo world of this process alone, for the test's duration."""
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


def compare_on_one_rank(group):
    g = torch.Generator().manual_seed(0)
    shapes = [(2, 4, 7, 8), (2, 2, 7, 8), (2, 2, 7, 8)]  # GQA, and an odd length: no zigzag for one rank
    q, k, v = [torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True) for s in shapes]
    d_out = torch.randn(shapes[0], generator=g, dtype=torch.float64)
    runs = {
        "ring softmax": (lambda *x: ring_attention(*x, group, False), softmax_attention_reference),
        "ring twicing": (lambda *x: ring_attention(*x, group, True), twicing_attention_reference),
        "ulysses softmax": (lambda *x: ulysses_attention(*x, group, softmax_attention), softmax_attention_reference),
        "ulysses twicing": (
            lambda *x: ulysses_attention(*x, group, twicing_attention_sdpa),
            twicing_attention_reference,
        ),
    }
    for name, (fn, reference) in runs.items():
        got, want = fn(q, k, v), reference(q, k, v)
        got = [got, *torch.autograd.grad(got, (q, k, v), d_out)]
        want = [want, *torch.autograd.grad(want, (q, k, v), d_out)]
        assert max((a - b).abs().max().item() for a, b in zip(got, want)) < FLOAT64_TOLERANCE, name


def test_a_group_of_one_rank_is_plain_attention(one_rank_world):
    compare_on_one_rank(one_rank_world)


def test_without_any_process_group_the_default_group_is_one_rank():
    assert not dist.is_initialized(), "an earlier test left a process group behind"
    compare_on_one_rank(None)
