"""Ring context parallelism for softmax and twicing attention: the math of the rings, in one process.

Context parallelism splits one sequence of T tokens over N ranks. Rank i keeps the queries Q_i of
its chunk of positions; the key/value chunks travel round the ring, one hop a step, so after N steps
every rank has met every chunk, and no score block is larger than T_i x T_j (Liu, Zaharia & Abbeel,
"Ring Attention with Blockwise Transformers", 2023). Here are the per-chunk steps a ring runs on
each chunk it receives (`attend_block`, `merge_block`, `reattend_block`, `attend_block_backward`),
and single-process drivers (`ring_softmax_attention`, `ring_twicing_attention`) that walk the same
rings over a list of chunks, indexing the list where a ring over a process group sends and receives.

Notation. Chunk i has global positions p_i (any set: chunks need not be contiguous). For a chunk
pair, S_ij = Q_i K_j^T / sqrt(d), with -inf where the key's position is after the query's: the causal
mask is by global position. lse_i = log sum_j sum_keys exp(S_ij) is the log-sum-exp of query row i
over the whole sequence, and A_ij = exp(S_ij - lse_i) is block (i, j) of the attention matrix A.

Ring 1: U = A V (softmax attention, and twicing's first pass). Block (i, j) alone gives O_ij, its
rows normalised within the block, and lse_ij; two partial results of a row merge as

    lse = logaddexp(lse_a, lse_b),    O = exp(lse_a - lse) O_a + exp(lse_b - lse) O_b,

which exponentiates nothing positive (flash attention's running max, carried as the lse). A block
whose keys are all after all its queries is skipped; the others are cut to the queries that see any
of its keys and the keys any of its queries sees (`visible_part`), and a row left out has
lse_ij = -inf and weight 0; a block whose keys are all before its queries needs no mask.

Ring 2: out = (2A - A^2) V = A W with W = 2V - U. Row block j of W needs only row block j of U,
which rank j holds once ring 1 is done, so ring 2 passes (K_j, W_j) and sums out_i = sum_j A_ij W_j.
Both passes use the same A (same Q, K and mask), so ring 1's lse_i already normalises it:
A_ij = exp(S_ij - lse_i) per block, a plain sum with no running max and no merge. Under grouped-query
attention K_j has the kv heads but W_j the query heads, as U does.

Backward. For one pass O = A X (X = V or W) with upstream gradient G, block by block:

    dX_j += A_ij^T G_i,    dS_ij = A_ij * (G_i X_j^T - delta_i),    delta_i = rowsum(G_i * O_i),
    dQ_i += dS_ij K_j / sqrt(d),    dK_j += dS_ij^T Q_i / sqrt(d).

delta_i = sum_j A_ij (G_i . X_j) = G_i . O_i: the softmax Jacobian needs the output only, so A_ij
is recomputed per block from the saved lse_i and never held for the whole sequence. Twicing's
backward runs the rings in reverse order:

  1. ring 2 backward: X = W, G = dOut, delta2_i = rowsum(dOut_i * out_i). (K_j, W_j) travel with
     their accumulators dK_j and dW_j = sum_i A_ij^T dOut_i, which is complete, and home on rank j,
     only when the ring has gone all the way round.
  2. W = 2V - U: dV_j = 2 dW_j (summed over each kv head's group under GQA) and dU_j = -dW_j. U_j is
     ring 1's output for query chunk j, so dU_j is an upstream gradient of pass 1: it must flow
     back through A as well, and only rank j has it, once step 1 is over everywhere.
  3. ring 1 backward: X = V, G = dU_i, delta1_i = rowsum(dU_i * U_i). (K_j, V_j) travel with dK_j
     (going on from step 1) and dV_j (starting from 2 dW_j).

dQ_i and dK_j sum both rings' terms, since S feeds both passes. The rings cannot merge into one:
ring 1's upstream gradient dU_i = -dW_i sums dOut over every query chunk that sees chunk i. Each
rank saves Q_i, K_i, V_i, U_i, out_i and lse_i; the backward recomputes only the score blocks.

Communication per layer and rank, chunks of C = T/N tokens, H query and H_kv kv heads of size d;
each ring makes N - 1 hops (a backward's gradient accumulators one more, to get home):

    softmax forward    K, V                    2 H_kv C d a hop
    twicing forward    K, V, then K, W         (3 H_kv + H) C d: 2x softmax with H_kv = H
    softmax backward   K, V, dK, dV            4 H_kv C d
    twicing backward   K, W, dK, dW, then      (6 H_kv + 2 H) C d: 2x softmax with H_kv = H
                       K, V, dK, dV

Under GQA ring 2 costs more than ring 1, since W has a row per query head. Ring 2 cannot start
before ring 1 ends on rank j (W_j needs all of U_j), nor ring 1's backward before ring 2's.

Load balance. Under the causal mask, contiguous chunks give rank N-1 N blocks to compute and rank 0
one (about 2N-1 times the visible (query, key) pairs).
Zigzag chunking (`zigzag_positions`) cuts T into 2N equal pieces and gives rank r pieces r and
2N-1-r, an early and a late one: every rank then has the same number of visible (query, key) pairs,
and computes the same score blocks, C x C on the diagonal and C x C/2 off it, C = T/N.

Over a process group (lm.parallel.ring_group), each step of `ring_steps` becomes a send of the
held chunk to rank i + 1 and a receive from rank i - 1, overlapped with that step's block; the
backward's dK_j, dX_j travel one step behind their chunk and make one last hop home. Its module
docstring has the rest: the hops' order, the memory held, and bf16.
"""

import math

import torch
from torch.autograd.function import once_differentiable

NEG_INF = float("-inf")


# --------------------------------------------------------------------------- zigzag chunking


def zigzag_positions(seq_len: int, n: int) -> list[torch.Tensor]:
    """The global positions of each of n ranks: pieces r and 2n-1-r of 2n equal pieces of the sequence."""
    if n < 1 or seq_len % (2 * n):
        raise ValueError(f"zigzag chunking over {n} ranks needs a sequence length divisible by {2 * n}, not {seq_len}")
    pieces = torch.arange(seq_len).view(2 * n, seq_len // (2 * n))
    return [torch.cat([pieces[r], pieces[2 * n - 1 - r]]) for r in range(n)]


def split_chunks(x: torch.Tensor, positions: list[torch.Tensor], dim: int = -2) -> list[torch.Tensor]:
    """Each rank's chunk of x: the entries at its positions along dim (time)."""
    return [x.index_select(dim, p) for p in positions]


def merge_chunks(chunks: list[torch.Tensor], positions: list[torch.Tensor], dim: int = -2) -> torch.Tensor:
    """The inverse of `split_chunks`: the ranks' chunks back in sequence order."""
    order = torch.cat(positions)
    return torch.cat(chunks, dim=dim).index_select(dim, torch.argsort(order))


def zigzag_split(x: torch.Tensor, n: int, dim: int = -2) -> list[torch.Tensor]:
    """The zigzag chunks of x for n ranks (rank r's is pieces r and 2n-1-r, in that order)."""
    return split_chunks(x, zigzag_positions(x.size(dim), n), dim)


def zigzag_merge(chunks: list[torch.Tensor], dim: int = -2) -> torch.Tensor:
    """The inverse of `zigzag_split`: n ranks' zigzag chunks back in sequence order."""
    seq_len = sum(c.size(dim) for c in chunks)
    return merge_chunks(chunks, zigzag_positions(seq_len, len(chunks)), dim)


# --------------------------------------------------------------------------- one chunk pair


def visible_part(q_pos: torch.Tensor, k_pos: torch.Tensor):
    """The rows of a chunk pair that see any key and the columns any query sees, as (rows, cols),
    each a slice where it is a run of the chunk, else an index tensor; None when no query sees any
    key. Under zigzag a pair off the diagonal is half a block: the early piece of the keys (j < i)
    or the late piece of the queries (j > i), which is what evens out the ranks' work."""
    if k_pos.min() > q_pos.max():
        return None
    return _as_slice(q_pos >= k_pos.min()), _as_slice(k_pos <= q_pos.max())


def _as_slice(keep: torch.Tensor):
    index = keep.nonzero().squeeze(1)
    first, last = int(index[0]), int(index[-1])
    return slice(first, last + 1) if last - first + 1 == index.numel() else index  # a slice is a view


def _padded(part: torch.Tensor, rows, size: int, fill: float) -> torch.Tensor:
    """(..., n, D) results of the visible rows as (..., size, D), `fill` in the rows not computed."""
    if isinstance(rows, slice) and rows == slice(0, size):
        return part
    full = part.new_full(part.shape[:-2] + (size,) + part.shape[-1:], fill)
    full[..., rows, :] = part
    return full


def _grouped(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(B, H, T, D) as (B, H_kv, H / H_kv, T, D): query head h = j G + g reads kv head j (as
    lm.attention), and a tensor of kv heads gets a group axis of 1, so that matmuls broadcast over it
    and K and V are never repeated per query head."""
    b, h, t, d = x.shape
    return x.view(b, kv_heads, h // kv_heads, t, d)


def _heads_of(grouped: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A grouped gradient back in the heads of `like`: summed over each group for a kv-head tensor."""
    if like.size(-3) != grouped.size(1) * grouped.size(2):
        grouped = grouped.sum(2, keepdim=True)
    return grouped.flatten(1, 2)


def _finite(lse: torch.Tensor) -> torch.Tensor:
    """lse with -inf (a row that has seen nothing) as 0, so that exp(-inf - lse) is 0 there, not NaN."""
    return lse.masked_fill(lse == NEG_INF, 0.0)


def block_scores(q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """S_ij = Q_i K_j^T / sqrt(d) of one chunk pair, grouped (B, H_kv, G, T_i, T_j), -inf where the key
    is after the query. Every score the rings compute is made here, one chunk pair at a time."""
    kv = k.size(-3)
    s = _grouped(q, kv) @ _grouped(k, kv).transpose(-2, -1) / math.sqrt(q.size(-1))
    future = k_pos[None, :] > q_pos[:, None]
    return s.masked_fill(future, NEG_INF) if future.any() else s  # keys all earlier: no mask


def _probabilities(q, k, q_pos, k_pos, lse, rows, cols) -> torch.Tensor:
    """The visible part of A_ij = exp(S_ij - lse_i), grouped, from the whole sequence's lse of the rows."""
    s = block_scores(q[..., rows, :], k[..., cols, :], q_pos[rows], k_pos[cols])
    return torch.exp(s - _grouped(lse[..., rows].unsqueeze(-1), k.size(-3)))


def attend_block(q, k, v, q_pos, k_pos) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Softmax attention of query chunk i over key chunk j alone: (O_ij, lse_ij) of shapes (B, H, T_i, D)
    and (B, H, T_i), or None when no query sees any key. A row that sees no key has lse -inf, O 0."""
    if (part := visible_part(q_pos, k_pos)) is None:
        return None
    rows, cols = part
    s = block_scores(q[..., rows, :], k[..., cols, :], q_pos[rows], k_pos[cols])
    lse = s.logsumexp(-1)  # finite: every visible row sees at least the chunk's earliest key
    out = (torch.exp(s - lse.unsqueeze(-1)) @ _grouped(v[..., cols, :], k.size(-3))).flatten(1, 2)
    n = q.size(-2)
    return _padded(out, rows, n, 0.0), _padded(lse.flatten(1, 2).unsqueeze(-1), rows, n, NEG_INF).squeeze(-1)


def merge_block(out, lse, block_out, block_lse) -> tuple[torch.Tensor, torch.Tensor]:
    """Two partial softmax results of the same rows as one: each weighted by its share of the total
    exp-sum, exp(lse_part - lse), never above 1."""
    new = torch.logaddexp(lse, block_lse)
    safe = _finite(new)  # rows that have seen nothing yet stay at 0
    merged = torch.exp(lse - safe).unsqueeze(-1) * out + torch.exp(block_lse - safe).unsqueeze(-1) * block_out
    return merged, new


def reattend_block(q, k, w, q_pos, k_pos, lse) -> torch.Tensor | None:
    """Twicing's second pass on one chunk pair: A_ij W_j (B, H, T_i, D) with A normalised by ring 1's
    lse_i (B, H, T_i), or None when no query sees any key. W has the query heads."""
    if (part := visible_part(q_pos, k_pos)) is None:
        return None
    rows, cols = part
    out = _probabilities(q, k, q_pos, k_pos, lse, rows, cols) @ _grouped(w[..., cols, :], k.size(-3))
    return _padded(out.flatten(1, 2), rows, q.size(-2), 0.0)


def attend_block_backward(q, k, x, q_pos, k_pos, lse, grad, delta):
    """One chunk pair's share of the backward of O = A X given dO = grad and delta = rowsum(grad * O):
    (dQ_i, dK_j, dX_j) terms, dX_j in the heads of x (V: kv heads, W: query heads); None when masked."""
    if (part := visible_part(q_pos, k_pos)) is None:
        return None
    rows, cols = part
    kv = k.size(-3)
    p = _probabilities(q, k, q_pos, k_pos, lse, rows, cols)  # (B, H_kv, G, rows, cols)
    g = _grouped(grad[..., rows, :], kv)
    dx = p.transpose(-2, -1) @ g
    dp = g @ _grouped(x[..., cols, :], kv).transpose(-2, -1)
    ds = p * (dp - _grouped(delta[..., rows].unsqueeze(-1), kv)) / math.sqrt(q.size(-1))
    dq = ds @ _grouped(k[..., cols, :], kv)
    dk = ds.transpose(-2, -1) @ _grouped(q[..., rows, :], kv)
    n_q, n_k = q.size(-2), k.size(-2)
    dk, dx = _heads_of(dk, k), _heads_of(dx, x)
    return _padded(dq.flatten(1, 2), rows, n_q, 0.0), _padded(dk, cols, n_k, 0.0), _padded(dx, cols, n_k, 0.0)


# --------------------------------------------------------------------------- the rings, in one process


def ring_steps(n: int):
    """(i, j) for every step of a ring of n ranks: at step s rank i holds the chunk that started on
    rank i - s. Chunk j meets rank j first (the diagonal block), then i = j + 1, j + 2, ..."""
    for step in range(n):
        for i in range(n):
            yield i, (i - step) % n


def _ring_attend(qs, ks, vs, pos):
    """Ring 1: each rank's U_i = sum_j A_ij V_j and lse_i, merged chunk by chunk as (K_j, V_j) arrive."""
    us = [q.new_zeros(q.shape[:-1] + vs[0].shape[-1:]) for q in qs]
    lses = [q.new_full(q.shape[:-1], NEG_INF) for q in qs]
    for i, j in ring_steps(len(qs)):
        block = attend_block(qs[i], ks[j], vs[j], pos[i], pos[j])
        if block is not None:
            us[i], lses[i] = merge_block(us[i], lses[i], *block)
    return us, lses


def _ring_reattend(qs, ks, ws, pos, lses):
    """Ring 2: each rank's out_i = sum_j A_ij W_j as (K_j, W_j) arrive, with ring 1's lse_i."""
    outs = [torch.zeros_like(w) for w in ws]
    for i, j in ring_steps(len(qs)):
        part = reattend_block(qs[i], ks[j], ws[j], pos[i], pos[j], lses[i])
        if part is not None:
            outs[i] = outs[i] + part
    return outs


def _ring_backward(qs, ks, xs, pos, lses, grads, outs, dq, dk, dx):
    """The backward of one ring of O = A X: adds into dq (which stays on its rank) and into dk, dx
    (the accumulators that travel with chunk j)."""
    deltas = [(g * o).sum(-1) for g, o in zip(grads, outs)]
    for i, j in ring_steps(len(qs)):
        part = attend_block_backward(qs[i], ks[j], xs[j], pos[i], pos[j], lses[i], grads[i], deltas[i])
        if part is not None:
            dq[i] += part[0]
            dk[j] += part[1]
            dx[j] += part[2]


def _check_positions(positions: list[torch.Tensor], seq_len: int) -> None:
    every = torch.cat(positions)
    if every.numel() != seq_len or not torch.equal(every.sort().values, torch.arange(seq_len, device=every.device)):
        raise ValueError(f"the chunks' positions must cover 0..{seq_len - 1} once each")


def residual_values(v: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """W = 2V - U in U's (query) heads, each kv head of V broadcast over its group."""
    return (2 * _grouped(v, v.size(-3)) - _grouped(u, v.size(-3))).flatten(1, 2)


def residual_values_backward(dw: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """V's share of the gradient of W = 2V - U: 2 dW, summed over each kv head's group."""
    return 2 * _heads_of(_grouped(dw, v.size(-3)), v)


class _RingAttention(torch.autograd.Function):
    """Ring softmax (twice=False) or twicing attention over full (B, H, T, D) tensors, cut into the
    ranks' chunks at `positions`; the backward walks the chunk pairs again rather than an autograd
    graph, as a ring over processes must (autograd does not cross them)."""

    @staticmethod
    def forward(ctx, q, k, v, positions, twice):
        positions = [p.to(q.device) for p in positions]
        _check_positions(positions, q.size(-2))
        qs, ks, vs = (split_chunks(x, positions) for x in (q, k, v))
        us, lses = _ring_attend(qs, ks, vs, positions)
        outs = us
        if twice:  # W_j = 2 V_j - U_j, on rank j as soon as its ring 1 is done
            ws = [residual_values(vj, uj) for vj, uj in zip(vs, us)]
            outs = _ring_reattend(qs, ks, ws, positions, lses)
        u = merge_chunks(us, positions)
        out = merge_chunks(outs, positions) if twice else u
        lse = merge_chunks([x.unsqueeze(-1) for x in lses], positions)
        ctx.save_for_backward(q, k, v, u, out, lse)
        ctx.positions, ctx.twice = positions, twice
        return out

    @staticmethod
    @once_differentiable  # the backward is no autograd graph: a second derivative would be wrong, so it raises
    def backward(ctx, d_out):
        pos, twice = ctx.positions, ctx.twice
        q, k, v, u, out, lse = (split_chunks(x, pos) for x in ctx.saved_tensors)
        lse, d_out = [x.squeeze(-1) for x in lse], split_chunks(d_out, pos)
        dq, dk, dv = ([torch.zeros_like(c) for c in x] for x in (q, k, v))
        d_u = d_out
        if twice:
            # Ring 2 backward first: it yields dW_j, which holds the upstream gradient of U.
            w = [residual_values(vj, uj) for vj, uj in zip(v, u)]
            dw = [torch.zeros_like(c) for c in w]
            _ring_backward(q, k, w, pos, lse, d_out, out, dq, dk, dw)
            d_u = [-g for g in dw]  # W = 2V - U
            for j in range(len(pos)):
                dv[j] += residual_values_backward(dw[j], v[j])
        _ring_backward(q, k, v, pos, lse, d_u, u, dq, dk, dv)
        return merge_chunks(dq, pos), merge_chunks(dk, pos), merge_chunks(dv, pos), None, None


def ring_softmax_attention(q, k, v, positions: list[torch.Tensor]) -> torch.Tensor:
    """Causal softmax attention A V computed as ring attention over the chunks at `positions` (one
    tensor of global positions per rank, together covering 0..T-1 once), with its ring backward."""
    return _RingAttention.apply(q, k, v, positions, False)


def ring_twicing_attention(q, k, v, positions: list[torch.Tensor]) -> torch.Tensor:
    """Causal twicing attention (2A - A^2) V = A (2V - U) computed as two rings over the chunks at
    `positions` (see the module docstring), with the backward's two rings."""
    return _RingAttention.apply(q, k, v, positions, True)
