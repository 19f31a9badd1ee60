"""Process groups for tensor parallelism (TP) x data parallelism (DP).

With world size W and TP size N, ranks [0..N-1], [N..2N-1], ... form the TP groups (consecutive
ranks, so a TP group stays inside a node), and ranks r, r+N, r+2N, ... with the same TP rank form
the DP groups. ZeRO partitions and reduces over the DP group only, which DeepSpeed learns from the
Megatron-style `mpu` interface implemented below.
"""

from dataclasses import dataclass

import torch.distributed as dist

from core.errors import UserError


@dataclass(frozen=True)
class ParallelGroups:
    tp_size: int
    tp_rank: int
    tp_group: object
    dp_size: int
    dp_rank: int
    dp_group: object

    # The six methods DeepSpeed calls on a Megatron `mpu`.
    def get_model_parallel_rank(self) -> int:
        return self.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.tp_size

    def get_model_parallel_group(self):
        return self.tp_group

    def get_data_parallel_rank(self) -> int:
        return self.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.dp_size

    def get_data_parallel_group(self):
        return self.dp_group


def build_groups(tp_size: int) -> ParallelGroups:
    """Create every TP and DP group (each rank must create all of them, in the same order)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if tp_size < 1 or world % tp_size:
        raise UserError(f"train.tensor_parallel ({tp_size}) must divide the number of processes ({world})")
    tp_group = dp_group = None
    for first in range(0, world, tp_size):
        group = dist.new_group(list(range(first, first + tp_size)))
        if first <= rank < first + tp_size:
            tp_group = group
    for tp_rank in range(tp_size):
        group = dist.new_group(list(range(tp_rank, world, tp_size)))
        if rank % tp_size == tp_rank:
            dp_group = group
    return ParallelGroups(tp_size, rank % tp_size, tp_group, world // tp_size, rank // tp_size, dp_group)
