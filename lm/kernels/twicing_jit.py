"""The Triton programs of fused causal twicing attention: out = A (2V - U), U = A V, one A for both passes.

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

Grouped-query attention: Q has Hq heads, K and V have Hkv, and query head h reads kv head
h // GROUP (GROUP = Hq / Hkv) through that head's own base pointer and strides; K and V are never
repeated. U, out, dW, L and delta are per query head. dK and dV of a kv head are sums over its
GROUP query heads, so their program for a kv head loops over the group, accumulating in registers:
no (batch, Hq, T, D) partials and no atomics. With GROUP = 1 every program computes what it did
before GQA, in the same order.

Tile shapes are autotuned per (T, D, precision): query-major programs (one query block each) and
key-major ones (one key block each). lm.kernels.twicing_triton launches them as a torch op.
"""

import os

import triton
import triton.language as tl

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


# The kernels' signatures list each tensor's pointer with its strides, grouped on one line where
# they fit; `# fmt: skip` keeps the formatter from giving every argument a line of its own.


@triton.jit
def _tile(base, b, h, sb, sh, st, offs_t, offs_d, T):
    """A (rows, D) tile of a (batch, heads, time, D) tensor; rows past T read as zero."""
    ptrs = (
        base + b.to(tl.int64) * sb + h.to(tl.int64) * sh + offs_t[:, None] * st + offs_d[None, :]
    )  # no int32 overflow
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
def _pass1_fwd(Q, K, V, U, LSE, sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sub, suh, sut, H, GROUP, T,
               qk_scale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
               PRECISION: tl.constexpr):  # fmt: skip
    start_m, bh = tl.program_id(0) * BLOCK_M, tl.program_id(1)
    b, h = bh // H, bh % H
    kh = h // GROUP  # the kv head this query head reads
    offs_m, offs_d = start_m + tl.arange(0, BLOCK_M), tl.arange(0, D)
    q = _tile(Q, b, h, sqb, sqh, sqt, offs_m, offs_d, T)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    # Key blocks left of the diagonal need no mask; those on it do.
    for start_n in tl.range(0, start_m + BLOCK_M, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _tile(K, b, kh, skb, skh, skt, offs_n, offs_d, T)
        v = _tile(V, b, kh, svb, svh, svt, offs_n, offs_d, T)
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
def _pass2_fwd(Q, K, V, U, LSE, O, sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sub, suh, sut, sob, soh, sot, H,
               GROUP, T, qk_scale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
               PRECISION: tl.constexpr):  # fmt: skip
    start_m, bh = tl.program_id(0) * BLOCK_M, tl.program_id(1)
    b, h = bh // H, bh % H
    kh = h // GROUP  # the kv head this query head reads
    offs_m, offs_d = start_m + tl.arange(0, BLOCK_M), tl.arange(0, D)
    q = _tile(Q, b, h, sqb, sqh, sqt, offs_m, offs_d, T)
    lse = tl.load(LSE + bh * T + offs_m, mask=offs_m < T, other=0.0)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for start_n in tl.range(0, start_m + BLOCK_M, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _tile(K, b, kh, skb, skh, skt, offs_n, offs_d, T)
        v = _tile(V, b, kh, svb, svh, svt, offs_n, offs_d, T)
        u = _tile(U, b, h, sub, suh, sut, offs_n, offs_d, T)
        w = (2.0 * v.to(tl.float32) - u.to(tl.float32)).to(v.dtype)
        p = _probs(q, k, lse, offs_m, offs_n, qk_scale, True, PRECISION)
        acc += tl.dot(p.to(v.dtype), w, input_precision=PRECISION)
    _put(O, acc, b, h, sob, soh, sot, offs_m, offs_d, T)


@triton.autotune(KEY_MAJOR, key=["T", "D", "PRECISION"])
@triton.jit
def _bwd_dw(Q, K, DO, LSE, DW, sqb, sqh, sqt, skb, skh, skt, sdb, sdh, sdt, swb, swh, swt, H, GROUP, T, qk_scale,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, PRECISION: tl.constexpr):  # fmt: skip
    """dW = P^T dO, one key block per program, over the query blocks that see it."""
    start_n, bh = tl.program_id(0) * BLOCK_N, tl.program_id(1)
    b, h = bh // H, bh % H
    offs_n, offs_d = start_n + tl.arange(0, BLOCK_N), tl.arange(0, D)
    k = _tile(K, b, h // GROUP, skb, skh, skt, offs_n, offs_d, T)  # this query head's kv head
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
               BLOCK_M: tl.constexpr, D: tl.constexpr):  # fmt: skip
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
              sdb, sdh, sdt, sxb, sxh, sxt, syb, syh, syt, H, GROUP, T, qk_scale, sm_scale,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, PRECISION: tl.constexpr,
              FUSE_DQ: tl.constexpr):  # fmt: skip
    """dK and dV of one key block of one kv head, summed over the GROUP query heads that read it.

    DW and DQ32 (query heads) share one contiguous layout (sx*), DK and DV (kv heads) another (sy*).
    With FUSE_DQ, each tile's share of dQ is also added into the fp32 buffer DQ32 atomically, which
    saves `_bwd_dq` recomputing P and dP, at the price of a summation order that varies run to run.
    Programs of other kv heads never touch this group's dQ; the atomics are for its other key blocks.
    """
    start_n, bkh = tl.program_id(0) * BLOCK_N, tl.program_id(1)
    HKV = H // GROUP
    b, kh = bkh // HKV, bkh % HKV
    offs_n, offs_d = start_n + tl.arange(0, BLOCK_N), tl.arange(0, D)
    k = _tile(K, b, kh, skb, skh, skt, offs_n, offs_d, T)
    v = _tile(V, b, kh, svb, svh, svt, offs_n, offs_d, T)
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)
    # K and V stay in registers across the group; each query head brings its own U, so its own W.
    for g in tl.range(0, GROUP):
        h = kh * GROUP + g
        bh = b * H + h
        u = _tile(U, b, h, sub, suh, sut, offs_n, offs_d, T)
        w = (2.0 * v.to(tl.float32) - u.to(tl.float32)).to(v.dtype)
        for start_m in tl.range(start_n, T, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            q = _tile(Q, b, h, sqb, sqh, sqt, offs_m, offs_d, T)
            do = _tile(DO, b, h, sdb, sdh, sdt, offs_m, offs_d, T)
            du = (-_tile(DW, b, h, sxb, sxh, sxt, offs_m, offs_d, T)).to(do.dtype)
            lse = tl.load(LSE + bh * T + offs_m, mask=offs_m < T, other=0.0)
            delta = tl.load(DELTA + bh * T + offs_m, mask=offs_m < T, other=0.0)
            p = _probs(q, k, lse, offs_m, offs_n, qk_scale, start_m < start_n + BLOCK_N, PRECISION)
            dp = tl.dot(do, tl.trans(w), input_precision=PRECISION)
            dp += tl.dot(du, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dv += tl.dot(tl.trans(p.to(du.dtype)), du, input_precision=PRECISION)
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
            if FUSE_DQ:
                dq = tl.dot(ds.to(k.dtype), k, input_precision=PRECISION) * sm_scale
                ptrs = DQ32 + b.to(tl.int64) * sxb + h.to(tl.int64) * sxh + offs_m[:, None] * sxt + offs_d[None, :]
                tl.atomic_add(ptrs, dq, mask=offs_m[:, None] < T, sem="relaxed")
        # This head's 2 dW after its P^T dU terms: with GROUP = 1, the order of the pre-GQA kernel.
        dv += 2.0 * _tile(DW, b, h, sxb, sxh, sxt, offs_n, offs_d, T).to(tl.float32)
    _put(DV, dv, b, kh, syb, syh, syt, offs_n, offs_d, T)
    _put(DK, dk * sm_scale, b, kh, syb, syh, syt, offs_n, offs_d, T)


@triton.autotune(QUERY_MAJOR, key=["T", "D", "PRECISION"])
@triton.jit
def _bwd_dq(Q, K, V, U, DO, DW, LSE, DELTA, DQ, sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sub, suh, sut,
            sdb, sdh, sdt, sxb, sxh, sxt, H, GROUP, T, qk_scale, sm_scale,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, PRECISION: tl.constexpr):  # fmt: skip
    """dQ of one query block. DW and DQ share the contiguous layout (sx*)."""
    start_m, bh = tl.program_id(0) * BLOCK_M, tl.program_id(1)
    b, h = bh // H, bh % H
    kh = h // GROUP  # the kv head this query head reads
    offs_m, offs_d = start_m + tl.arange(0, BLOCK_M), tl.arange(0, D)
    q = _tile(Q, b, h, sqb, sqh, sqt, offs_m, offs_d, T)
    do = _tile(DO, b, h, sdb, sdh, sdt, offs_m, offs_d, T)
    du = (-_tile(DW, b, h, sxb, sxh, sxt, offs_m, offs_d, T)).to(do.dtype)
    lse = tl.load(LSE + bh * T + offs_m, mask=offs_m < T, other=0.0)
    delta = tl.load(DELTA + bh * T + offs_m, mask=offs_m < T, other=0.0)
    dq = tl.zeros([BLOCK_M, D], tl.float32)
    for start_n in tl.range(0, start_m + BLOCK_M, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _tile(K, b, kh, skb, skh, skt, offs_n, offs_d, T)
        v = _tile(V, b, kh, svb, svh, svt, offs_n, offs_d, T)
        u = _tile(U, b, h, sub, suh, sut, offs_n, offs_d, T)
        w = (2.0 * v.to(tl.float32) - u.to(tl.float32)).to(v.dtype)
        p = _probs(q, k, lse, offs_m, offs_n, qk_scale, start_n + BLOCK_N > start_m, PRECISION)
        dp = tl.dot(do, tl.trans(w), input_precision=PRECISION) + tl.dot(du, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    _put(DQ, dq * sm_scale, b, h, sxb, sxh, sxt, offs_m, offs_d, T)


# The programs of each tiling, whose autotune configurations the tests narrow.
QUERY_MAJOR_KERNELS = (_pass1_fwd, _pass2_fwd, _bwd_dq)
KEY_MAJOR_KERNELS = (_bwd_dw, _bwd_dkdv)
