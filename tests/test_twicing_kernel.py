"""Specification of the fused Triton twicing kernel (lm.kernels.twicing_triton).

On a CPU the kernel runs under Triton's interpreter (TRITON_INTERPRET=1, which conftest.py sets
before anything imports Triton: Triton reads it as its own library is defined), in fp32 and fp16;
on a GPU (benchmarks/gpu_check.sh runs this file) the same tests run compiled in bf16 and fp16,
which is all the kernel takes there (fp32 goes to two SDPA passes), plus the long-sequence cases
that only a GPU makes affordable.
"""

import dataclasses
import importlib

import pytest
import torch

from conftest import relative_error
from lm.attention import (
    softmax_attention_reference,
    twicing_attention,
    twicing_attention_reference,
    twicing_attention_sdpa,
)
from tensor_probes import CopiesOf, LargestTensorSeen

pytest.importorskip("triton")  # scripts/bootstrap.sh installs it; only a bare environment lacks it
GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
# What the kernel computes in here: fp32 in the interpreter; on a GPU half precision, the only
# precision it takes there, held to the two SDPA passes' own error where float64 is the reference.
DTYPE = torch.bfloat16 if GPU else torch.float32
TOLERANCE = 2e-2 if GPU else 1e-5
HD = 64 if GPU else 16  # a head size for the tests of plumbing: the smallest the kernel takes here


@pytest.fixture(scope="module")
def kernel():
    module = importlib.import_module("lm.kernels.twicing_triton")
    assert GPU or module.INTERPRETED, "on a CPU the kernel can only run under Triton's interpreter"
    # One tile shape per kernel: autotuning would compile every shape for every head size and
    # dtype here (minutes on a fresh GPU machine); the tile-shape test covers the others.
    saved = {fn: fn.configs for fn in module.QUERY_MAJOR_KERNELS + module.KEY_MAJOR_KERNELS}
    for fn, configs in saved.items():
        fn.configs = configs[:1]
    yield module
    for fn, configs in saved.items():
        fn.configs = configs


def random_qkv(b, h, t, d, seed=0, dtype=torch.float64, kv_heads=None):
    """q with h heads; k and v with kv_heads (grouped-query attention), h if not given."""
    g = torch.Generator().manual_seed(seed)
    heads = [h, kv_heads or h, kv_heads or h]
    return [torch.randn(b, n, t, d, generator=g, dtype=dtype) for n in heads]


def with_kv_repeated(fn, group):
    """fn on k and v repeated to one head per query head: the grouped-query meaning (tests only)."""
    return lambda q, k, v: fn(q, k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1))


def fused_qkv_views(b, t, h, kv_heads, d, requires_grad=False):
    """q, k, v as the model makes them: split from one projection, heads transposed (strided)."""
    qkv = torch.randn(b, t, (h + 2 * kv_heads) * d, generator=torch.Generator().manual_seed(3)).to(DEVICE, DTYPE)
    qkv.requires_grad_(requires_grad)
    sizes, heads = [h * d, kv_heads * d, kv_heads * d], [h, kv_heads, kv_heads]
    return [x.view(b, t, n, d).transpose(1, 2) for x, n in zip(qkv.split(sizes, dim=2), heads)]


def output_and_grads(fn, q, k, v, dout):
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v)
    return [out.detach(), *torch.autograd.grad(out, (q, k, v), dout)]


SHAPES = [(1, 1, 1, 16), (2, 3, 40, 16), (1, 2, 77, 64), (1, 1, 33, 128)]
if GPU:
    SHAPES += [(2, 4, 1024, 64)]


@pytest.fixture(params=["atomic dq", "deterministic"])
def dq_mode(request):
    """The backward adds dQ atomically unless PyTorch is asked for deterministic algorithms."""
    saved = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(request.param == "deterministic")
    yield request.param
    torch.use_deterministic_algorithms(saved)


if GPU:  # the head sizes the compiled kernel takes
    SHAPES = [(1, 1, 1, 64), (2, 3, 40, 64), (1, 2, 77, 64), (1, 1, 33, 128), (2, 4, 1024, 64), (1, 2, 1000, 128)]


@pytest.mark.parametrize("b,h,t,d", SHAPES)
def test_output_and_gradients_equal_the_materialised_float64_reference(kernel, dq_mode, b, h, t, d):
    q, k, v = random_qkv(b, h, t, d, seed=t)
    dout = torch.randn(b, h, t, d, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    exact = output_and_grads(twicing_attention_reference, q, k, v, dout)
    fused = output_and_grads(kernel.twicing_attention_triton, *(x.to(DEVICE, DTYPE) for x in (q, k, v, dout)))
    two_pass = output_and_grads(twicing_attention_sdpa, *(x.to(DEVICE, DTYPE) for x in (q, k, v, dout)))
    for name, got, sdpa, want in zip(["out", "dq", "dk", "dv"], fused, two_pass, exact):
        error = (got.double().cpu() - want).norm()
        if GPU:  # no worse than the two SDPA passes in the same precision, give or take
            assert error <= 1.5 * (sdpa.double().cpu() - want).norm() + 1e-3 * want.norm() + 1e-3, name
        else:
            assert error <= 1e-5 * want.norm() + 1e-7, name  # dq and dk are exactly zero at T = 1


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("shape", range(4))
def test_every_tile_shape_the_gpu_may_pick_gives_the_same_result(kernel, dq_mode, monkeypatch, shape, d):
    """The autotuner chooses among these on a GPU; here each one runs (in the interpreter on a CPU).
    Every program gets its shape number `shape` for head size d (its last one where it has fewer)."""
    if GPU and dq_mode == "deterministic":
        pytest.skip("on a GPU, compile time goes to the atomic path; the CPU run covers every shape in both modes")
    shapes = [kernel.SHAPES[fn.fn.__name__][d] for fn in kernel.QUERY_MAJOR_KERNELS + kernel.KEY_MAJOR_KERNELS]
    if d == 128 and (shape >= max(map(len, shapes)) or dq_mode == "deterministic"):
        pytest.skip(f"head size {d} has fewer shapes; its deterministic dQ is in the float64 reference test")
    for fn, choices in zip(kernel.QUERY_MAJOR_KERNELS + kernel.KEY_MAJOR_KERNELS, shapes):
        monkeypatch.setattr(fn, "configs", kernel.tile_configs([choices[min(shape, len(choices) - 1)]]))
    q, k, v = random_qkv(1, 2, 200, d, seed=shape)  # several blocks of every size, the last one ragged
    dout = torch.randn(q.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    exact = output_and_grads(twicing_attention_reference, q, k, v, dout)
    fused = output_and_grads(kernel.twicing_attention_triton, *(x.to(DEVICE, DTYPE) for x in (q, k, v, dout)))
    for name, got, want in zip(["out", "dq", "dk", "dv"], fused, exact):
        assert relative_error(got.double().cpu(), want) <= TOLERANCE, name


# Grouped-query attention: 8 query heads over 2 kv heads, and multi-query (4 over 1). T = 40 and 33
# leave the last block of every tiling ragged; two configurations keep the interpreter's time small.
GQA_SHAPES = [(1, 8, 2, 40, 16), (2, 4, 1, 33, 32)]
if GPU:
    GQA_SHAPES = [(1, 8, 2, 40, 64), (2, 4, 1, 33, 128)]


@pytest.mark.parametrize("b,h,kv_heads,t,d", GQA_SHAPES)
def test_grouped_query_attention_equals_the_reference_on_repeated_kv_heads(kernel, dq_mode, b, h, kv_heads, t, d):
    """Query head i attends with kv head i // (h / kv_heads); a kv head's dK and dV sum over its group."""
    q, k, v = random_qkv(b, h, t, d, seed=t, kv_heads=kv_heads)
    dout = torch.randn(q.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    group = h // kv_heads
    exact = output_and_grads(with_kv_repeated(twicing_attention_reference, group), q, k, v, dout)
    exact.append(with_kv_repeated(softmax_attention_reference, group)(q, k, v))  # U = A V
    q, k, v, dout = (x.to(DEVICE, DTYPE) for x in (q, k, v, dout))
    fused = output_and_grads(kernel.twicing_attention_triton, q, k, v, dout)
    fused.append(kernel.twicing_attention_and_u(q, k, v)[1])
    assert [x.shape for x in fused] == [q.shape, q.shape, k.shape, v.shape, q.shape]
    for name, got, want in zip(["out", "dq", "dk", "dv", "U"], fused, exact):
        assert relative_error(got.double().cpu(), want) <= TOLERANCE, name


def test_reads_grouped_kv_heads_in_place_never_expanding_them(kernel, dq_mode):
    """Forward and backward make nothing from K or V larger than K (no per-query-head copies).

    Called below the custom op, whose inner aten ops a dispatch mode would not otherwise see. Under
    the interpreter the only ones are its launches' host copies of each storage (as bytes)."""
    q, k, v = (x.to(DEVICE, DTYPE) for x in random_qkv(1, 4, 16, HD, kv_heads=1))
    with CopiesOf(k, v) as copies:
        out, u, lse = kernel._forward(q, k, v)
        kernel._backward(q, k, v, u, out, lse, torch.ones_like(q))
    assert copies.largest <= k.numel() * k.element_size() < q.numel() * q.element_size()


# Triton's interpreter (3.9) gets bf16 matmuls wrong, so on a CPU half precision is checked in fp16.
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16] if GPU else [torch.float16])
def test_half_precision_is_as_accurate_as_the_two_sdpa_passes(kernel, dq_mode, dtype):
    q, k, v = random_qkv(2, 4, 1024, 64) if GPU else random_qkv(1, 2, 96, 64)
    dout = torch.randn(q.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    exact = output_and_grads(twicing_attention_reference, q, k, v, dout)
    fused = output_and_grads(kernel.twicing_attention_triton, *(x.to(DEVICE, dtype) for x in (q, k, v, dout)))
    two_pass = output_and_grads(twicing_attention_sdpa, *(x.to(DEVICE, dtype) for x in (q, k, v, dout)))
    for name, got, sdpa, want in zip(["out", "dq", "dk", "dv"], fused, two_pass, exact):
        # No worse than the two SDPA passes it replaces, give or take a different summation order.
        assert relative_error(got.double().cpu(), want) <= 1.5 * relative_error(sdpa.double().cpu(), want) + 1e-3, name


@pytest.mark.parametrize("kv_heads", [2, 1], ids=["as many kv heads", "multi-query"])
def test_takes_the_strided_views_the_model_makes(kernel, kv_heads):
    """The model splits one qkv projection and transposes heads: no copies needed, same result."""
    q, k, v = fused_qkv_views(2, 24, 2, kv_heads, HD)
    assert not q.is_contiguous() and kernel.supports(q, k, v)
    strided = kernel.twicing_attention_triton(q, k, v)
    contiguous = kernel.twicing_attention_triton(q.contiguous(), k.contiguous(), v.contiguous())
    assert torch.equal(strided, contiguous)


def test_agrees_with_the_two_sdpa_passes_it_replaces(kernel):
    q, k, v = (x.to(DEVICE, DTYPE) for x in random_qkv(1, 2, 48, HD, seed=5))
    assert relative_error(kernel.twicing_attention_triton(q, k, v), twicing_attention_sdpa(q, k, v)) <= TOLERANCE


def test_saves_no_t_by_t_tensor_for_backward(kernel):
    t, d = 64, HD
    q, k, v = (x.to(DEVICE, DTYPE).requires_grad_() for x in random_qkv(1, 1, t, d))
    with LargestTensorSeen() as seen:
        kernel.twicing_attention_triton(q, k, v).sum().backward()
    assert seen.largest <= t * d < t * t


@pytest.mark.parametrize("kv_heads", [2, 1], ids=["as many kv heads", "multi-query"])
def test_declares_to_the_compiler_the_layouts_it_returns(kernel, kv_heads):
    """torch.compile plans with the fake (meta) outputs, so their shapes and strides must be the real ones."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, k, v = fused_qkv_views(2, 24, 2, kv_heads, HD, requires_grad=True)  # strided, as in the model
    out, u, lse = kernel._twicing_op(q, k, v)
    grads = kernel._twicing_backward_op(q, k, v, u, out, lse, torch.randn_like(out))
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(x) for x in (q, k, v)]
        fake_out = kernel._twicing_op(*fake)
        fake_grads = kernel._twicing_backward_op(*fake, *fake_out, mode.from_tensor(out))
    for real, declared in zip([out, u, lse, *grads], [*fake_out, *fake_grads]):
        assert (real.shape, real.stride(), real.dtype) == (declared.shape, declared.stride(), declared.dtype)


def test_compiles_as_one_opaque_differentiable_op(kernel):
    q, k, v = (x.to(DEVICE, DTYPE).requires_grad_() for x in random_qkv(1, 2, 32, HD, seed=9))
    compiled = torch.compile(kernel.twicing_attention_triton, backend="aot_eager", fullgraph=True)  # no graph break
    out = compiled(q, k, v)
    out.square().sum().backward()
    eager = output_and_grads(kernel.twicing_attention_triton, q, k, v, 2 * out.detach())
    assert torch.equal(out.detach(), eager[0])
    assert all(torch.allclose(x.grad, g, rtol=0, atol=1e-6) for x, g in zip((q, k, v), eager[1:]))


def test_declines_inputs_it_does_not_handle(kernel):
    q, k, v = (x.to(DEVICE, DTYPE) for x in random_qkv(1, 1, 8, 24))  # head_dim 24: not a power of two
    assert not kernel.supports(q, k, v)
    q, k, v = (x.to(DEVICE, DTYPE) for x in random_qkv(1, 1, 8, HD))
    assert not kernel.supports(q, k[..., :4, :], v)  # keys of another length (cross attention)
    assert not kernel.supports(q.double(), k.double(), v.double())


def test_takes_grouped_kv_heads_only_when_they_divide_the_query_heads(kernel):
    q = torch.randn(2, 6, 8, HD).to(DEVICE, DTYPE)

    def kv(b=2, heads=3, t=8):
        return torch.randn(b, heads, t, HD).to(DEVICE, DTYPE)

    assert kernel.supports(q, kv(), kv()) and kernel.supports(q, kv(heads=1), kv(heads=1))  # groups of 2; of 6
    assert not kernel.supports(q, kv(heads=4), kv(heads=4))  # 6 query heads do not split into 4 groups
    assert not kernel.supports(q, kv(heads=12), kv(heads=12))  # more kv heads than query heads
    assert not kernel.supports(q, kv(heads=3), kv(heads=1))  # k and v with different heads
    assert not kernel.supports(q, kv(b=1), kv(b=1))  # another batch
    assert not kernel.supports(q, kv(t=4), kv(t=4))  # another length, as before


@pytest.mark.parametrize("recorded_faster", [False, True])
def test_attention_impl_triton_uses_it_on_a_gpu_and_fused_only_where_recorded_faster(
    kernel, monkeypatch, recorded_faster
):
    from lm import attention

    calls = []
    monkeypatch.setattr(kernel, "twicing_attention_triton", lambda *a: calls.append(1) or twicing_attention_sdpa(*a))
    monkeypatch.setattr(attention, "_FASTEST", {(0, HD): recorded_faster})  # as if read from the record
    q, k, v = (x.to(DEVICE, DTYPE) for x in random_qkv(1, 2, 16, HD))
    attention.twicing_attention_kernel(q, k, v)
    assert calls == ([1] if GPU else [])  # `triton`: the kernel wherever it takes the inputs
    calls.clear()
    twicing_attention(q, k, v)
    assert calls == ([1] if GPU and recorded_faster else [])  # `fused`: only where measured faster
    calls.clear()
    attention.twicing_attention_kernel(*(x.float() for x in (q, k, v)))
    assert calls == []  # fp32 goes to two SDPA passes on a GPU too


def test_output_is_laid_out_so_that_merging_heads_is_free(kernel):
    q, k, v = (x.to(DEVICE, DTYPE) for x in random_qkv(2, 3, 16, HD))
    out = kernel.twicing_attention_triton(q, k, v)
    assert out.transpose(1, 2).is_contiguous()  # (batch, time, heads, dim) in memory, as SDPA returns


def test_hands_a_generation_cache_the_first_pass_it_computed(kernel):
    q, k, v = (x.to(DEVICE, DTYPE) for x in random_qkv(1, 2, 24, HD, seed=11))
    out, u = kernel.twicing_attention_and_u(q, k, v)
    assert torch.equal(out, kernel.twicing_attention_triton(q, k, v))
    assert relative_error(u, torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)) <= TOLERANCE


def test_a_twicing_gpt_trains_the_same_on_the_kernel_as_on_two_sdpa_passes(kernel, monkeypatch):
    """The whole model: its fused qkv views, head merge and autograd, with the kernel inside."""
    from lm import attention
    from lm.config import ModelConfig
    from lm.model import GPT

    config = ModelConfig(vocab_size=64, block_size=48, n_layer=2, n_head=2, n_embd=2 * HD, twicing_layers="all")
    idx = torch.randint(0, 64, (2, 41), generator=torch.Generator().manual_seed(0)).to(DEVICE)

    def loss_and_grads(attend):
        variant = dataclasses.replace(attention.ATTENTION["twicing"], attend=attend)
        monkeypatch.setitem(attention.ATTENTION, "twicing", variant)
        torch.manual_seed(0)
        model = GPT(config).to(DEVICE, DTYPE)
        _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        return loss.item(), [p.grad for p in model.parameters()]

    loss, grads = loss_and_grads(kernel.twicing_attention_triton)
    reference_loss, reference_grads = loss_and_grads(twicing_attention_sdpa)
    assert loss == pytest.approx(reference_loss, rel=1e-2 if GPU else 1e-6)
    assert all(relative_error(g, r) <= (5e-2 if GPU else 1e-5) for g, r in zip(grads, reference_grads))


@pytest.mark.parametrize(
    "failure",
    [
        lambda errors: errors.OutOfResources(300000, 232448, "shared memory"),
        lambda errors: errors.PTXASError("ptxas fatal: out of registers"),
        lambda errors: errors.AutotunerError("no configuration ran"),
    ],
    ids=["OutOfResources", "PTXASError", "AutotunerError"],
)
def test_a_kernel_that_cannot_run_here_names_the_way_around_it(kernel, monkeypatch, failure):
    from triton.runtime import errors

    error = failure(errors)

    def fails(*args, **kwargs):
        raise error

    monkeypatch.setattr(kernel, "_forward", fails)
    monkeypatch.setattr(kernel, "_backward", fails)
    q, k, v = (x.to(DEVICE, DTYPE).requires_grad_() for x in random_qkv(1, 1, 8, HD))
    with pytest.raises(RuntimeError, match=f"{type(error).__name__}.*set model.attention_impl: sdpa"):
        kernel.twicing_attention_triton(q, k, v)
    monkeypatch.undo()
    out = kernel.twicing_attention_triton(q, k, v)
    monkeypatch.setattr(kernel, "_backward", fails)
    with pytest.raises(RuntimeError, match=f"{type(error).__name__}.*set model.attention_impl: sdpa"):
        out.sum().backward()  # the backward's launches too


def test_the_training_log_says_where_twicing_runs(kernel):
    from lm.attention import ATTENTION

    gpu, twicing, triton, sdpa = (
        torch.device("cuda"),
        ATTENTION["twicing"],
        ATTENTION["twicing_triton"],
        ATTENTION["twicing_sdpa"],
    )
    assert twicing.runs_on(torch.device("cpu"), 64) == triton.runs_on(torch.device("cpu"), 64) == "two SDPA passes"
    assert sdpa.runs_on(gpu, 64) == "two SDPA passes" and triton.runs_on(gpu, 24) == "two SDPA passes"
    # Triton stays unimported on CPUs; on a GPU, fused is what benchmarks/measured_fastest.json says
    assert triton.runs_on(gpu, 64) == (
        "the Triton kernel in bf16/fp16, two SDPA passes in fp32" if GPU else "two SDPA passes"
    )
    assert twicing.runs_on(gpu, 64) == ("two SDPA passes (measured fastest here)" if GPU else "two SDPA passes")


@pytest.mark.parametrize("impl", ["twicing", "twicing_triton"])
def test_the_automatic_choice_compiles_without_graph_breaks(kernel, impl):
    """What the model calls: the kernel or two SDPA passes, chosen at trace time, either way one graph."""
    from lm.attention import ATTENTION

    attend = ATTENTION[impl].attend
    q, k, v = (x.to(DEVICE, DTYPE) for x in random_qkv(1, 2, 32, HD, seed=12))
    compiled = torch.compile(attend, backend="aot_eager", fullgraph=True)
    assert relative_error(compiled(q, k, v), attend(q, k, v)) <= TOLERANCE


def test_a_cache_prefill_honours_attention_impl_sdpa(kernel, monkeypatch):
    from lm.attention import ATTENTION, LayerCache

    calls = []
    monkeypatch.setattr(
        kernel, "twicing_attention_and_u", lambda *a: calls.append(1) or (twicing_attention_sdpa(*a), a[2])
    )
    q, k, v = (x.to(DEVICE, DTYPE) for x in random_qkv(1, 2, 16, HD))
    ATTENTION["twicing_sdpa"].attend_cached(q, k, v, LayerCache())
    assert calls == []  # the escape hatch from the kernel holds in generation too
    ATTENTION["twicing_triton"].attend_cached(q, k, v, LayerCache())
    assert calls == ([1] if GPU else [])


def test_deterministic_algorithms_run_one_fixed_tiling_per_head_size_not_the_autotuner(kernel, monkeypatch):
    """Timing would pick tile shapes, and so summation orders, that differ between runs and ranks."""
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    q, k, v = (x.to(DEVICE, DTYPE).requires_grad_() for x in random_qkv(1, 2, 40, HD, seed=13))

    def run(shapes):
        for fn in kernel.QUERY_MAJOR_KERNELS + kernel.KEY_MAJOR_KERNELS:
            monkeypatch.setattr(fn, "configs", kernel.tile_configs(shapes[fn in kernel.KEY_MAJOR_KERNELS]))
            monkeypatch.setattr(fn, "run", None)  # the autotuner's entry: calling it would fail
        return output_and_grads(kernel.twicing_attention_triton, q, k, v, torch.ones_like(q))

    first = [[(32, 16, 4, 1)], [(16, 32, 4, 1)]]
    widened = [[(32, 16, 4, 1), (16, 16, 4, 1)], [(16, 32, 4, 1), (16, 16, 4, 1)]]
    assert all(torch.equal(a, b) for a, b in zip(run(widened), run(first)))  # the first shape that fits, bitwise
    fn = kernel.KEY_MAJOR_KERNELS[0]
    monkeypatch.setattr(fn, "configs", kernel.tile_configs(widened[1]))
    fn.configs[0].head_dims = (HD * 2,)  # a shape listed for another head size only is passed over
    assert kernel.fixed_config(fn, HD) is fn.configs[1]
