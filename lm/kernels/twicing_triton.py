"""Fused causal twicing attention as a torch op: the Triton programs of lm.kernels.twicing_jit,
launched forward and backward.

Forward: pass 1 writes U = A V and each row's log-sum-exp L; pass 2 writes out = A (2V - U) from
them. Backward: dW = P^T dO, then the row terms delta, then dK, dV and dQ (see twicing_jit).
Nothing of size T x T is stored; saved for backward are Q, K, V, U, out and L, one (T, D) tensor
more than flash attention. Exposed as a torch custom op (`twicing_lm::twicing_attention`) so that
torch.compile treats it as one opaque, differentiable call. With TRITON_INTERPRET=1 set before
Triton is first imported, it runs on CPU tensors in Triton's interpreter (the tests do).

Grouped-query attention: q is (B, Hq, T, D), k and v (B, Hkv, T, D) with Hq a multiple of Hkv.
Query head h reads kv head h // (Hq / Hkv) in place (the programs index it; nothing repeats K or
V); U and out have Hq heads, dK and dV Hkv heads, each the sum over its group of query heads.
"""

import contextlib
import math

import torch
import triton
from triton.compiler.errors import CompilationError
from triton.runtime.errors import OutOfResources

from lm.kernels.twicing_jit import (
    INTERPRETED,
    KEY_MAJOR_KERNELS,
    KEY_MAJOR_SHAPES,
    QUERY_MAJOR_KERNELS,
    QUERY_MAJOR_SHAPES,
    SUPPORTED_HEAD_DIMS,
    _bwd_delta,
    _bwd_dkdv,
    _bwd_dq,
    _bwd_dw,
    _pass1_fwd,
    _pass2_fwd,
    tile_configs,
)

# Re-exported: the tests narrow and widen the tilings through this module.
__all__ = [
    "INTERPRETED",
    "KEY_MAJOR_KERNELS",
    "KEY_MAJOR_SHAPES",
    "QUERY_MAJOR_KERNELS",
    "QUERY_MAJOR_SHAPES",
    "SUPPORTED_HEAD_DIMS",
    "supports",
    "tile_configs",
    "twicing_attention_and_u",
    "twicing_attention_triton",
]


def _strides(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32 inputs keep fp32 products, as SDPA does


def _time_major(q: torch.Tensor) -> torch.Tensor:
    """An empty (batch, heads, time, dim) tensor laid out as (batch, time, heads, dim), like SDPA's
    output: the model's transpose back to (batch, time, channels) is then free."""
    B, H, T, D = q.shape
    return q.new_empty(B, T, H, D).transpose(1, 2)


def _query_grid(heads: int, T: int):
    return lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), heads)


def _key_grid(heads: int, T: int):
    return lambda meta: (triton.cdiv(T, meta["BLOCK_N"]), heads)


def _unit_last(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """The kernels take any batch/head/time strides but need the head dimension dense."""
    return [x if x.stride(-1) == 1 else x.contiguous() for x in tensors]


def _group(q: torch.Tensor, k: torch.Tensor) -> int:
    """How many query heads share each kv head (1 without GQA)."""
    return q.size(1) // k.size(1)


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    q, k, v = _unit_last(q, k, v)
    B, H, T, D = q.shape
    group = _group(q, k)
    sm_scale = 1.0 / math.sqrt(D)
    qk_scale = sm_scale * 1.4426950408889634  # log2(e): the kernels use exp2
    u, out = torch.empty_like(q, memory_format=torch.contiguous_format), _time_major(q)
    lse = torch.empty(B * H, T, device=q.device, dtype=torch.float32)
    grid = _query_grid(B * H, T)
    common = dict(D=D, PRECISION=_precision(q.dtype))
    _pass1_fwd[grid](
        q, k, v, u, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(u), H, group, T, qk_scale, **common
    )
    _pass2_fwd[grid](
        q,
        k,
        v,
        u,
        lse,
        out,
        *_strides(q),
        *_strides(k),
        *_strides(v),
        *_strides(u),
        *_strides(out),
        H,
        group,
        T,
        qk_scale,
        **common,
    )
    return out, u, lse


def _backward(q, k, v, u, out, lse, dout):
    """Gradients of out = P W, W = 2V - U, U = P V, P = softmax(scale Q K^T) (causal).

    Pass 2 gives dW = P^T dO and dS2 = P * (dO W^T - delta2) with delta2_i = dO_i . out_i.
    Through W: dV += 2 dW and dU = -dW. Pass 1 gives dV += P^T dU and
    dS1 = P * (dU V^T - delta1) with delta1_i = dU_i . U_i. dS = dS1 + dS2 feeds dQ and dK.
    Under GQA these hold per query head; a kv head's dK and dV sum its group's (one program each).
    """
    q, k, v, u, out, dout = _unit_last(q, k, v, u, out, dout)
    B, H, T, D = q.shape
    group = _group(q, k)
    sm_scale = 1.0 / math.sqrt(D)
    qk_scale = sm_scale * 1.4426950408889634
    common = dict(D=D, PRECISION=_precision(q.dtype))
    key_grid, query_grid = _key_grid(B * H, T), _query_grid(B * H, T)
    kv_grid = _key_grid(B * (H // group), T)  # dK, dV: one program per kv head and key block
    # dW in the inputs' precision: it enters the dots as dU in that precision anyway, and the
    # backward's peak memory stays near flash attention's.
    dw = torch.empty(B, H, T, D, device=q.device, dtype=q.dtype)
    _bwd_dw[key_grid](
        q, k, dout, lse, dw, *_strides(q), *_strides(k), *_strides(dout), *_strides(dw), H, group, T, qk_scale, **common
    )
    delta = torch.empty_like(lse)
    _bwd_delta[(triton.cdiv(T, 64), B * H)](
        out, u, dout, dw, delta, *_strides(out), *_strides(u), *_strides(dout), *_strides(dw), H, T, BLOCK_M=64, D=D
    )
    # dU = -dW is never stored: the kernels negate dW as they load it.
    dk, dv = (torch.empty(k.shape, device=q.device, dtype=q.dtype) for _ in range(2))
    strides = (*_strides(q), *_strides(k), *_strides(v), *_strides(u), *_strides(dout))
    fuse_dq = not torch.are_deterministic_algorithms_enabled()
    dq32 = (
        torch.zeros(B, H, T, D, device=q.device, dtype=torch.float32) if fuse_dq else lse.new_zeros(1)
    )  # (a stand-in)
    _bwd_dkdv[kv_grid](
        q,
        k,
        v,
        u,
        dout,
        dw,
        lse,
        delta,
        dk,
        dv,
        dq32,
        *strides,
        *_strides(dw),
        *_strides(dk),
        H,
        group,
        T,
        qk_scale,
        sm_scale,
        FUSE_DQ=fuse_dq,
        **common,
    )
    if fuse_dq:
        del dw, delta  # before the cast allocates dq
        return dq32.to(q.dtype), dk, dv
    dq = torch.empty(B, H, T, D, device=q.device, dtype=q.dtype)
    _bwd_dq[query_grid](
        q, k, v, u, dout, dw, lse, delta, dq, *strides, *_strides(dq), H, group, T, qk_scale, sm_scale, **common
    )
    return dq, dk, dv


@contextlib.contextmanager
def _explained_failures():
    """A kernel that does not compile for this GPU names the way around it."""
    try:
        yield
    except (CompilationError, OutOfResources) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise RuntimeError(
            f"the Triton twicing kernel failed on this GPU ({type(error).__name__}: {first}); "
            "set model.attention_impl: sdpa to run twicing as two SDPA passes"
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


def _grads(ctx, dout, _du, _dlse):
    q, k, v, u, out, lse = ctx.saved_tensors
    return _twicing_backward_op(q, k, v, u, out, lse, dout)


_twicing_op.register_autograd(_grads, setup_context=_setup_context)


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the kernel takes these inputs (else the caller uses two SDPA passes): causal self
    attention, k and v with Hq or (GQA) a divisor of Hq heads, and the same batch, time and dim."""
    return (
        q.dim() == k.dim() == 4
        and k.shape == v.shape
        and (q.size(0), *q.shape[2:]) == (k.size(0), *k.shape[2:])
        and k.size(1) > 0
        and q.size(1) % k.size(1) == 0
        and q.size(-1) in SUPPORTED_HEAD_DIMS
        and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and q.dtype == k.dtype == v.dtype
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
