"""All-to-all context parallelism, DeepSpeed-Ulysses style (Jacobs et al., 2023, arXiv 2309.14509).

Each rank of a group of N holds a contiguous chunk of C = T/N positions (group rank r: r C up to
(r + 1) C - 1) with all H query and H_kv kv heads. `ulysses_attention(q, k, v, group, attend)`
trades sequence for heads with one all-to-all, so that rank r holds query heads r H/N .. (r+1) H/N - 1
and kv heads r H_kv/N .. (r+1) H_kv/N - 1 of the whole sequence; runs `attend` on them unchanged
(any causal function of lm.attention's signature: softmax, twicing on SDPA or on the Triton kernel,
whose U and W = 2V - U never leave the rank); and trades back with a second all-to-all.

Grouped-query attention: query head h reads kv head h // G, G = H / H_kv, so the query heads of a
contiguous block of H/N read exactly a contiguous block of H_kv/N kv heads when N divides H_kv.
Both counts must divide by N (the config refuses the rest in a user-facing line; here, ValueError).

Exchanged per layer and rank: forward, q, k and v packed into one all-to-all, (H + 2 H_kv) C D
elements of which (N - 1)/N leave the rank, then out, H C D, back; the backward the same reversed
(dOut in, dq, dk, dv back). Softmax and twicing cost the same: twicing's second pass is local.
No overlap: `attend` needs its heads' whole sequence before it starts, and the exchange back needs
its result. Memory: the rank holds H/N heads of the whole sequence, as many elements as its own
chunk of every head, plus the packed send and receive buffers; `attend` itself costs what it costs
on a full sequence of H/N heads (O(T) for SDPA or the kernel, T x T a head for the references).

gloo runs all_to_all_single on CPU tensors in this torch (2.13, bf16 included), so the exchange is
that collective, on CPU and GPU alike.

Why not DeepSpeed's DistributedAttention (deepspeed/sequence/layer.py, DeepSpeed 0.19.8):
- it reads the heads at dim 2 of (B, T, H, D) or (T, B, H, D); our (B, H, T, D) would need a
  transposed copy each way, and its default kv head count, key.shape[2], would read our T;
- it sends q, k and v as three all-to-alls (a TODO there says to merge them); here they are one;
- it calls deepspeed.comm, and only lm.engine talks to DeepSpeed; its uneven-heads path takes the
  rank from DeepSpeed's global sequence-parallel groups rather than the group it is given.
Twicing under GQA is no reason: it too exchanges q (query heads) and k, v (kv heads) separately,
each split by its own count, and calls the local attention on whole sequences, as here.
"""

import torch
import torch.distributed as dist

from lm.attention import AttentionFn
from lm.parallel.ring_group import group_size_and_rank


class _AllToAll(torch.autograd.Function):
    """x (N, ...): slice s goes to group rank s, and slice s of the result came from rank s. The
    exchange is its own adjoint, so the backward is the same exchange of the gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.contiguous()  # first: empty_like would copy a permuted x's strides, and the exchange writes densely
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return _AllToAll.apply(grad.contiguous(), ctx.group), None


def _sequence_to_heads(xs: list[torch.Tensor], n: int, group) -> list[torch.Tensor]:
    """Each x (B, H_x, C, D) of this rank's chunk as (B, H_x / N, N C, D): its share of the heads, whole."""
    b, c, d = xs[0].size(0), xs[0].size(-2), xs[0].size(-1)
    blocks = [x.view(b, n, x.size(1) // n, c, d) for x in xs]  # block s: the heads for rank s
    received = _AllToAll.apply(torch.cat(blocks, dim=2).movedim(1, 0), group)  # (N, B, sum H_x / N, C, D)
    whole = received.permute(1, 2, 0, 3, 4).flatten(2, 3)  # chunks in rank order: the sequence
    return list(whole.split([x.size(1) // n for x in xs], dim=1))


def _heads_to_sequence(y: torch.Tensor, n: int, group) -> torch.Tensor:
    """(B, H / N, N C, D) of this rank's heads back as (B, H, C, D): every head of this rank's chunk."""
    b, h, t, d = y.shape
    received = _AllToAll.apply(y.reshape(b, h, n, t // n, d).permute(2, 0, 1, 3, 4), group)  # (N, B, H / N, C, D)
    return received.movedim(0, 1).flatten(1, 2)  # heads in rank order


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group, attend: AttentionFn) -> torch.Tensor:
    """Causal `attend` over the whole sequence held by `group` (None: the default group), for this
    rank's contiguous chunk: q (B, H, C, D) and k, v (B, H_kv, C, D) in, q's shape out. Differentiable
    through `attend`'s own backward; a group of one rank is `attend` itself."""
    n, _ = group_size_and_rank(group)
    heads, kv_heads = q.size(-3), k.size(-3)
    if heads % n or kv_heads % n:
        raise ValueError(
            f"all-to-all context parallelism over {n} ranks needs query heads ({heads}) "
            f"and kv heads ({kv_heads}) divisible by {n}"
        )
    if n == 1:
        return attend(q, k, v)
    q, k, v = _sequence_to_heads([q, k, v], n, group)
    return _heads_to_sequence(attend(q, k, v), n, group)
