"""The Triton programs of the twicing forward, the helpers every program shares, and the tilings.

Forward, two launches (pass 2 needs every row of U, which pass 1 writes):
  1. flash attention with online softmax: U = A V and each row's log-sum-exp L (base 2);
  2. out_i = sum_j exp2(S_ij - L_i) (2 V_j - U_j): the probabilities are final at once (L is
     known), so there is no running max or rescaling, and W = 2V - U is formed in registers.
The backward programs are in lm.kernels.twicing_bwd_jit; lm.kernels.twicing_triton launches both
as a torch op and counts their FLOPs and bytes.

Layout rules, for Hopper's wgmma (M >= 64 rows per warp group, B from shared memory) and Ampere's
mma.sync alike:
  - query-major programs (one query block each: both forward passes, the deterministic dQ) have
    BLOCK_M >= 64 query rows, the M of every dot; key-major ones (dW, dK/dV) have BLOCK_N >= 64
    key rows and compute transposed tiles (S^T = K Q^T), so their M is BLOCK_N or D;
  - an operand that is needed transposed is loaded transposed (`_cols`) or, where the same tile is
    needed both ways, transposed as it is read from shared memory (tl.trans of a loaded tile is a
    view of the buffer); no computed tile is ever transposed;
  - the diagonal tiles, the only ones that need the causal mask, run in a loop of their own
    (MASKED, a compile-time flag); the others run unmasked;
  - query-major programs launch the longest rows first (the last query block is the heaviest);
    key-major ones already do (key block 0 meets every query); batch x heads is grid axis 0,
    which allows 2^31 - 1 programs where axis 1 allows 65535.

GQA: query head h reads kv head h // GROUP through that head's own base pointer; K and V are never
repeated.
"""

import os

import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# Head sizes the kernel takes on a GPU: those the compile check (benchmarks/kernel_compile_check.py)
# proves fit sm_90a and sm_80; the interpreter also runs the small ones the tests use.
GPU_HEAD_DIMS = (64, 128)
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128) if INTERPRETED else GPU_HEAD_DIMS

# Tile shapes (BLOCK_M query rows, BLOCK_N key rows, warps, pipeline stages) the autotuner picks
# from on a GPU, per program and head size: the ones that compile for sm_90a and sm_80 within
# shared memory and without register spills (the compile check holds them to it). Query-major
# programs have BLOCK_M a multiple of BLOCK_N (the diagonal is whole key blocks), key-major ones
# the reverse. Under torch.use_deterministic_algorithms the first shape that fits is the one used,
# so that every run sums in the same order; `_bwd_dq` runs only then. The interpreter, whose time
# goes per tile rather than per element, gets one small shape per tiling.
SHAPES = {
    "_pass1_fwd": {64: ((128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3), (64, 32, 4, 2)),
                   128: ((64, 64, 4, 2), (64, 64, 4, 3), (64, 32, 4, 2))},
    "_pass2_fwd": {64: ((128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 2)),
                   128: ((64, 64, 4, 2), (64, 32, 4, 2))},
    "_bwd_dw": {64: ((32, 128, 8, 2), (64, 128, 8, 2), (64, 64, 8, 2), (32, 64, 4, 2)),
                128: ((32, 64, 8, 2), (64, 64, 8, 2))},
    # 16 query rows per step keep dK, dV and the dQ atomics' pointers within 255 registers.
    "_bwd_dkdv": {64: ((16, 128, 8, 2), (16, 64, 8, 3), (16, 64, 4, 2)), 128: ((16, 64, 8, 2),)},
    "_bwd_dq": {64: ((64, 32, 4, 2),), 128: ((64, 32, 4, 2),)},
}  # fmt: skip
INTERPRETER_SHAPES = {"query": (32, 16, 4, 1), "key": (16, 32, 4, 1)}
KEY_MAJOR_NAMES = ("_bwd_dw", "_bwd_dkdv")

# What each program keeps in shared memory, in (rows x D) tiles of the input dtype: the rows and
# count of its resident tiles, the rows and count of tiles streamed per pipeline stage, and the
# computed tiles it stages for a dot every iteration, as (rows, columns).
SMEM_TILES = {
    "_pass1_fwd": ("M", 1, "N", 2, ()),
    "_pass2_fwd": ("M", 1, "N", 3, (("N", "D"),)),  # W = 2V - U, the B of P W
    "_bwd_dw": ("N", 1, "M", 2, ()),
    "_bwd_dkdv": ("N", 4, "M", 3, (("N", "M"),)),  # dS^T, the B of dQ^T = K^T dS^T
    "_bwd_dq": ("M", 3, "N", 3, ()),
}


def shared_memory_estimate(kernel: str, block_m: int, block_n: int, stages: int, d: int, elem: int = 2) -> int:
    """Bytes of shared memory `kernel` needs with this tiling: its tiles, plus an fp32 (rows x D)
    tile of scratch for layout conversions. An upper bound: the compile check holds it to that."""
    rows = {"M": block_m, "N": block_n, "D": d}
    res_rows, res, str_rows, streamed, staged = SMEM_TILES[kernel]
    tiles = rows[res_rows] * d * res + stages * rows[str_rows] * d * streamed
    tiles += sum(rows[a] * rows[b] for a, b in staged)
    return tiles * elem + 4 * d * max(block_m, block_n)


def shared_memory_limit() -> int | None:
    """This GPU's shared memory per program (opt-in), or None where nothing limits it."""
    if INTERPRETED:
        return None
    import torch  # only on a GPU: the compile check imports this module where torch is absent

    return torch.cuda.get_device_properties(torch.cuda.current_device()).shared_memory_per_block_optin


def takes(kernel: str, config: triton.Config, d: int, limit: int | None) -> bool:
    """Whether `config` is one of `kernel`'s shapes for head size d and fits `limit` bytes."""
    dims = getattr(config, "head_dims", None)  # None: a shape the tests set, for any head size
    m, n = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    fits = limit is None or shared_memory_estimate(kernel, m, n, config.num_stages, d) <= limit
    return (dims is None or d in dims) and fits


def pruner(kernel: str):
    """The autotuner's early prune: `kernel`'s shapes for this head size that fit this GPU."""

    def prune(configs, named_args, **kwargs):
        limit = shared_memory_limit()
        kept = [c for c in configs if takes(kernel, c, kwargs["D"], limit)]
        return kept or configs[:1]  # never empty: the smallest failure is the clearest

    return prune


def tile_configs(shapes) -> list[triton.Config]:
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st) for m, n, w, st in shapes]


def kernel_configs(kernel: str) -> list[triton.Config]:
    """`kernel`'s autotune configurations, each marked with the head sizes it is for."""
    if INTERPRETED:
        return tile_configs([INTERPRETER_SHAPES["key" if kernel in KEY_MAJOR_NAMES else "query"]])
    dims: dict[tuple, list[int]] = {}
    for d, shapes in SHAPES[kernel].items():
        for shape in shapes:
            dims.setdefault(shape, []).append(d)
    configs = tile_configs(dims)
    for config, shape in zip(configs, dims):
        config.head_dims = tuple(dims[shape])
    return configs


def autotuned(kernel: str, **kwargs):
    """Autotune `kernel` over its shapes, keyed on the power-of-two bucket of T (TK), D and the
    precision, so that a new length re-tunes only when it doubles; pruned to what fits first."""
    return triton.autotune(
        kernel_configs(kernel),
        key=["TK", "D", "PRECISION"],
        prune_configs_by={"early_config_prune": pruner(kernel)},
        **kwargs,
    )


# --------------------------------------------------------------------------- shared helpers
# A tensor is addressed by its (batch, head) base pointer and time stride; the head dim is dense.


@triton.jit
def _head(base, b, h, sb, sh):
    """The base pointer of head h of batch b (64-bit offsets: no int32 overflow)."""
    return base + b.to(tl.int64) * sb + h.to(tl.int64) * sh


@triton.jit
def _rows(base, st, offs_t, offs_d, T):
    """A (rows, D) tile; rows past T read as zero."""
    return tl.load(base + offs_t[:, None] * st + offs_d[None, :], mask=offs_t[:, None] < T, other=0.0)


@triton.jit
def _cols(base, st, offs_t, offs_d, T):
    """The same tile loaded transposed, (D, rows): the operand of a dot that wants it so."""
    return tl.load(base + offs_t[None, :] * st + offs_d[:, None], mask=offs_t[None, :] < T, other=0.0)


@triton.jit
def _put(base, st, value, offs_t, offs_d, T):
    tl.store(base + offs_t[:, None] * st + offs_d[None, :], value.to(base.dtype.element_ty), mask=offs_t[:, None] < T)


@triton.jit
def _lse(LSE, bh, offs, T):
    """Log-sum-exps of some rows; +inf past T, so that those rows' probabilities are exactly 0."""
    return tl.load(LSE + bh.to(tl.int64) * T + offs, mask=offs < T, other=float("inf"))


@triton.jit
def _query_block(BLOCK_M: tl.constexpr):
    """This query-major program's first row: the last (heaviest) query block first."""
    return (tl.num_programs(1) - 1 - tl.program_id(1)) * BLOCK_M


# --------------------------------------------------------------------------- forward


@triton.jit
def _pass1_tiles(acc, m_i, l_i, q, k_base, v_base, skt, svt, offs_m, offs_d, lo, hi, T, qk_scale,
                 BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, MASKED: tl.constexpr):  # fmt: skip
    for start_n in tl.range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kT = _cols(k_base, skt, offs_n, offs_d, T)
        v = _rows(v_base, svt, offs_n, offs_d, T)
        s = tl.dot(q, kT, input_precision=PRECISION) * qk_scale
        if MASKED:
            s = tl.where(offs_m[:, None] >= offs_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@autotuned("_pass1_fwd")
@triton.jit
def _pass1_fwd(Q, K, V, U, LSE, sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sub, suh, sut, H, GROUP, T, TK,
               qk_scale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
               PRECISION: tl.constexpr):  # fmt: skip
    """U and L of one query block: flash attention's forward."""
    bh, start_m = tl.program_id(0), _query_block(BLOCK_M)
    b, h = bh // H, bh % H
    offs_m, offs_d = start_m + tl.arange(0, BLOCK_M), tl.arange(0, D)
    k_base, v_base = _head(K, b, h // GROUP, skb, skh), _head(V, b, h // GROUP, svb, svh)
    q = _rows(_head(Q, b, h, sqb, sqh), sqt, offs_m, offs_d, T)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    acc, m_i, l_i = _pass1_tiles(acc, m_i, l_i, q, k_base, v_base, skt, svt, offs_m, offs_d, 0, start_m, T,
                                 qk_scale, BLOCK_N, PRECISION, False)  # fmt: skip
    acc, m_i, l_i = _pass1_tiles(acc, m_i, l_i, q, k_base, v_base, skt, svt, offs_m, offs_d, start_m,
                                 start_m + BLOCK_M, T, qk_scale, BLOCK_N, PRECISION, True)  # fmt: skip
    _put(_head(U, b, h, sub, suh), sut, acc / l_i[:, None], offs_m, offs_d, T)
    tl.store(LSE + bh.to(tl.int64) * T + offs_m, m_i + tl.log2(l_i), mask=offs_m < T)


@triton.jit
def _pass2_tiles(acc, q, lse, k_base, v_base, u_base, skt, svt, sut, offs_m, offs_d, lo, hi, T, qk_scale,
                 BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, MASKED: tl.constexpr):  # fmt: skip
    for start_n in tl.range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kT = _cols(k_base, skt, offs_n, offs_d, T)
        v = _rows(v_base, svt, offs_n, offs_d, T)
        u = _rows(u_base, sut, offs_n, offs_d, T)
        w = (2.0 * v.to(tl.float32) - u.to(tl.float32)).to(v.dtype)
        p = tl.exp2(tl.dot(q, kT, input_precision=PRECISION) * qk_scale - lse[:, None])
        if MASKED:
            p = tl.where(offs_m[:, None] >= offs_n[None, :], p, 0.0)
        acc += tl.dot(p.to(v.dtype), w, input_precision=PRECISION)
    return acc


@autotuned("_pass2_fwd")
@triton.jit
def _pass2_fwd(Q, K, V, U, LSE, O, sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sub, suh, sut, sob, soh, sot, H,
               GROUP, T, TK, qk_scale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
               PRECISION: tl.constexpr):  # fmt: skip
    """out = A (2V - U) of one query block, with A's normaliser L from pass 1."""
    bh, start_m = tl.program_id(0), _query_block(BLOCK_M)
    b, h = bh // H, bh % H
    offs_m, offs_d = start_m + tl.arange(0, BLOCK_M), tl.arange(0, D)
    k_base, v_base = _head(K, b, h // GROUP, skb, skh), _head(V, b, h // GROUP, svb, svh)
    u_base = _head(U, b, h, sub, suh)
    q = _rows(_head(Q, b, h, sqb, sqh), sqt, offs_m, offs_d, T)
    lse = _lse(LSE, bh, offs_m, T)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    acc = _pass2_tiles(acc, q, lse, k_base, v_base, u_base, skt, svt, sut, offs_m, offs_d, 0, start_m, T, qk_scale,
                       BLOCK_N, PRECISION, False)  # fmt: skip
    acc = _pass2_tiles(acc, q, lse, k_base, v_base, u_base, skt, svt, sut, offs_m, offs_d, start_m, start_m + BLOCK_M,
                       T, qk_scale, BLOCK_N, PRECISION, True)  # fmt: skip
    _put(_head(O, b, h, sob, soh), sot, acc, offs_m, offs_d, T)
