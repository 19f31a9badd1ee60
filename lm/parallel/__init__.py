"""Megatron-style tensor parallelism, kept apart from the model's math.

`groups.build_groups` splits the world into tensor-parallel groups of consecutive ranks and
data-parallel groups across them, exposed as the `mpu` object DeepSpeed takes; `shard.shard_model`
turns a (full, identically seeded) GPT into this rank's slice, built from the layers in `layers`.
`sequence` holds the pieces of sequence parallelism and `dropout_stream`, which dropout seed a rank
draws from. `ring` holds the math of ring context parallelism for softmax and twicing attention, per
chunk; `ring_group` runs those rings over a process group and `ulysses` trades sequence for heads
with all-to-alls instead: the two ways to split one sequence over a context-parallel group
(`context` puts them into the model).
"""

from lm.parallel.groups import ParallelGroups, build_groups
from lm.parallel.sequence import dropout_stream
from lm.parallel.shard import merge_state_dicts, shard_model, slice_state_dict, tp_layout

__all__ = [
    "ParallelGroups",
    "build_groups",
    "dropout_stream",
    "merge_state_dicts",
    "shard_model",
    "slice_state_dict",
    "tp_layout",
]
