"""Turn a full GPT into this rank's tensor-parallel slice.

Every rank first builds the whole model from the same seed; each then keeps its slice. So a model
at TP = N is exactly the slice of the TP = 1 model with the same seed, and runs are comparable
across layouts. (For models too large to build whole per rank, build on the meta device and
initialise the slices; not needed at the sizes this project trains on CPUs and single nodes.)

What is split (Megatron's layout): per attention block the query heads and the key/value heads,
each over the TP group (GPT-2's c_attn column-parallel, its rows for Q, K and V of the local heads;
Llama's q_proj, k_proj and v_proj column-parallel; the output projection row-parallel), per MLP the
hidden units (c_fc or gate_proj and up_proj column, c_proj or down_proj row; a SwiGLU c_fc keeps the
local units of both its halves), and the vocabulary (embedding, output layer and cross-entropy).
Norms, position embeddings and the row-parallel biases are replicated. Under grouped-query
attention a rank's query heads are exactly the groups of its kv heads, since both are split into
tp contiguous ranges and n_head / n_kv_head is the same per range.

Attention itself, softmax or twicing, runs on the local heads alone: twicing's second pass
attn(Q, K, 2V - U) needs only the same heads' Q, K, V and U, so it adds no communication.

Dropout acts only on replicated activations (embeddings and the outputs of row-parallel layers),
which must stay identical across a TP group: lm.train seeds dropout per data-parallel rank, the
same on every rank of a TP group. No activation that is partitioned across TP ranks is dropped.

With `sequence_parallel` (lm.parallel.layers, lm.parallel.sequence) the same layers run with their
sequence-parallel collectives, every norm becomes a SequenceParallelNorm (norm of the shard, then
the all-gather into the region it opens, whose column-parallel layers keep only that shard for
backward: one SequenceRegion per norm) and the model's `sequence_split` keeps this rank's part of
the embeddings. No parameter changes: names, shapes and checkpoints are those of plain TP. Every
dropout then acts on a shard of the sequence, so each TP rank draws its own masks
(`dropout_stream`).
"""

import torch
import torch.nn as nn

from lm.config import ModelConfig
from lm.config_layout import check_tensor_parallel
from lm.model import GPT, block_prefix, embedding_names
from lm.parallel.groups import ParallelGroups
from lm.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelCrossEntropy,
    VocabParallelEmbedding,
    VocabParallelLMHead,
)
from lm.parallel.sequence import SequenceParallelNorm, SequenceRegion, SequenceSplit


def _slice(size: int, tp: int, rank: int) -> torch.Tensor:
    part = size // tp
    return torch.arange(rank * part, (rank + 1) * part)


def _features(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


def _block_splits(config: ModelConfig, tp: int, rank: int) -> dict[str, tuple[str, torch.Tensor]]:
    """For each split linear layer of a block (its path in the block): column or row, and the indices
    of the full layer's output (column) or input (row) features that TP rank `rank` holds."""
    q = _features(_slice(config.n_head, tp, rank), config.head_dim)
    kv = _features(_slice(config.n_kv_head, tp, rank), config.head_dim)
    hidden = _slice(config.ffn_dim, tp, rank)
    if config.arch == "gpt2":
        q_dim, kv_dim = config.n_head * config.head_dim, config.n_kv_head * config.head_dim
        qkv_rows = torch.cat([q, q_dim + kv, q_dim + kv_dim + kv])
        fc_rows = torch.cat([hidden, config.ffn_dim + hidden]) if config.mlp == "swiglu" else hidden
        return {
            "attn.c_attn": ("column", qkv_rows),
            "attn.c_proj": ("row", q),
            "mlp.c_fc": ("column", fc_rows),
            "mlp.c_proj": ("row", hidden),
        }
    splits = {
        "self_attn.q_proj": ("column", q),
        "self_attn.k_proj": ("column", kv),
        "self_attn.v_proj": ("column", kv),
        "self_attn.o_proj": ("row", q),
        "mlp.up_proj": ("column", hidden),
        "mlp.down_proj": ("row", hidden),
    }
    if config.mlp == "swiglu":
        splits["mlp.gate_proj"] = ("column", hidden)
    return splits


def tp_layout(config: ModelConfig, tp: int, rank: int) -> dict[str, tuple[int, torch.Tensor]]:
    """For every parameter TP rank `rank` holds a slice of: (dimension, indices into the full one).

    The one description of the split, used to shard a model and to merge its weights.
    Parameters not listed are replicated.
    """
    check_tensor_parallel(config, tp)
    vocab = _slice(config.vocab_size, tp, rank)
    tokens, head = embedding_names(config)
    layout = {tokens: (0, vocab), head: (0, vocab)}
    splits = _block_splits(config, tp, rank)
    for i in range(config.n_layer):
        for path, (style, index) in splits.items():
            name = f"{block_prefix(config)}.{i}.{path}"
            layout[name + ".weight"] = (0 if style == "column" else 1, index)
            if config.bias and style == "column":  # column-parallel biases split with their rows
                layout[name + ".bias"] = (0, index)
    return layout


def merge_state_dicts(shards: list[dict[str, torch.Tensor]], config: ModelConfig) -> dict[str, torch.Tensor]:
    """The full state dict from every TP rank's (in rank order); replicated values from rank 0."""
    tp = len(shards)
    layouts = [tp_layout(config, tp, rank) for rank in range(tp)]
    full = {}
    for name, value in shards[0].items():
        if name not in layouts[0]:
            full[name] = value
            continue
        dim = layouts[0][name][0]
        shape = list(value.shape)
        shape[dim] = sum(len(layout[name][1]) for layout in layouts)
        merged = value.new_empty(shape)
        for shard, layout in zip(shards, layouts):
            merged.index_copy_(dim, layout[name][1], shard[name])
        full[name] = merged
    return full


def slice_state_dict(full: dict[str, torch.Tensor], config: ModelConfig, tp: int, rank: int) -> dict[str, torch.Tensor]:
    """TP rank `rank`'s part of a full state dict (of weights or of Adam's moments): the inverse of
    merge_state_dicts."""
    if tp == 1:
        return dict(full)
    layout = tp_layout(config, tp, rank)
    return {
        name: value.index_select(layout[name][0], layout[name][1]) if name in layout else value
        for name, value in full.items()
    }


def _open_regions(block: nn.Module, splits: dict, group) -> dict[str, SequenceRegion]:
    """Under SP: swap a block's norms for SequenceParallelNorms, and give each column-parallel layer
    (by its path) the region its norm opens. A pre-norm block's first norm feeds the attention's
    column-parallel layers, the second the MLP's."""
    first, second = (name for name, m in block.named_children() if isinstance(m, (nn.LayerNorm, nn.RMSNorm)))
    columns = [path for path, (style, _) in splits.items() if style == "column"]
    mlp = [path for path in columns if path.startswith("mlp.")]
    fed = {first: [path for path in columns if path not in mlp], second: mlp}
    regions = {}
    for norm, paths in fed.items():
        region = SequenceRegion(group, len(paths))
        setattr(block, norm, SequenceParallelNorm(getattr(block, norm), group, region))
        regions |= dict.fromkeys(paths, region)
    return regions


@torch.no_grad()
def shard_model(model: GPT, groups: ParallelGroups, sequence_parallel: bool = False) -> GPT:
    """Replace the split layers of `model` (in place) by this rank's tensor-parallel slices; with
    `sequence_parallel`, also split the activations between them along the sequence."""
    tp, rank, group, sp = groups.tp_size, groups.tp_rank, groups.tp_group, sequence_parallel
    if tp == 1:
        return model
    config = model.config
    check_tensor_parallel(config, tp)
    splits = _block_splits(config, tp, rank)
    for block in model.blocks:
        regions = _open_regions(block, splits, group) if sp else {}
        for path, (style, index) in splits.items():
            parent, _, leaf = path.rpartition(".")
            owner = block.get_submodule(parent)
            full = getattr(owner, leaf)
            if style == "column":
                layer = ColumnParallelLinear(full, index, group, regions.get(path))
            else:
                layer = RowParallelLinear(full, index, group, sp)
            setattr(owner, leaf, layer)
        block.attention.n_head = config.n_head // tp
        block.attention.n_kv_head = config.n_kv_head // tp
    vocab = _slice(config.vocab_size, tp, rank)
    vocab_start = int(vocab[0])
    model.replace_token_embedding(VocabParallelEmbedding(model.token_embedding, vocab_start, len(vocab), group))
    head = SequenceRegion(group, 1) if sp else None  # opened by the final norm
    if config.tie_embeddings:
        model.lm_head = VocabParallelLMHead(model.token_embedding, head)
    else:  # an output layer of its own: a column-parallel layer over the vocabulary
        model.lm_head = ColumnParallelLinear(model.lm_head, vocab, group, head)
    model.loss = VocabParallelCrossEntropy(vocab_start, group)
    if sp:
        model.sequence_split = SequenceSplit(group)
        for name, child in model.body.items():  # the final norm: the only one left
            if isinstance(child, (nn.LayerNorm, nn.RMSNorm)):
                model.body[name] = SequenceParallelNorm(child, group, head)
    return model
