"""Sequence parallelism (Korthikanti et al., "Reducing Activation Recomputation in Large Transformer
Models", 2022): between the tensor-parallel regions each TP rank keeps 1/tp of the sequence.

The pieces, in the order a forward meets them (lm.parallel.shard puts them in place):
- `SequenceSplit` (the model's `sequence_split`) keeps this rank's shard of the embeddings; its
  backward all-gathers the gradient.
- `SequenceParallelNorm` replaces every norm: it normalises the shard, then all-gathers the whole
  sequence for the TP region it opens (every norm of a pre-norm GPT is followed by column-parallel
  layers: ln_1, ln_2, the final norm); its backward reduce-scatters, which sums the partial input
  gradients of the region's column-parallel layers over the TP group and keeps this rank's shard.
- The region's column-parallel layers (c_attn or q/k/v_proj, c_fc or gate/up_proj, the output
  layer) read the gathered sequence but keep for backward only the norm's shard of it, one tensor
  for all of a region's layers (`SequenceRegion`, `_LinearKeepingShard`). In backward the first of
  them to run all-gathers it again, once for the region, for the weights' gradients
  (Korthikanti et al.'s recipe): one all-gather per region more, and no (B, T, C) activation kept.
- A row-parallel layer reduce-scatters its partial sums (`reduce_scatter_sequence`) where plain TP
  all-reduces them; its backward all-gathers.

Activations are (B, T, C) and are split along T (dim 1). gloo and NCCL collectives take and give
tensors concatenated along dim 0, so the helpers below move the rank's chunk index to the front and back.
"""

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from lm.parallel.groups import ParallelGroups


def chunks_first(x: torch.Tensor, tp: int) -> torch.Tensor:
    """(B, T, ...) -> (tp, B, T / tp, ...): chunk r of the sequence is entry r, contiguous."""
    return x.unflatten(1, (tp, x.size(1) // tp)).movedim(1, 0).contiguous()


def chunks_joined(stacked: torch.Tensor) -> torch.Tensor:
    """(tp, B, T / tp, ...) -> (B, T, ...): the inverse of chunks_first."""
    return stacked.movedim(0, 1).flatten(1, 2)


def _all_gather(shard: torch.Tensor, group) -> torch.Tensor:
    tp = dist.get_world_size(group)
    # gloo wants the ranks' tensors concatenated along dim 0, not stacked
    joined = shard.new_empty((tp * shard.size(0), *shard.shape[1:]))
    dist.all_gather_single(joined, shard.contiguous(), group=group)
    return chunks_joined(joined.unflatten(0, (tp, shard.size(0))))


def _reduce_scatter(full: torch.Tensor, group) -> torch.Tensor:
    tp = dist.get_world_size(group)
    shard = full.new_empty((full.size(0), full.size(1) // tp, *full.shape[2:]))
    # gloo in this torch has a real reduce-scatter, as NCCL does: one code path for both.
    dist.reduce_scatter_single(shard, chunks_first(full, tp).flatten(0, 1), group=group)
    return shard


def _split(full: torch.Tensor, group) -> torch.Tensor:
    tp, rank = dist.get_world_size(group), dist.get_rank(group)
    if full.size(1) % tp:
        raise ValueError(f"sequence parallelism splits {full.size(1)} tokens over {tp} ranks: not whole")
    part = full.size(1) // tp
    # A copy, so that no view keeps the whole sequence alive for backward.
    return full.narrow(1, rank * part, part).clone(memory_format=torch.contiguous_format)


class _Exchange(torch.autograd.Function):
    """`there` (a collective along the sequence) in the forward, its adjoint `back` in the backward."""

    @staticmethod
    def forward(ctx, x, group, there, back):
        ctx.group, ctx.back = group, back
        return there(x, group)

    @staticmethod
    def backward(ctx, grad):
        return ctx.back(grad, ctx.group), None, None, None


class _SumGradsOverTP(torch.autograd.Function):
    """Identity on parameters in the forward; in the backward their gradients, in one all-reduce, summed
    over the TP group: each rank's is from its shard of the sequence alone."""

    @staticmethod
    def forward(ctx, group, *params):
        ctx.group = group
        return params

    @staticmethod
    def backward(ctx, *grads):
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=ctx.group)
        return None, *(part.view_as(g) for part, g in zip(flat.split([g.numel() for g in grads]), grads))


def gather_sequence(shard: torch.Tensor, group) -> torch.Tensor:
    """All-gather along the sequence; backward: reduce-scatter (sum, keep the shard)."""
    return _Exchange.apply(shard, group, _all_gather, _reduce_scatter)


def reduce_scatter_sequence(full: torch.Tensor, group) -> torch.Tensor:
    """Reduce-scatter along the sequence; backward: all-gather."""
    return _Exchange.apply(full, group, _reduce_scatter, _all_gather)


def split_sequence(full: torch.Tensor, group) -> torch.Tensor:
    """This rank's shard of a replicated sequence; backward: all-gather."""
    return _Exchange.apply(full, group, _split, _all_gather)


def sum_grads_over_tp(group, *params: nn.Parameter) -> tuple[torch.Tensor, ...]:
    """`params` to use on a sequence shard; the DP reduction (DeepSpeed's) then sees complete gradients."""
    return _SumGradsOverTP.apply(group, *params)


class SequenceSplit(nn.Module):
    """The model's `sequence_split` under sequence parallelism: this rank's shard of the embeddings
    (learned positions already added to the whole sequence), before the embedding dropout.

    The token embedding still all-reduces its partial sums whole: a reduce-scatter there would move
    half as much, but would need the positions added per shard.
    """

    def __init__(self, group):
        super().__init__()
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return split_sequence(x, self.group)


def _matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype F.linear of x computes in: autocast's where it casts x, else x's own."""
    autocast = torch.is_autocast_enabled(x.device.type) and x.is_floating_point() and x.dtype != torch.float64
    return torch.get_autocast_dtype(x.device.type) if autocast else x.dtype


class _Regather:
    """A region's input gathered again in backward, once for all its column-parallel layers: the first
    layer's backward (in backward's order) gathers the shard, the last one's lets the sequence go.

    Compiled, each layer gathers for itself: torch.compile traces a backward only if it changes no
    state outside itself, so sharing would break the graph at every layer.
    """

    def __init__(self, group, layers: int):
        self.group, self.layers, self.used, self.full = group, layers, 0, None
        self.shared = not torch.compiler.is_compiling()

    def gather(self, shard: torch.Tensor) -> torch.Tensor:
        if not self.shared:
            return _all_gather(shard, self.group)
        if self.full is None:
            self.full = _all_gather(shard, self.group)
        return self.full

    def release(self) -> None:
        if not self.shared:
            return
        self.used += 1
        if self.used == self.layers:  # reset too, should a retained graph run backward again
            self.used, self.full = 0, None


class _LinearKeepingShard(torch.autograd.Function):
    """F.linear of the gathered sequence that keeps only this rank's shard of it for backward.

    Backward gathers the shard again (`_Regather`) for the weight's gradient; the input's gradient
    goes back whole to the norm's all-gather, whose backward sums the region's layers' and
    reduce-scatters. The forward is F.linear itself (under autocast, or ZeRO-3's linear, as ever);
    the backward computes what F.linear's does, in the dtype its matmul ran in (the shard is kept
    in it): the gradients are bitwise those of keeping the gathered input. The weight is saved as
    the parameter, which ZeRO-3's module hooks free after forward and gather before this backward.

    An autograd Function rather than a saved-tensor hook pair: a hook would have to recognise
    F.linear's flattened view of the sequence among all that is saved, and under activation
    checkpointing only the innermost hooks apply, so checkpoint's would shadow it or it theirs.
    """

    @staticmethod
    def forward(ctx, full, shard, weight, bias, regather):
        ctx.save_for_backward(shard, weight, bias)  # through checkpoint's hooks like any saved tensor
        ctx.regather, ctx.input_dtype = regather, full.dtype
        return F.linear(full, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        shard, weight, bias = ctx.saved_tensors
        full = ctx.regather.gather(shard)
        g, x = grad.reshape(-1, grad.size(-1)), full.reshape(-1, full.size(-1))
        grad_full = g.mm(weight.to(g.dtype)).view(full.shape).to(ctx.input_dtype)
        grad_weight = g.t().mm(x).to(weight.dtype)
        grad_bias = None if bias is None else g.sum(0).to(bias.dtype)
        ctx.regather.release()
        return grad_full, None, grad_weight, grad_bias, None


class SequenceRegion:
    """What links a SequenceParallelNorm to the `layers` column-parallel layers of the TP region it
    opens (shard_model sets it up): in each training forward the norm leaves its shard here, cast
    to the dtype the layers' matmuls run in, and each layer takes it, to keep in place of the
    gathered sequence, with one `_Regather` for them all.

    The shard is held here only from the norm's forward until its last layer has taken it, so the
    region keeps nothing alive itself; a checkpointed block's recompute passes through it again.
    """

    def __init__(self, group, layers: int):
        self.group, self.layers = group, layers
        self.shard, self.shape, self.regather, self.left = None, None, None, 0  # set while open

    def open(self, shard: torch.Tensor, full: torch.Tensor) -> None:
        self.shard, self.shape = shard.detach().to(_matmul_dtype(full)), full.shape
        self.regather, self.left = _Regather(self.group, self.layers), self.layers

    def linear(self, x: torch.Tensor, weight: nn.Parameter, bias: nn.Parameter | None) -> torch.Tensor:
        if not torch.is_grad_enabled() or self.shard is None or x.shape != self.shape:
            return F.linear(x, weight, bias)  # no backward, or not the norm's output (another shape)
        shard, regather = self.shard, self.regather
        self.left -= 1
        if not self.left:
            self.shard = self.shape = self.regather = None
        return _LinearKeepingShard.apply(x, shard, weight, bias, regather)


class SequenceParallelNorm(nn.Module):
    """LayerNorm or RMSNorm of this rank's sequence shard, then the whole sequence for the TP region
    that follows. Holds the norm's own parameters under the same names, so the state dict is unchanged.
    Its shard is what the region's column-parallel layers keep for backward (`region`).

    The parameters pass through `sum_grads_over_tp`, whose output is a view that the norm keeps for
    backward. Under ZeRO-3 that view would keep a gathered weight alive to backward, but norm gains
    and biases are under DeepSpeed's persistence threshold and stay whole anyway (lm.ds_config).
    """

    def __init__(self, norm: nn.LayerNorm | nn.RMSNorm, group, region: SequenceRegion):
        super().__init__()
        self.group, self.region = group, region
        self.rms = isinstance(norm, nn.RMSNorm)
        self.shape, self.eps = norm.normalized_shape, norm.eps
        self.weight = norm.weight
        self.bias = None if self.rms else norm.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            (weight,), bias = sum_grads_over_tp(self.group, self.weight), None
        else:
            weight, bias = sum_grads_over_tp(self.group, self.weight, self.bias)
        if self.rms:
            y = F.rms_norm(x, self.shape, weight, self.eps)
        else:
            y = F.layer_norm(x, self.shape, weight, bias, self.eps)
        full = gather_sequence(y, self.group)
        if torch.is_grad_enabled():
            self.region.open(y, full)
        return full


def dropout_stream(groups: ParallelGroups, sequence_parallel: bool) -> int:
    """Which dropout stream this rank draws from (lm.train seeds seed + 1 + stream).

    Without sequence parallelism every dropout acts on activations replicated over the TP group,
    which must stay identical: one stream per data-parallel and context-parallel rank (those hold
    different tokens), shared by its TP ranks. With it every dropout acts on this rank's own shard
    of the sequence: one stream per rank, or the TP ranks would drop the same positions of their
    different shards.
    """
    if not sequence_parallel:
        return groups.zero_rank  # dp_rank x cp_size + cp_rank
    return groups.zero_rank * groups.tp_size + groups.tp_rank
