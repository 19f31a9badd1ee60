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

import functools

import torch

from lm.config import check_tensor_parallel
from lm.model import GPT
from lm.parallel.groups import ParallelGroups
from lm.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    VocabParallelLMHead,
    vocab_parallel_cross_entropy,
)


def _slice(size: int, tp: int, rank: int) -> torch.Tensor:
    part = size // tp
    return torch.arange(rank * part, (rank + 1) * part)


@torch.no_grad()
def shard_model(model: GPT, groups: ParallelGroups) -> GPT:
    """Replace the split layers of `model` (in place) by this rank's tensor-parallel slices."""
    tp, rank, group = groups.tp_size, groups.tp_rank, groups.tp_group
    if tp == 1:
        return model
    config = model.config
    check_tensor_parallel(config, tp)
    heads = _slice(config.n_head, tp, rank)
    head_dim = config.n_embd // config.n_head
    # Feature indices of the local heads within one of Q, K, V.
    head_features = (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()
    qkv_rows = torch.cat([part * config.n_embd + head_features for part in range(3)])
    hidden = _slice(config.ffn_dim, tp, rank)
    for block in model.transformer.h:
        block.attn.c_attn = ColumnParallelLinear(block.attn.c_attn, qkv_rows, group)
        block.attn.c_proj = RowParallelLinear(block.attn.c_proj, head_features, group)
        block.attn.n_head = len(heads)
        block.mlp.c_fc = ColumnParallelLinear(block.mlp.c_fc, hidden, group)
        block.mlp.c_proj = RowParallelLinear(block.mlp.c_proj, hidden, group)
    rows = config.vocab_size // tp
    model.transformer.wte = VocabParallelEmbedding(model.transformer.wte, rank * rows, rows, group)
    model.lm_head = VocabParallelLMHead(model.transformer.wte)
    model.cross_entropy = functools.partial(vocab_parallel_cross_entropy, vocab_start=rank * rows, group=group)
    return model
