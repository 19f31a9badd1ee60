"""Fused causal twicing attention as a torch op: the Triton programs of lm.kernels.twicing_jit
(forward) and twicing_bwd_jit (backward), launched.

Forward: pass 1 writes U = A V and each row's log-sum-exp L; pass 2 writes out = A (2V - U).
Backward: dW = P^T dO, whose epilogue writes X = 2 dO - dW and delta; then dK, dV (and dQ, added
atomically; or, under deterministic algorithms, by a query-major program). Nothing of size T x T
is stored; saved for backward are Q, K, V, U, out and L, one (T, D) tensor more than flash
attention. U is returned (a generation cache keeps it) but is not differentiable. Exposed as a
torch custom op (`twicing_lm::twicing_attention`), one opaque, differentiable call to
torch.compile. With TRITON_INTERPRET=1 set before Triton is first imported, it runs on CPU tensors
in Triton's interpreter (the tests do). On CUDA it takes bf16 and fp16 only: fp32 dots would run
without tensor cores and the D = 128 tiles would not fit shared memory, so fp32 stays on the two
SDPA passes (`supports`).

Cost per (batch, head), causal, in units of one T x T/2 x D matmul (T^2 D FLOPs), of exp2 passes
over the T^2/2 scores, and of HBM bytes in t = T D x 2 bytes (each tensor read once per launch:
the re-reads of K, V and the query-side tiles across programs hit L2):

  program          matmuls per tile                      exp   HBM bytes
  pass 1           S = Q K^T, U += P V              2     1     Q K V in; U, L out                 4 t
  pass 2           S, out += P W                    2     1     Q K V U L in; out                  5 t
  dW + epilogue    S^T = K Q^T, dW += P^T dO        2     1     Q K dO, then O U in; X, delta out  6 t
  dK dV (+ dQ)     S^T, dP^T = V X^T - U dO^T (2),  6     1     Q K V U dO X L delta in;
                   dV += P^T X, dK += dS^T Q,                   dK dV out                          8 t
                   dQ^T += K^T dS^T (fp32 atomics)              dQ: zeroed, added into, cast       7 t
  kernel total                                      12    4                                  about 30 t
  SDPA (flash), fwd + bwd                           7     2                                  about 16 t
  two SDPA passes                                   14    4     2 x 16 t, W = 2V - U and dW  about 38 t

So the kernel's floor is 12/7 = 1.71x SDPA in FLOPs, 2x in exp2 work and about 1.9x in bytes.
At D = 64 a tile has only 4D = 256 matmul FLOPs per exp2 against Hopper's ~250 tensor FLOPs per
MUFU exp2, so exp throughput holds the kernel near 2x; at D = 128 the matmuls dominate and 1.71x is
the floor. Under deterministic algorithms dQ is recomputed (S, dP, dQ: 4 more matmuls, one more
exp, and no dQ in dK dV): 15 matmuls, 2.14x. Two SDPA passes are 2x in FLOPs and exp, yet were
measured at 1.72x one SDPA call on an H200 at T = 1024 (benchmarks/RESULTS.md; one call is itself
far from peak at that length). Against them the kernel saves 2 of 14 matmuls and about 8 t of 38 t,
so it wins only if its programs run as close to peak as SDPA's do: that is for a GPU run to show,
and until one records it faster, two SDPA passes stay the default (lm.fastest).

Why the forward stays in Triton rather than on the SDPA ops that return the log-sum-exp
(aten._scaled_dot_product_flash_attention, _cudnn_attention): the FLOPs are the same (4 matmuls
per tile), pass 2 here does less than an SDPA pass (no running max or rescale; W = 2V - U made in
registers, never the 3 t of an elementwise kernel), and those ops' log-sum-exp differs by backend
(natural log (B, H, T); padded to 32 rows; (B, H, T, 1)), chosen by torch at run time, and pass 2
under GQA (K per kv head, W per query head) would need one call per group member. The attention
benchmark times the forward alone (its fwd column); if SDPA's forward wins there, that is the
next change.

Grouped-query attention: q is (B, Hq, T, D), k and v (B, Hkv, T, D) with Hq a multiple of Hkv.
Query head h reads kv head h // (Hq / Hkv) in place; U and out have Hq heads, dK and dV Hkv heads,
each the sum over its group of query heads.
"""

import contextlib
import math

import torch
import triton
from triton.compiler.errors import CompilationError
from triton.runtime import errors

from lm.kernels.twicing_bwd_jit import _bwd_dkdv, _bwd_dq, _bwd_dw
from lm.kernels.twicing_jit import (
    INTERPRETED,
    SHAPES,
    SUPPORTED_HEAD_DIMS,
    _pass1_fwd,
    _pass2_fwd,
    shared_memory_limit,
    takes,
    tile_configs,
)

# ptxas failing, and the autotuner finding no configuration that runs; older Triton lacks either.
FAILURES = tuple(
    getattr(errors, name) for name in ("OutOfResources", "PTXASError", "AutotunerError") if hasattr(errors, name)
)

# The programs of each tiling, whose autotune configurations the tests narrow.
QUERY_MAJOR_KERNELS = (_pass1_fwd, _pass2_fwd, _bwd_dq)
KEY_MAJOR_KERNELS = (_bwd_dw, _bwd_dkdv)

__all__ = [
    "INTERPRETED",
    "KEY_MAJOR_KERNELS",
    "QUERY_MAJOR_KERNELS",
    "SHAPES",
    "SUPPORTED_HEAD_DIMS",
    "supports",
    "tile_configs",
    "twicing_attention_and_u",
    "twicing_attention_triton",
]

LOG2E = 1.4426950408889634  # the kernels use exp2


def _strides(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32 (interpreter only) keeps fp32 products


def _time_major(q: torch.Tensor) -> torch.Tensor:
    """An empty (batch, heads, time, dim) tensor laid out as (batch, time, heads, dim), like SDPA's
    output: the model's transpose back to (batch, time, channels) is then free."""
    B, H, T, D = q.shape
    return q.new_empty(B, T, H, D).transpose(1, 2)


def _unit_last(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """The kernels take any batch/head/time strides but need the head dimension dense."""
    return [x if x.stride(-1) == 1 else x.contiguous() for x in tensors]


def _group(q: torch.Tensor, k: torch.Tensor) -> int:
    """How many query heads share each kv head (1 without GQA)."""
    return q.size(1) // k.size(1)


def fixed_config(kernel, d: int) -> triton.Config:
    """The one tiling `kernel` uses under deterministic algorithms: its first shape for head size
    d that fits this GPU, the same on every run and rank."""
    name, limit = kernel.fn.__name__, shared_memory_limit()
    return next((c for c in kernel.configs if takes(name, c, d, limit)), kernel.configs[0])


def _launch(kernel, blocks: int, rows: str, *args, **meta) -> None:
    """Launch `kernel` over (programs, cdiv(T, its `rows` block)): autotuned, or under
    torch.use_deterministic_algorithms on its fixed tiling (timing would pick shapes, and so
    summation orders, that differ between runs and ranks)."""
    T = meta["T"]
    if torch.are_deterministic_algorithms_enabled():
        config = fixed_config(kernel, meta["D"])
        grid = (blocks, triton.cdiv(T, config.kwargs[rows]))
        kernel.fn[grid](*args, **meta, **config.all_kwargs())
    else:
        kernel[lambda m: (blocks, triton.cdiv(T, m[rows]))](*args, **meta)


def _on_device(x: torch.Tensor):
    """Launches go to x's GPU, whichever is current (torch.cuda.device), and nowhere on the CPU."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _common(q: torch.Tensor) -> dict:
    B, H, T, D = q.shape
    return dict(T=T, TK=triton.next_power_of_2(T), D=D, PRECISION=_precision(q.dtype))


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    q, k, v = _unit_last(q, k, v)
    B, H, T, D = q.shape
    group, meta = _group(q, k), _common(q)
    qk_scale = LOG2E / math.sqrt(D)
    u, out = torch.empty_like(q, memory_format=torch.contiguous_format), _time_major(q)
    lse = torch.empty(B * H, T, device=q.device, dtype=torch.float32)
    s = (*_strides(q), *_strides(k), *_strides(v), *_strides(u))
    with _on_device(q):
        _launch(_pass1_fwd, B * H, "BLOCK_M", q, k, v, u, lse, *s, H, group, qk_scale=qk_scale, **meta)
        _launch(_pass2_fwd, B * H, "BLOCK_M", q, k, v, u, lse, out, *s, *_strides(out), H, group,
                qk_scale=qk_scale, **meta)  # fmt: skip
    return out, u, lse


def _backward(q, k, v, u, out, lse, dout):
    """Gradients of out = P W, W = 2V - U, U = P V (derivation: lm.kernels.twicing_bwd_jit)."""
    q, k, v, u, out, dout = _unit_last(q, k, v, u, out, dout)
    B, H, T, D = q.shape
    group, meta = _group(q, k), _common(q)
    sm_scale = 1.0 / math.sqrt(D)
    scales = dict(qk_scale=sm_scale * LOG2E, sm_scale=sm_scale)
    # X = 2 dO - dW in the inputs' precision: it enters the dots in that precision anyway.
    x = torch.empty(B, H, T, D, device=q.device, dtype=q.dtype)
    delta = torch.empty_like(lse)
    dk, dv = (torch.empty(k.shape, device=q.device, dtype=q.dtype) for _ in range(2))
    fuse_dq = not torch.are_deterministic_algorithms_enabled()
    dq32 = torch.zeros(x.shape, device=q.device, dtype=torch.float32) if fuse_dq else lse.new_zeros(1)  # (a stand-in)
    qkvu = (*_strides(q), *_strides(k), *_strides(v), *_strides(u))
    with _on_device(q):
        _launch(_bwd_dw, B * H, "BLOCK_N", q, k, out, u, dout, lse, x, delta, *_strides(q), *_strides(k),
                *_strides(out), *_strides(u), *_strides(dout), *_strides(x), H, group,
                qk_scale=scales["qk_scale"], **meta)  # fmt: skip
        _launch(_bwd_dkdv, B * (H // group), "BLOCK_N", q, k, v, u, dout, x, lse, delta, dk, dv, dq32, *qkvu,
                *_strides(dout), *_strides(x), *_strides(dk), H, group, FUSE_DQ=fuse_dq, **scales, **meta)  # fmt: skip
        if fuse_dq:
            del x, delta  # before the cast allocates dq
            return dq32.to(q.dtype), dk, dv
        dq = torch.empty(x.shape, device=q.device, dtype=q.dtype)
        _launch(_bwd_dq, B * H, "BLOCK_M", q, k, v, u, dout, x, lse, delta, dq, *qkvu, *_strides(dout),
                *_strides(x), H, group, **scales, **meta)  # fmt: skip
    return dq, dk, dv


@contextlib.contextmanager
def _explained_failures():
    """A kernel that does not compile or launch on this GPU names the way around it."""
    try:
        yield
    except (CompilationError, *FAILURES) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise RuntimeError(
            f"the Triton twicing kernel failed on this GPU ({type(error).__name__}: {first}); "
            "set model.attention_impl: sdpa (or fused) to run twicing as two SDPA passes"
        ) from error


@torch.library.custom_op("twicing_lm::twicing_attention", mutates_args=())
def _twicing_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with _explained_failures():
        return _forward(q, k, v)


@_twicing_op.register_fake
def _(q, k, v):
    B, H, T, D = q.shape
    return (
        _time_major(q),
        torch.empty_like(q, memory_format=torch.contiguous_format),
        q.new_empty(B * H, T, dtype=torch.float32),
    )


@torch.library.custom_op("twicing_lm::twicing_attention_backward", mutates_args=())
def _twicing_backward_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    u: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dout: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with _explained_failures():
        return _backward(q, k, v, u, out, lse, dout)


@_twicing_backward_op.register_fake
def _(q, k, v, u, out, lse, dout):
    # Contiguous like the real gradients, whatever the inputs' strides: compiled code trusts these.
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v = inputs
    out, u, lse = output
    ctx.save_for_backward(q, k, v, u, out, lse)
    ctx.mark_non_differentiable(u, lse)  # U is for a generation cache; its gradient is not computed


def _grads(ctx, dout, _du, _dlse):
    q, k, v, u, out, lse = ctx.saved_tensors
    return _twicing_backward_op(q, k, v, u, out, lse, dout)


_twicing_op.register_autograd(_grads, setup_context=_setup_context)


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the kernel takes these inputs (else the caller uses two SDPA passes): causal self
    attention, k and v with Hq or (GQA) a divisor of Hq heads, the same batch, time and dim, and on
    CUDA bf16 or fp16 (fp32 only in the interpreter)."""
    dtypes = (torch.float16, torch.bfloat16) if q.is_cuda else (torch.float16, torch.bfloat16, torch.float32)
    return (
        q.dim() == k.dim() == 4
        and k.shape == v.shape
        and (q.size(0), *q.shape[2:]) == (k.size(0), *k.shape[2:])
        and k.size(1) > 0
        and q.size(1) % k.size(1) == 0
        and q.size(-1) in SUPPORTED_HEAD_DIMS
        and q.dtype in dtypes
        and q.dtype == k.dtype == v.dtype
        and q.device == k.device == v.device
        and (q.is_cuda or INTERPRETED)
    )


def twicing_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal (2A - A^2) V for q (batch, heads, time, head_dim); k and v may have fewer heads (GQA)."""
    return _twicing_op(q, k, v)[0]


def twicing_attention_and_u(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, U = A V): what a generation cache keeps after the prompt, from the same two passes.
    Both have q's heads, also under GQA (U is per query head: each has its own A)."""
    out, u, _ = _twicing_op(q, k, v)
    return out, u
