"""Turn a full GPT into this rank's tensor-parallel slice.

Every rank first builds the whole model from the same seed; each then keeps its slice. So a model
at TP = N is exactly the slice of the TP = 1 model with the same seed, and runs are comparable
across layouts. (For models too large to build whole per rank, build on the meta device and
initialise the slices; not needed at the sizes this project trains on CPUs and single nodes.)

What is split (Megatron's layout): per attention block the heads (c_attn column-parallel, its rows
for Q, K and V of the local heads; c_proj row-parallel), per MLP the hidden units (c_fc column,
c_proj row), and the vocabulary (embedding, tied output layer and cross-entropy). LayerNorms,
position embeddings and the row-parallel biases are replicated.

Attention itself, softmax or twicing, runs on the local heads alone: twicing's second pass
attn(Q, K, 2V - U) needs only the same heads' Q, K, V and U, so it adds no communication.

Dropout acts only on replicated activations (embeddings and the outputs of row-parallel layers),
which must stay identical across a TP group: lm.train seeds dropout per data-parallel rank, the
same on every rank of a TP group. No activation that is partitioned across TP ranks is dropped.
"""

import torch

from lm.config import ModelConfig, check_tensor_parallel
from lm.model import GPT
from lm.parallel.groups import ParallelGroups
from lm.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelCrossEntropy,
    VocabParallelEmbedding,
    VocabParallelLMHead,
)


def _slice(size: int, tp: int, rank: int) -> torch.Tensor:
    part = size // tp
    return torch.arange(rank * part, (rank + 1) * part)


def _indices(config: ModelConfig, tp: int, rank: int) -> dict[str, torch.Tensor]:
    """Which heads' features, MLP units and vocabulary rows TP rank `rank` holds."""
    head_dim = config.n_embd // config.n_head
    heads = _slice(config.n_head, tp, rank)
    # Feature indices of the local heads within one of Q, K, V (each n_embd wide, head by head).
    head_features = (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()
    return {
        "qkv_rows": torch.cat([part * config.n_embd + head_features for part in range(3)]),
        "head_features": head_features,
        "hidden": _slice(config.ffn_dim, tp, rank),
        "vocab": _slice(config.vocab_size, tp, rank),
    }


def tp_layout(config: ModelConfig, tp: int, rank: int) -> dict[str, tuple[int, torch.Tensor]]:
    """For every parameter TP rank `rank` holds a slice of: (dimension, indices into the full one).

    The one description of the split, used to shard a model and to merge its weights.
    Parameters not listed are replicated.
    """
    check_tensor_parallel(config, tp)
    idx = _indices(config, tp, rank)
    layout = {"transformer.wte.weight": (0, idx["vocab"]), "lm_head.weight": (0, idx["vocab"])}
    for i in range(config.n_layer):
        block = f"transformer.h.{i}."
        layout[block + "attn.c_attn.weight"] = (0, idx["qkv_rows"])
        layout[block + "attn.c_proj.weight"] = (1, idx["head_features"])
        layout[block + "mlp.c_fc.weight"] = (0, idx["hidden"])
        layout[block + "mlp.c_proj.weight"] = (1, idx["hidden"])
        if config.bias:  # column-parallel biases are split with their rows; row-parallel ones replicated
            layout[block + "attn.c_attn.bias"] = (0, idx["qkv_rows"])
            layout[block + "mlp.c_fc.bias"] = (0, idx["hidden"])
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


@torch.no_grad()
def shard_model(model: GPT, groups: ParallelGroups) -> GPT:
    """Replace the split layers of `model` (in place) by this rank's tensor-parallel slices."""
    tp, rank, group = groups.tp_size, groups.tp_rank, groups.tp_group
    if tp == 1:
        return model
    config = model.config
    check_tensor_parallel(config, tp)
    idx = _indices(config, tp, rank)
    for block in model.transformer.h:
        block.attn.c_attn = ColumnParallelLinear(block.attn.c_attn, idx["qkv_rows"], group)
        block.attn.c_proj = RowParallelLinear(block.attn.c_proj, idx["head_features"], group)
        block.attn.n_head = config.n_head // tp
        block.mlp.c_fc = ColumnParallelLinear(block.mlp.c_fc, idx["hidden"], group)
        block.mlp.c_proj = RowParallelLinear(block.mlp.c_proj, idx["hidden"], group)
    vocab_start = int(idx["vocab"][0])
    model.transformer.wte = VocabParallelEmbedding(model.transformer.wte, vocab_start, len(idx["vocab"]), group)
    model.lm_head = VocabParallelLMHead(model.transformer.wte)
    model.loss = VocabParallelCrossEntropy(vocab_start, group)
    return model
