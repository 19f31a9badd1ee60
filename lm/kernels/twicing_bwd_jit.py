"""The Triton programs of the twicing backward (the forward and the shared helpers: twicing_jit).

With P = A (causal softmax of scale Q K^T), U = P V, W = 2V - U, out = P W and dO given:
  pass 2:  dW = P^T dO,  dP2 = dO W^T,        delta2_i = dO_i . out_i
  pass 1:  dU = -dW,     dP1 = dU V^T,        delta1_i = dU_i . U_i
  so       dP = dO W^T - dW V^T = X V^T - dO U^T   with X = 2 dO - dW,
           dS = P * (dP - delta),  delta_i = dO_i . out_i - dW_i . U_i,
           dV = 2 dW + P^T dU = P^T X,  dK = scale dS^T Q,  dQ = scale dS K.
dW at row i must be complete before any dP of query row i, hence two launches:
  1. `_bwd_dw` (key-major): dW_j = sum_i P_ij dO_i; its epilogue turns the finished rows into
     X_j = 2 dO_j - dW_j and delta_j, so dW itself is never stored, nor negated into dU;
  2. `_bwd_dkdv` (key-major, one kv head each, over its GROUP query heads): dK_j and dV_j in
     registers; with FUSE_DQ each tile's dQ^T = K^T dS^T is added atomically into an fp32 buffer.
     Under torch.use_deterministic_algorithms, `_bwd_dq` (query-major) computes dQ instead.
Every dot of the key-major programs is transposed (S^T = K Q^T, dP^T = V X^T - U dO^T), so
their M is BLOCK_N or D, and P^T and dS^T, computed in registers, are never transposed.
"""

import triton
import triton.language as tl

from lm.kernels.twicing_jit import _cols, _head, _lse, _put, _query_block, _rows, autotuned


@triton.jit
def _dw_tiles(dw, k, q_base, do_base, LSE, bh, sqt, sdt, offs_n, offs_d, lo, hi, T, qk_scale,
              BLOCK_M: tl.constexpr, PRECISION: tl.constexpr, MASKED: tl.constexpr):  # fmt: skip
    for start_m in tl.range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        qT = _cols(q_base, sqt, offs_m, offs_d, T)
        do = _rows(do_base, sdt, offs_m, offs_d, T)
        pT = tl.exp2(tl.dot(k, qT, input_precision=PRECISION) * qk_scale - _lse(LSE, bh, offs_m, T)[None, :])
        if MASKED:
            pT = tl.where(offs_n[:, None] <= offs_m[None, :], pT, 0.0)
        dw += tl.dot(pT.to(do.dtype), do, input_precision=PRECISION)
    return dw


@autotuned("_bwd_dw")
@triton.jit
def _bwd_dw(Q, K, O, U, DO, LSE, X, DELTA, sqb, sqh, sqt, skb, skh, skt, sob, soh, sot, sub, suh, sut,
            sdb, sdh, sdt, sxb, sxh, sxt, H, GROUP, T, TK, qk_scale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            D: tl.constexpr, PRECISION: tl.constexpr):  # fmt: skip
    """dW of one key block of one query head over the query blocks that see it; then X and delta
    of those rows, which are finished here."""
    bh, start_n = tl.program_id(0), tl.program_id(1) * BLOCK_N
    b, h = bh // H, bh % H
    offs_n, offs_d = start_n + tl.arange(0, BLOCK_N), tl.arange(0, D)
    k = _rows(_head(K, b, h // GROUP, skb, skh), skt, offs_n, offs_d, T)
    q_base, do_base = _head(Q, b, h, sqb, sqh), _head(DO, b, h, sdb, sdh)
    dw = tl.zeros([BLOCK_N, D], tl.float32)
    dw = _dw_tiles(dw, k, q_base, do_base, LSE, bh, sqt, sdt, offs_n, offs_d, start_n, start_n + BLOCK_N, T,
                   qk_scale, BLOCK_M, PRECISION, True)  # fmt: skip
    dw = _dw_tiles(dw, k, q_base, do_base, LSE, bh, sqt, sdt, offs_n, offs_d, start_n + BLOCK_N, T, T, qk_scale,
                   BLOCK_M, PRECISION, False)  # fmt: skip
    # The epilogue reads rows j as query rows: dO_j . out_j - dW_j . U_j, in fp32.
    do = _rows(do_base, sdt, offs_n, offs_d, T).to(tl.float32)
    o = _rows(_head(O, b, h, sob, soh), sot, offs_n, offs_d, T).to(tl.float32)
    u = _rows(_head(U, b, h, sub, suh), sut, offs_n, offs_d, T).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * T + offs_n, tl.sum(do * o - dw * u, 1), mask=offs_n < T)
    _put(_head(X, b, h, sxb, sxh), sxt, 2.0 * do - dw, offs_n, offs_d, T)


@triton.jit
def _dkdv_tiles(dk, dv, k, kT, v, u, q_base, do_base, x_base, dq_base, LSE, DELTA, bh, sqt, sdt, sxt, offs_n, offs_d,
                lo, hi, T, qk_scale, sm_scale, BLOCK_M: tl.constexpr, PRECISION: tl.constexpr,
                MASKED: tl.constexpr, FUSE_DQ: tl.constexpr):  # fmt: skip
    for start_m in tl.range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = _rows(q_base, sqt, offs_m, offs_d, T)
        doT = _cols(do_base, sdt, offs_m, offs_d, T)
        x = _rows(x_base, sxt, offs_m, offs_d, T)
        delta = tl.load(DELTA + bh.to(tl.int64) * T + offs_m, mask=offs_m < T, other=0.0)
        # q and x are each needed both ways: tl.trans of a loaded tile reads its buffer transposed.
        pT = tl.exp2(tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale - _lse(LSE, bh, offs_m, T)[None, :])
        if MASKED:
            pT = tl.where(offs_n[:, None] <= offs_m[None, :], pT, 0.0)
        dv += tl.dot(pT.to(x.dtype), x, input_precision=PRECISION)
        dpT = tl.dot(v, tl.trans(x), input_precision=PRECISION) - tl.dot(u, doT, input_precision=PRECISION)
        dsT = (pT * (dpT - delta[None, :])).to(q.dtype)
        dk += tl.dot(dsT, q, input_precision=PRECISION)
        if FUSE_DQ:
            dqT = tl.dot(kT, dsT, input_precision=PRECISION) * sm_scale
            tl.atomic_add(
                dq_base + offs_m[None, :] * sxt + offs_d[:, None], dqT, mask=offs_m[None, :] < T, sem="relaxed"
            )
    return dk, dv


@autotuned("_bwd_dkdv", reset_to_zero=["DQ32"])
@triton.jit
def _bwd_dkdv(Q, K, V, U, DO, X, LSE, DELTA, DK, DV, DQ32, sqb, sqh, sqt, skb, skh, skt, svb, svh, svt,
              sub, suh, sut, sdb, sdh, sdt, sxb, sxh, sxt, syb, syh, syt, H, GROUP, T, TK, qk_scale, sm_scale,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, PRECISION: tl.constexpr,
              FUSE_DQ: tl.constexpr):  # fmt: skip
    """dK and dV of one key block of one kv head, summed over the GROUP query heads that read it.

    X and DQ32 (query heads) share one contiguous layout (sx*), DK and DV (kv heads) another (sy*).
    With FUSE_DQ the atomics sum each query block's dQ over key blocks in a varying order; programs
    of other kv heads never touch this group's dQ.
    """
    bkh, start_n = tl.program_id(0), tl.program_id(1) * BLOCK_N
    HKV = H // GROUP
    b, kh = bkh // HKV, bkh % HKV
    offs_n, offs_d = start_n + tl.arange(0, BLOCK_N), tl.arange(0, D)
    k_base = _head(K, b, kh, skb, skh)
    k = _rows(k_base, skt, offs_n, offs_d, T)
    kT = _cols(k_base, skt, offs_n, offs_d, T)  # the A of dQ^T: loaded once, transposed
    v = _rows(_head(V, b, kh, svb, svh), svt, offs_n, offs_d, T)
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)
    for g in tl.range(0, GROUP):  # K and V stay resident across the group; U is per query head
        h = kh * GROUP + g
        bh = b * H + h
        u = _rows(_head(U, b, h, sub, suh), sut, offs_n, offs_d, T)
        q_base, do_base = _head(Q, b, h, sqb, sqh), _head(DO, b, h, sdb, sdh)
        x_base, dq_base = _head(X, b, h, sxb, sxh), _head(DQ32, b, h, sxb, sxh)
        dk, dv = _dkdv_tiles(dk, dv, k, kT, v, u, q_base, do_base, x_base, dq_base, LSE, DELTA, bh, sqt, sdt, sxt,
                             offs_n, offs_d, start_n, start_n + BLOCK_N, T, qk_scale, sm_scale, BLOCK_M, PRECISION,
                             True, FUSE_DQ)  # fmt: skip
        dk, dv = _dkdv_tiles(dk, dv, k, kT, v, u, q_base, do_base, x_base, dq_base, LSE, DELTA, bh, sqt, sdt, sxt,
                             offs_n, offs_d, start_n + BLOCK_N, T, T, qk_scale, sm_scale, BLOCK_M, PRECISION,
                             False, FUSE_DQ)  # fmt: skip
    _put(_head(DV, b, kh, syb, syh), syt, dv, offs_n, offs_d, T)
    _put(_head(DK, b, kh, syb, syh), syt, dk * sm_scale, offs_n, offs_d, T)


@triton.jit
def _dq_tiles(dq, q, neg_do, x, lse, delta, k_base, v_base, u_base, skt, svt, sut, offs_m, offs_d, lo, hi, T, qk_scale,
              BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, MASKED: tl.constexpr):  # fmt: skip
    for start_n in tl.range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _rows(k_base, skt, offs_n, offs_d, T)
        vT = _cols(v_base, svt, offs_n, offs_d, T)
        uT = _cols(u_base, sut, offs_n, offs_d, T)
        p = tl.exp2(tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale - lse[:, None])
        if MASKED:
            p = tl.where(offs_m[:, None] >= offs_n[None, :], p, 0.0)
        dp = tl.dot(neg_do, uT, tl.dot(x, vT, input_precision=PRECISION), input_precision=PRECISION)
        dq += tl.dot((p * (dp - delta[:, None])).to(k.dtype), k, input_precision=PRECISION)
    return dq


@autotuned("_bwd_dq")
@triton.jit
def _bwd_dq(Q, K, V, U, DO, X, LSE, DELTA, DQ, sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sub, suh, sut,
            sdb, sdh, sdt, sxb, sxh, sxt, H, GROUP, T, TK, qk_scale, sm_scale,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, PRECISION: tl.constexpr):  # fmt: skip
    """dQ of one query block, in a fixed order (X and DQ share the contiguous layout sx*)."""
    bh, start_m = tl.program_id(0), _query_block(BLOCK_M)
    b, h = bh // H, bh % H
    offs_m, offs_d = start_m + tl.arange(0, BLOCK_M), tl.arange(0, D)
    k_base, v_base = _head(K, b, h // GROUP, skb, skh), _head(V, b, h // GROUP, svb, svh)
    u_base = _head(U, b, h, sub, suh)
    q = _rows(_head(Q, b, h, sqb, sqh), sqt, offs_m, offs_d, T)
    neg_do = -_rows(_head(DO, b, h, sdb, sdh), sdt, offs_m, offs_d, T)  # dP = X V^T - dO U^T as one chain
    x = _rows(_head(X, b, h, sxb, sxh), sxt, offs_m, offs_d, T)
    lse = _lse(LSE, bh, offs_m, T)
    delta = tl.load(DELTA + bh.to(tl.int64) * T + offs_m, mask=offs_m < T, other=0.0)
    dq = tl.zeros([BLOCK_M, D], tl.float32)
    dq = _dq_tiles(dq, q, neg_do, x, lse, delta, k_base, v_base, u_base, skt, svt, sut, offs_m, offs_d, 0, start_m, T,
                   qk_scale, BLOCK_N, PRECISION, False)  # fmt: skip
    dq = _dq_tiles(dq, q, neg_do, x, lse, delta, k_base, v_base, u_base, skt, svt, sut, offs_m, offs_d, start_m,
                   start_m + BLOCK_M, T, qk_scale, BLOCK_N, PRECISION, True)  # fmt: skip
    _put(_head(DQ, b, h, sxb, sxh), sxt, dq * sm_scale, offs_m, offs_d, T)
