"""Tensor-parallel building blocks (Shoeybi et al., "Megatron-LM", 2019).

A column-parallel linear layer holds a slice of the output features: its input is replicated on
every TP rank, so its forward is local and its backward must sum the input gradient over the TP
group (`copy_to_tensor_parallel`). A row-parallel linear layer holds a slice of the input
features: each rank computes a partial product that is summed over the group in the forward
(`reduce_from_tensor_parallel`), whose backward is the identity. Attention blocks use
column-then-row (QKV, then the output projection) and so do MLPs (c_fc, then c_proj): one
all-reduce per block forward and one per block backward.

The vocabulary is split too: each rank embeds the ids in its range of the vocabulary and the
partial embeddings are summed; the tied output projection gives each rank the logits of its
range, and the cross-entropy (a module, replacing the model's `loss`) is computed from those slices
without ever gathering full logits.

Sequence parallelism (`sequence_parallel=True`, Korthikanti et al., 2022; lm.parallel.sequence)
splits what plain TP keeps whole on every rank, the activations between the TP regions, along the
sequence: the embeddings after positions are added, every norm, residual add and dropout, act on
this rank's T / tp tokens. Each region's all-reduce becomes a pair that moves as much (a ring
all-reduce is a reduce-scatter and an all-gather): the norm that opens a region all-gathers the
sequence (backward: reduce-scatter), replacing the column-parallel layers'
`copy_to_tensor_parallel`; the row-parallel layer that closes it reduce-scatters its partial sums
(backward: all-gather) instead of all-reducing them, and adds its bias on the shard. One gather
per region, in the norm rather than in each column-parallel layer: Llama's q/k/v_proj and
gate/up_proj share one gathered input. For backward they keep one tensor between them, the norm's
shard, which the first of them to run backward all-gathers again for all (`SequenceRegion`): one
all-gather per region more in backward, as in Megatron.

Parameters used on a shard (norm gains and biases, row-parallel biases) get only their shard's
gradient on each rank; `sum_grads_over_tp` sums them over the TP group in the backward, inside the
autograd graph, so DeepSpeed's reduction over the data-parallel group (during backward under
ZeRO-1/2/3) sees complete gradients, and a checkpointed block's recompute re-creates the same sum.

Memory per rank: of what TP keeps whole per block for backward (the paper counts 10sbh bytes of
16-bit activations: the two norms' inputs 4sbh, the two dropout masks 2sbh, the inputs of the two
column-parallel regions 4sbh), SP divides all by tp: the norms' inputs (the residual stream), the
masks, and the regions' inputs, kept as the norms' shards; under activation checkpointing the
block's input, all a block keeps, is 1/tp too. What stays is what TP already splits by heads and
units (Q, K, V, attention's and twicing's intermediates, the MLP's hidden units). Measured
(benchmarks/memory.py --activations, 12 layers, d 768, twicing everywhere, fp32, T = 2048): one
micro batch's forward keeps 0.870 GB per rank under TP2, 0.712 GB (0.82x) under TP2 + SP; 0.791 GB
(0.91x) when the column-parallel layers kept the gathered sequence. Under bf16 autocast 0.618 GB,
0.500 GB (0.81x; 0.539 GB, 0.87x, before): the shard is kept in bf16, as autocast's matmuls read it.
"""

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from lm.parallel.sequence import SequenceRegion, reduce_scatter_sequence, sum_grads_over_tp


class _CopyToTensorParallel(torch.autograd.Function):
    """Identity in the forward; all-reduce (sum) of the gradient over the TP group in the backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTensorParallel(torch.autograd.Function):
    """All-reduce (sum) over the TP group in the forward; identity in the backward."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def copy_to_tensor_parallel(x: torch.Tensor, group) -> torch.Tensor:
    return _CopyToTensorParallel.apply(x, group)


def reduce_from_tensor_parallel(x: torch.Tensor, group) -> torch.Tensor:
    return _ReduceFromTensorParallel.apply(x, group)


def mark_sharded(param: nn.Parameter, dim: int, index: torch.Tensor) -> nn.Parameter:
    """Tag a parameter as this rank's slice `index` along `dim` of the full parameter.

    DeepSpeed reads `tensor_model_parallel` (and the older `model_parallel`) so that the gradient
    norm counts sharded parameters on every TP rank and replicated ones once.
    """
    param.tensor_model_parallel = True
    param.model_parallel = True
    param.partition_dim = dim
    param.full_index = index
    return param


class ColumnParallelLinear(nn.Module):
    """y_local = x W_local^T + b_local, with W_local the rows `index` of the full weight.

    Under SP (`region`, lm.parallel.sequence.SequenceRegion) x is the whole sequence that the norm
    before it gathered, whose backward sums the input gradient over the TP group; the layer keeps
    only the norm's shard of x for backward."""

    def __init__(self, full: nn.Linear, index: torch.Tensor, group, region: SequenceRegion | None = None):
        super().__init__()
        self.group = group
        self.region = region
        self.weight = mark_sharded(nn.Parameter(full.weight.detach()[index].clone()), 0, index)
        self.bias = None
        if full.bias is not None:
            self.bias = mark_sharded(nn.Parameter(full.bias.detach()[index].clone()), 0, index)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.region is not None:
            return self.region.linear(x, self.weight, self.bias)
        return F.linear(copy_to_tensor_parallel(x, self.group), self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """y = sum over TP ranks of x_local W_local^T, plus the (replicated) bias once; under SP this
    rank's sequence shard of y."""

    def __init__(self, full: nn.Linear, index: torch.Tensor, group, sequence_parallel: bool = False):
        super().__init__()
        self.group = group
        self.sequence_parallel = sequence_parallel
        self.weight = mark_sharded(nn.Parameter(full.weight.detach()[:, index].clone()), 1, index)
        self.bias = None if full.bias is None else nn.Parameter(full.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.sequence_parallel:
            y = reduce_from_tensor_parallel(F.linear(x, self.weight), self.group)
            return y if self.bias is None else y + self.bias
        y = reduce_scatter_sequence(F.linear(x, self.weight), self.group)
        return y if self.bias is None else y + sum_grads_over_tp(self.group, self.bias)[0]


class VocabParallelEmbedding(nn.Module):
    """Embeds the ids in [vocab_start, vocab_start + rows); the TP group sums the partial results."""

    def __init__(self, full: nn.Embedding, vocab_start: int, rows: int, group):
        super().__init__()
        self.group = group
        self.vocab_start = vocab_start
        index = torch.arange(vocab_start, vocab_start + rows)
        self.weight = mark_sharded(nn.Parameter(full.weight.detach()[index].clone()), 0, index)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.weight.size(0))
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tensor_parallel(out, self.group)


class VocabParallelLMHead(nn.Module):
    """Logits of this rank's vocabulary range, from the (tied) vocabulary-parallel embedding; under SP
    from the final norm's gathered sequence, keeping its shard (as ColumnParallelLinear)."""

    def __init__(self, embedding: VocabParallelEmbedding, region: SequenceRegion | None = None):
        super().__init__()
        self.group = embedding.group
        self.region = region
        self.weight = embedding.weight  # tied, as in the unsharded model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.region is not None:
            return self.region.linear(x, self.weight, None)
        return F.linear(copy_to_tensor_parallel(x, self.group), self.weight)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, vocab_start, group):
        ctx.input_dtype = logits.dtype
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        # A max over the whole vocabulary keeps exp() in range on every rank.
        shift = logits.max(dim=-1).values
        dist.all_reduce(shift, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - shift.unsqueeze(-1)
        local = targets - vocab_start
        mine = (local >= 0) & (local < logits.size(-1))
        local = local.masked_fill(~mine, 0)
        target_logit = shifted.gather(-1, local.unsqueeze(-1)).squeeze(-1).masked_fill(~mine, 0.0)
        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        # One collective for both sums: the target's logit lives on exactly one rank.
        both = torch.stack([target_logit, sum_exp])
        dist.all_reduce(both, group=group)
        target_logit, sum_exp = both
        ctx.save_for_backward(exp.div_(sum_exp.unsqueeze(-1)), mine, local)
        return sum_exp.log() - target_logit

    @staticmethod
    def backward(ctx, grad):
        softmax, mine, local = ctx.saved_tensors
        # d loss / d logits = softmax - one_hot(target), the one-hot only on the owning rank.
        grad_logits = softmax.scatter_add(-1, local.unsqueeze(-1), -mine.unsqueeze(-1).to(softmax.dtype))
        return (grad_logits * grad.unsqueeze(-1)).to(ctx.input_dtype), None, None, None


class VocabParallelCrossEntropy(nn.Module):
    """Cross-entropy of vocabulary-sliced logits (B, T, V/tp) against full-vocabulary targets.

    Parameter-free like the model's own `CrossEntropy`, which it replaces: same call, same reductions.
    """

    def __init__(self, vocab_start: int, group):
        super().__init__()
        self.vocab_start = vocab_start
        self.group = group

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        loss = _VocabParallelCrossEntropy.apply(logits, targets, self.vocab_start, self.group)
        return loss.mean() if reduction == "mean" else loss.sum() if reduction == "sum" else loss
