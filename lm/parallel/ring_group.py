"""Ring attention over a process group: softmax and twicing, each rank of the group holding one chunk.

lm.parallel.ring has the math (its docstring derives it) and walks the rings over a list of chunks
in one process; here the rings run over a context-parallel group of N ranks, and a chunk's move to
the next rank is a point-to-point send. `ring_attention(q, k, v, group, twicing)` takes this rank's
chunk of C = T/N positions, q (B, H, C, D) and k, v (B, H_kv, C, D), and returns its rows of causal
A V or (2A - A^2) V. Group rank r holds positions zigzag_positions(N C, N)[r], pieces r and 2N-1-r
of 2N equal pieces, so that every rank has the same causal work (C must be even for N > 1).

Ring and all-to-all over a process group
----------------------------------------
Each step of a ring starts a hop (batch_isend_irecv: the held chunk to group rank r + 1, the next
one from r - 1), computes the step's block with the held chunk, then waits for the hop: the
transfer hides behind the block. A ring makes N - 1 hops.

  forward   ring 1 passes (K_j, V_j), merging U_r and lse_r; ring 2 passes (K_j, W_j = 2V_j - U_j),
            summing out_r with ring 1's lse_r (twicing only).
  backward  ring 2 (twicing), then ring 1: K_j, X_j (X = W, then V) hop ahead as in the forward;
            their gradient accumulators dK_j, dX_j can only leave once the step's block is added to
            them, so they hop one step behind, in flight while the next block is computed, and a
            last (N-th) hop brings them home to rank j.

What one layer moves per rank and hop is ring.py's table (softmax forward 2 H_kv C D elements,
twicing's 2x that with H_kv = H; backward twice the forward, the accumulators in fp32). Every rank
posts its hops in the same order, which is how gloo and NCCL match sends to receives.

Memory held per rank: saved for the backward, Q, K, V (input dtype), U, out and lse (fp32 under
bf16/fp16; out is U for softmax); in flight, two copies of the travelling chunk (held and arriving)
and in the backward two sets of accumulators; one score block at a time, C x C on the diagonal and
C x C/2 off it. No rank ever holds another rank's chunk after the ring has passed it on.

Precision: chunks travel in the input dtype (W too, which two SDPA passes hold in it as well); under
bf16/fp16 each block is computed in fp32 and U, out, lse and the accumulators stay fp32, cast back
at the end (an lse rounded to bf16 would misnormalise ring 2's A by about 1%).

All-to-all (lm.parallel.ulysses) trades sequence for heads instead: two exchanges a layer, none
overlapped, and any attention function runs unchanged on H/N whole-sequence heads.
"""

import functools

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from lm.parallel.ring import (
    NEG_INF,
    attend_block,
    attend_block_backward,
    merge_block,
    reattend_block,
    residual_values,
    residual_values_backward,
    zigzag_positions,
)


def group_size_and_rank(group) -> tuple[int, int]:
    """(size, this process's rank in it) of group; one rank where no process group exists at all."""
    if group is None and not dist.is_initialized():
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of blocks, lse and accumulators: fp32 for 16-bit inputs, else the inputs' own."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


class _Hop:
    """One hop in flight: `tensors` sent to the next rank, as many of the same shapes received from the previous."""

    def __init__(self, ring: "_Ring", tensors):
        self.sent = [t.contiguous() for t in tensors]  # kept alive until the sends are done
        self.received = [torch.empty_like(t) for t in self.sent]
        ops = [dist.P2POp(dist.isend, t, ring.next, ring.group) for t in self.sent]
        ops += [dist.P2POp(dist.irecv, t, ring.prev, ring.group) for t in self.received]
        self.works = dist.batch_isend_irecv(ops)

    def wait(self) -> list[torch.Tensor]:
        for work in self.works:
            work.wait()
        return self.received


@functools.lru_cache(maxsize=16)
def positions_on(n: int, chunk: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Every rank's zigzag positions on `device`, made once per shape: no copy per layer and pass."""
    positions = zigzag_positions(n * chunk, n) if n > 1 else [torch.arange(chunk)]
    return tuple(p.to(device) for p in positions)


class _Ring:
    """This rank's place in the ring: its neighbours (global ranks, which p2p takes) and every rank's positions."""

    def __init__(self, group, chunk: int, device: torch.device):
        self.group = group
        self.size, self.rank = group_size_and_rank(group)
        n = self.size
        if n > 1:
            ranks = dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)
            self.next, self.prev = ranks[(self.rank + 1) % n], ranks[(self.rank - 1) % n]
        self.positions = positions_on(n, chunk, device)
        self.mine = self.positions[self.rank]

    def hop(self, tensors) -> _Hop | None:
        return _Hop(self, tensors) if self.size > 1 else None

    def walk(self, chunk):
        """(positions, tensors) of the chunk held at each step, starting with this rank's own; the hop
        to the next step is in flight while the caller computes with the one yielded."""
        for step in range(self.size):
            hop = _Hop(self, chunk) if step < self.size - 1 else None
            yield self.positions[(self.rank - step) % self.size], chunk
            if hop is not None:
                chunk = hop.wait()


def _attend_ring(ring: _Ring, q, k, v):
    """Ring 1: this rank's U_r = sum_j A_rj V_j and lse_r, merged block by block as (K_j, V_j) pass."""
    u, lse = torch.zeros_like(q), q.new_full(q.shape[:-1], NEG_INF)
    for k_pos, (kj, vj) in ring.walk((k, v)):
        block = attend_block(q, kj.to(q.dtype), vj.to(q.dtype), ring.mine, k_pos)
        if block is not None:
            u, lse = merge_block(u, lse, *block)
    return u, lse


def _reattend_ring(ring: _Ring, q, k, w, lse):
    """Ring 2: this rank's out_r = sum_j A_rj W_j as (K_j, W_j) pass, A normalised by ring 1's lse_r."""
    out = torch.zeros_like(q)
    for k_pos, (kj, wj) in ring.walk((k, w)):
        part = reattend_block(q, kj.to(q.dtype), wj.to(q.dtype), ring.mine, k_pos, lse)
        if part is not None:
            out = out + part
    return out


def _backward_ring(ring: _Ring, q, k, x, lse, grad, out):
    """The backward of one ring of O = A X given dO = grad: (dQ_r, dK_r, dX_r) of this rank's chunk."""
    delta = (grad * out).sum(-1)
    dq = torch.zeros_like(q)
    carried = None  # the hop bringing the accumulators of the chunk held now
    for k_pos, (kj, xj) in ring.walk((k, x)):
        kj, xj = kj.to(q.dtype), xj.to(q.dtype)
        part = attend_block_backward(q, kj, xj, ring.mine, k_pos, lse, grad, delta)
        if part is None:
            dk, dx = torch.zeros_like(kj), torch.zeros_like(xj)
        else:
            dq += part[0]
            dk, dx = part[1], part[2]
        if carried is not None:  # the chunk's accumulators from the ranks it has met so far
            dk_in, dx_in = carried.wait()
            dk, dx = dk + dk_in, dx + dx_in
        carried = ring.hop((dk, dx))  # on to the next rank; after the last step, home
    dk, dx = (dk, dx) if carried is None else carried.wait()
    return dq, dk, dx


class _RingGroupAttention(torch.autograd.Function):
    """This rank's rows of ring softmax (twice False) or twicing attention over the group; the backward
    runs the rings in reverse order (ring.py's docstring), since autograd does not cross processes."""

    @staticmethod
    def forward(ctx, q, k, v, group, twice):
        ring = _Ring(group, q.size(-2), q.device)
        q_c = q.to(compute_dtype(q.dtype))
        u, lse = _attend_ring(ring, q_c, k, v)
        out = u
        if twice:  # W_r = 2 V_r - U_r needs all of U_r: ring 2 starts once ring 1 is done
            w = residual_values(v.to(u.dtype), u).to(v.dtype)
            out = _reattend_ring(ring, q_c, k, w, lse)
        ctx.save_for_backward(q, k, v, u, out, lse)
        ctx.ring, ctx.twice = ring, twice
        return out.to(q.dtype)

    @staticmethod
    @once_differentiable  # no autograd graph in the backward: a second derivative would be wrong, so it raises
    def backward(ctx, d_out):
        q, k, v, u, out, lse = ctx.saved_tensors
        ring, q_c, grad = ctx.ring, q.to(u.dtype), d_out.to(u.dtype)
        dq = dk = dv = 0
        if ctx.twice:  # ring 2 first: its dW_r holds dU_r, the upstream gradient of ring 1
            w = residual_values(v.to(u.dtype), u).to(v.dtype)
            dq, dk, dw = _backward_ring(ring, q_c, k, w, lse, grad, out)
            dv, grad = residual_values_backward(dw, v), -dw  # W = 2V - U
        dq_1, dk_1, dv_1 = _backward_ring(ring, q_c, k, v, lse, grad, u)
        return (dq + dq_1).to(q.dtype), (dk + dk_1).to(k.dtype), (dv + dv_1).to(v.dtype), None, None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group, twicing: bool) -> torch.Tensor:
    """Causal softmax A V (twicing False) or twicing (2A - A^2) V attention of this rank's zigzag chunk
    over the whole sequence held by `group` (None: the default group), differentiable w.r.t. q, k, v.

    q (B, H, C, D) and k, v (B, H_kv, C, D) hold positions zigzag_positions(N C, N)[r] of group rank
    r; the result is q's shape and dtype. A group of one rank is plain attention, with no exchange."""
    if k.shape != v.shape or k.shape[-2:] != q.shape[-2:] or q.size(-3) % k.size(-3):
        raise ValueError(
            f"ring attention takes k, v of one shape, q's length and head size, and heads dividing q's: "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    return _RingGroupAttention.apply(q, k, v, group, twicing)
