"""Fused causal twicing attention in Triton: out = A (2V - U), U = A V, with one A for both passes.

Forward, two launches (pass 2 needs every row of U, which pass 1 writes):
  1. flash attention with online softmax: U and each row's log-sum-exp L;
  2. out_i = sum_j exp(S_ij - L_i) (2 V_j - U_j): the probabilities are final at once (L is known),
     so there is no running max or rescaling, and 2V - U is formed in registers, never stored.

Backward, with P = A, W = 2V - U and dO given (derivation in the docstring of `_backward`):
  1. dW_j = sum_i P_ij dO_i                                   (key-block programs)
  2. dU = -dW; delta_i = dO_i . out_i + dU_i . U_i              (row-block programs)
  3. dS_ij = P_ij (dO_i . W_j + dU_i . V_j - delta_i)
     dV_j = 2 dW_j + sum_i P_ij dU_i,  dK_j = scale sum_i dS_ij Q_i     (key-block programs)
     dQ_i = scale sum_j dS_ij K_j       (added atomically by the same programs; or, under
                                         torch.use_deterministic_algorithms, query-block programs)

Nothing of size T x T is stored; saved for backward are Q, K, V, U, out and L, one (T, D) tensor
more than flash attention. Exposed as a torch custom op (`twicing_lm::twicing_attention`) so that
torch.compile treats it as one opaque, differentiable call. With TRITON_INTERPRET=1 set before
Triton is first imported, it runs on CPU tensors in Triton's interpreter (the tests do).
"""

import math
import os

import contextlib

import torch
import triton
import triton.language as tl
from triton.compiler.errors import CompilationError
from triton.runtime.errors import OutOfResources

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)


def tile_configs(shapes) -> list[triton.Config]:
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st) for m, n, w, st in shapes]


# Tile shapes (BLOCK_M query rows, BLOCK_N key rows, warps, pipeline stages) to autotune over on a
# GPU. Query-block programs (forward, dQ) want many query rows per program; key-block programs
# (dW, dK/dV) many key rows and short query steps, as in flash attention's backward. The
# interpreter, whose time goes per tile rather than per element, gets one small shape of each kind.
QUERY_MAJOR_SHAPES = ((128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 32, 4, 2))
KEY_MAJOR_SHAPES = ((32, 128, 4, 2), (64, 64, 4, 2), (64, 128, 8, 2), (32, 64, 4, 3))
QUERY_MAJOR = tile_configs([(32, 16, 4, 1)] if INTERPRETED else QUERY_MAJOR_SHAPES)
KEY_MAJOR = tile_configs([(16, 32, 4, 1)] if INTERPRETED else KEY_MAJOR_SHAPES)


@triton.jit
def _tile(base, b, h, sb, sh, st, offs_t, offs_d, T):
    """A (rows, D) tile of a (batch, heads, time, D) tensor; rows past T read as zero."""
    ptrs = base + b.to(tl.int64) * sb + h.to(tl.int64) * sh + offs_t[:, None] * st + offs_d[None, :]  # no int32 overflow
    return tl.load(ptrs, mask=offs_t[:, None] < T, other=0.0)


@triton.jit
def _put(base, value, b, h, sb, sh, st, offs_t, offs_d, T):
    ptrs = base + b.to(tl.int64) * sb + h.to(tl.int64) * sh + offs_t[:, None] * st + offs_d[None, :]
    tl.store(ptrs, value.to(base.dtype.element_ty), mask=offs_t[:, None] < T)


@triton.jit
def _probs(q, k, lse, offs_m, offs_n, qk_scale, on_diagonal, PRECISION: tl.constexpr):
    """P = exp(S - L) of a (BLOCK_M, BLOCK_N) tile, in base 2; masked above the diagonal."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    p = tl.exp2(s - lse[:, None])
    if on_diagonal:
        p = tl.where(offs_m[:, None] >= offs_n[None, :], p, 0.0)
    return p


@triton.autotune(QUERY_MAJOR, key=["T", "D", "PRECISION"])
@triton.jit
def _pass1_fwd(Q, K, V, U, LSE, sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sub, suh, sut, H, T, qk_scale,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, PRECISION: tl.constexpr):
    start_m, bh = tl.program_id(0) * BLOCK_M, tl.program_id(1)
    b, h = bh // H, bh % H
    offs_m, offs_d = start_m + tl.arange(0, BLOCK_M), tl.arange(0, D)
    q = _tile(Q, b, h, sqb, sqh, sqt, offs_m, offs_d, T)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    # Key blocks left of the diagonal need no mask; those on it do.
    for start_n in tl.range(0, start_m + BLOCK_M, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _tile(K, b, h, skb, skh, skt, offs_n, offs_d, T)
        v = _tile(V, b, h, svb, svh, svt, offs_n, offs_d, T)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if start_n + BLOCK_N > start_m:
            s = tl.where(offs_m[:, None] >= offs_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    _put(U, acc / l_i[:, None], b, h, sub, suh, sut, offs_m, offs_d, T)
    tl.store(LSE + bh * T + offs_m, m_i + tl.log2(l_i), mask=offs_m < T)


@triton.autotune(QUERY_MAJOR, key=["T", "D", "PRECISION"])
@triton.jit
def _pass2_fwd(Q, K, V, U, LSE, O, sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sub, suh, sut, sob, soh, sot, H, T,
               qk_scale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, PRECISION: tl.constexpr):
    start_m, bh = tl.program_id(0) * BLOCK_M, tl.program_id(1)
    b, h = bh // H, bh % H
    offs_m, offs_d = start_m + tl.arange(0, BLOCK_M), tl.arange(0, D)
    q = _tile(Q, b, h, sqb, sqh, sqt, offs_m, offs_d, T)
    lse = tl.load(LSE + bh * T + offs_m, mask=offs_m < T, other=0.0)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for start_n in tl.range(0, start_m + BLOCK_M, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _tile(K, b, h, skb, skh, skt, offs_n, offs_d, T)
        v = _tile(V, b, h, svb, svh, svt, offs_n, offs_d, T)
        u = _tile(U, b, h, sub, suh, sut, offs_n, offs_d, T)
        w = (2.0 * v.to(tl.float32) - u.to(tl.float32)).to(v.dtype)
        p = _probs(q, k, lse, offs_m, offs_n, qk_scale, True, PRECISION)
        acc += tl.dot(p.to(v.dtype), w, input_precision=PRECISION)
    _put(O, acc, b, h, sob, soh, sot, offs_m, offs_d, T)


@triton.autotune(KEY_MAJOR, key=["T", "D", "PRECISION"])
@triton.jit
def _bwd_dw(Q, K, DO, LSE, DW, sqb, sqh, sqt, skb, skh, skt, sdb, sdh, sdt, swb, swh, swt, H, T, qk_scale,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, PRECISION: tl.constexpr):
    """dW = P^T dO, one key block per program, over the query blocks that see it."""
    start_n, bh = tl.program_id(0) * BLOCK_N, tl.program_id(1)
    b, h = bh // H, bh % H
    offs_n, offs_d = start_n + tl.arange(0, BLOCK_N), tl.arange(0, D)
    k = _tile(K, b, h, skb, skh, skt, offs_n, offs_d, T)
    dw = tl.zeros([BLOCK_N, D], tl.float32)
    for start_m in tl.range(start_n, T, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = _tile(Q, b, h, sqb, sqh, sqt, offs_m, offs_d, T)
        do = _tile(DO, b, h, sdb, sdh, sdt, offs_m, offs_d, T)
        lse = tl.load(LSE + bh * T + offs_m, mask=offs_m < T, other=0.0)
        p = _probs(q, k, lse, offs_m, offs_n, qk_scale, start_m < start_n + BLOCK_N, PRECISION)
        dw += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
    _put(DW, dw, b, h, swb, swh, swt, offs_n, offs_d, T)


@triton.jit
def _bwd_delta(O, U, DO, DW, DELTA, sob, soh, sot, sub, suh, sut, sdb, sdh, sdt, swb, swh, swt, H, T,
               BLOCK_M: tl.constexpr, D: tl.constexpr):
    """delta_i = dO_i . out_i + dU_i . U_i = dO_i . out_i - dW_i . U_i, in fp32."""
    start_m, bh = tl.program_id(0) * BLOCK_M, tl.program_id(1)
    b, h = bh // H, bh % H
    offs_m, offs_d = start_m + tl.arange(0, BLOCK_M), tl.arange(0, D)
    o = _tile(O, b, h, sob, soh, sot, offs_m, offs_d, T).to(tl.float32)
    u = _tile(U, b, h, sub, suh, sut, offs_m, offs_d, T).to(tl.float32)
    do = _tile(DO, b, h, sdb, sdh, sdt, offs_m, offs_d, T).to(tl.float32)
    dw = _tile(DW, b, h, swb, swh, swt, offs_m, offs_d, T).to(tl.float32)
    tl.store(DELTA + bh * T + offs_m, tl.sum(do * o - dw * u, 1), mask=offs_m < T)


@triton.autotune(KEY_MAJOR, key=["T", "D", "PRECISION"], reset_to_zero=["DQ32"])
@triton.jit
def _bwd_dkdv(Q, K, V, U, DO, DW, LSE, DELTA, DK, DV, DQ32, sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sub, suh, sut,
              sdb, sdh, sdt, sxb, sxh, sxt, H, T, qk_scale, sm_scale,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, PRECISION: tl.constexpr,
              FUSE_DQ: tl.constexpr):
    """dK and dV of one key block. DW, DK, DV (and DQ32) share the contiguous layout (sx*).

    With FUSE_DQ, each tile's share of dQ is also added into the fp32 buffer DQ32 atomically, which
    saves `_bwd_dq` recomputing P and dP, at the price of a summation order that varies run to run.
    """
    start_n, bh = tl.program_id(0) * BLOCK_N, tl.program_id(1)
    b, h = bh // H, bh % H
    offs_n, offs_d = start_n + tl.arange(0, BLOCK_N), tl.arange(0, D)
    k = _tile(K, b, h, skb, skh, skt, offs_n, offs_d, T)
    v = _tile(V, b, h, svb, svh, svt, offs_n, offs_d, T)
    u = _tile(U, b, h, sub, suh, sut, offs_n, offs_d, T)
    w = (2.0 * v.to(tl.float32) - u.to(tl.float32)).to(v.dtype)
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)
    for start_m in tl.range(start_n, T, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = _tile(Q, b, h, sqb, sqh, sqt, offs_m, offs_d, T)
        do = _tile(DO, b, h, sdb, sdh, sdt, offs_m, offs_d, T)
        du = (-_tile(DW, b, h, sxb, sxh, sxt, offs_m, offs_d, T)).to(do.dtype)
        lse = tl.load(LSE + bh * T + offs_m, mask=offs_m < T, other=0.0)
        delta = tl.load(DELTA + bh * T + offs_m, mask=offs_m < T, other=0.0)
        p = _probs(q, k, lse, offs_m, offs_n, qk_scale, start_m < start_n + BLOCK_N, PRECISION)
        dp = tl.dot(do, tl.trans(w), input_precision=PRECISION) + tl.dot(du, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dv += tl.dot(tl.trans(p.to(du.dtype)), du, input_precision=PRECISION)
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
        if FUSE_DQ:
            dq = tl.dot(ds.to(k.dtype), k, input_precision=PRECISION) * sm_scale
            ptrs = DQ32 + b.to(tl.int64) * sxb + h.to(tl.int64) * sxh + offs_m[:, None] * sxt + offs_d[None, :]
            tl.atomic_add(ptrs, dq, mask=offs_m[:, None] < T, sem="relaxed")
    dw = _tile(DW, b, h, sxb, sxh, sxt, offs_n, offs_d, T).to(tl.float32)
    _put(DV, dv + 2.0 * dw, b, h, sxb, sxh, sxt, offs_n, offs_d, T)
    _put(DK, dk * sm_scale, b, h, sxb, sxh, sxt, offs_n, offs_d, T)


@triton.autotune(QUERY_MAJOR, key=["T", "D", "PRECISION"])
@triton.jit
def _bwd_dq(Q, K, V, U, DO, DW, LSE, DELTA, DQ, sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sub, suh, sut,
            sdb, sdh, sdt, sxb, sxh, sxt, H, T, qk_scale, sm_scale,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, PRECISION: tl.constexpr):
    """dQ of one query block. DW and DQ share the contiguous layout (sx*)."""
    start_m, bh = tl.program_id(0) * BLOCK_M, tl.program_id(1)
    b, h = bh // H, bh % H
    offs_m, offs_d = start_m + tl.arange(0, BLOCK_M), tl.arange(0, D)
    q = _tile(Q, b, h, sqb, sqh, sqt, offs_m, offs_d, T)
    do = _tile(DO, b, h, sdb, sdh, sdt, offs_m, offs_d, T)
    du = (-_tile(DW, b, h, sxb, sxh, sxt, offs_m, offs_d, T)).to(do.dtype)
    lse = tl.load(LSE + bh * T + offs_m, mask=offs_m < T, other=0.0)
    delta = tl.load(DELTA + bh * T + offs_m, mask=offs_m < T, other=0.0)
    dq = tl.zeros([BLOCK_M, D], tl.float32)
    for start_n in tl.range(0, start_m + BLOCK_M, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _tile(K, b, h, skb, skh, skt, offs_n, offs_d, T)
        v = _tile(V, b, h, svb, svh, svt, offs_n, offs_d, T)
        u = _tile(U, b, h, sub, suh, sut, offs_n, offs_d, T)
        w = (2.0 * v.to(tl.float32) - u.to(tl.float32)).to(v.dtype)
        p = _probs(q, k, lse, offs_m, offs_n, qk_scale, start_n + BLOCK_N > start_m, PRECISION)
        dp = tl.dot(do, tl.trans(w), input_precision=PRECISION) + tl.dot(du, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    _put(DQ, dq * sm_scale, b, h, sxb, sxh, sxt, offs_m, offs_d, T)


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


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    q, k, v = _unit_last(q, k, v)
    B, H, T, D = q.shape
    sm_scale = 1.0 / math.sqrt(D)
    qk_scale = sm_scale * 1.4426950408889634  # log2(e): the kernels use exp2
    u, out = torch.empty_like(q, memory_format=torch.contiguous_format), _time_major(q)
    lse = torch.empty(B * H, T, device=q.device, dtype=torch.float32)
    grid = _query_grid(B * H, T)
    common = dict(D=D, PRECISION=_precision(q.dtype))
    _pass1_fwd[grid](q, k, v, u, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(u), H, T, qk_scale, **common)
    _pass2_fwd[grid](q, k, v, u, lse, out, *_strides(q), *_strides(k), *_strides(v), *_strides(u), *_strides(out),
                     H, T, qk_scale, **common)
    return out, u, lse


def _backward(q, k, v, u, out, lse, dout):
    """Gradients of out = P W, W = 2V - U, U = P V, P = softmax(scale Q K^T) (causal).

    Pass 2 gives dW = P^T dO and dS2 = P * (dO W^T - delta2) with delta2_i = dO_i . out_i.
    Through W: dV += 2 dW and dU = -dW. Pass 1 gives dV += P^T dU and
    dS1 = P * (dU V^T - delta1) with delta1_i = dU_i . U_i. dS = dS1 + dS2 feeds dQ and dK.
    """
    q, k, v, u, out, dout = _unit_last(q, k, v, u, out, dout)
    B, H, T, D = q.shape
    sm_scale = 1.0 / math.sqrt(D)
    qk_scale = sm_scale * 1.4426950408889634
    common = dict(D=D, PRECISION=_precision(q.dtype))
    key_grid, query_grid = _key_grid(B * H, T), _query_grid(B * H, T)
    # dW in the inputs' precision: it enters the dots as dU in that precision anyway, and the
    # backward's peak memory stays near flash attention's.
    dw = torch.empty(B, H, T, D, device=q.device, dtype=q.dtype)
    _bwd_dw[key_grid](q, k, dout, lse, dw, *_strides(q), *_strides(k), *_strides(dout), *_strides(dw), H, T, qk_scale,
                      **common)
    delta = torch.empty_like(lse)
    _bwd_delta[(triton.cdiv(T, 64), B * H)](out, u, dout, dw, delta, *_strides(out), *_strides(u), *_strides(dout),
                                            *_strides(dw), H, T, BLOCK_M=64, D=D)
    # dU = -dW is never stored: the kernels negate dW as they load it.
    dk, dv = (torch.empty(B, H, T, D, device=q.device, dtype=q.dtype) for _ in range(2))
    strides = (*_strides(q), *_strides(k), *_strides(v), *_strides(u), *_strides(dout))
    fuse_dq = not torch.are_deterministic_algorithms_enabled()
    dq32 = torch.zeros(B, H, T, D, device=q.device, dtype=torch.float32) if fuse_dq else lse.new_zeros(1)  # (a stand-in)
    _bwd_dkdv[key_grid](q, k, v, u, dout, dw, lse, delta, dk, dv, dq32, *strides, *_strides(dk), H, T, qk_scale,
                        sm_scale, FUSE_DQ=fuse_dq, **common)
    if fuse_dq:
        del dw, delta  # before the cast allocates dq
        return dq32.to(q.dtype), dk, dv
    dq = torch.empty_like(dk)
    _bwd_dq[query_grid](q, k, v, u, dout, dw, lse, delta, dq, *strides, *_strides(dq), H, T, qk_scale, sm_scale, **common)
    return dq, dk, dv


@contextlib.contextmanager
def _explained_failures():
    """A kernel that does not compile for this GPU names the way around it."""
    try:
        yield
    except (CompilationError, OutOfResources) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise RuntimeError(f"the Triton twicing kernel failed on this GPU ({type(error).__name__}: {first}); "
                           "set model.attention_impl: sdpa to run twicing as two SDPA passes") from error


@torch.library.custom_op("twicing_lm::twicing_attention", mutates_args=())
def _twicing_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with _explained_failures():
        return _forward(q, k, v)


@_twicing_op.register_fake
def _(q, k, v):
    B, H, T, D = q.shape
    return _time_major(q), torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(B * H, T, dtype=torch.float32)


@torch.library.custom_op("twicing_lm::twicing_attention_backward", mutates_args=())
def _twicing_backward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, u: torch.Tensor, out: torch.Tensor,
                         lse: torch.Tensor, dout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with _explained_failures():
        return _backward(q, k, v, u, out, lse, dout)


@_twicing_backward_op.register_fake
def _(q, k, v, u, out, lse, dout):
    # Contiguous like the real gradients, whatever the inputs' strides: compiled code trusts these.
    return tuple(q.new_empty(q.shape) for _ in range(3))


def _setup_context(ctx, inputs, output):
    q, k, v = inputs
    out, u, lse = output
    ctx.save_for_backward(q, k, v, u, out, lse)


def _grads(ctx, dout, _du, _dlse):
    q, k, v, u, out, lse = ctx.saved_tensors
    return _twicing_backward_op(q, k, v, u, out, lse, dout)


_twicing_op.register_autograd(_grads, setup_context=_setup_context)


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the kernel takes these inputs (else the caller uses two SDPA passes)."""
    return (q.dim() == 4 and q.shape == k.shape == v.shape and q.size(-1) in SUPPORTED_HEAD_DIMS
            and q.dtype in (torch.float16, torch.bfloat16, torch.float32) and q.dtype == k.dtype == v.dtype
            and (q.is_cuda or INTERPRETED))


def twicing_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal (2A - A^2) V for q, k, v shaped (batch, heads, time, head_dim)."""
    return _twicing_op(q, k, v)[0]


def twicing_attention_and_u(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, U = A V): what a generation cache keeps after the prompt, from the same two passes."""
    out, u, _ = _twicing_op(q, k, v)
    return out, u


QUERY_MAJOR_KERNELS = (_pass1_fwd, _pass2_fwd, _bwd_dq)
KEY_MAJOR_KERNELS = (_bwd_dw, _bwd_dkdv)
