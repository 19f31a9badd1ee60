"""Process groups for tensor parallelism (TP) x context parallelism (CP) x data parallelism (DP).

With world size W = TP x CP x DP, rank r has TP rank r % TP, CP rank (r // TP) % CP and DP rank
r // (TP x CP): TP groups are consecutive ranks (so a TP group stays inside a node), CP groups the
ranks TP apart with the same DP and TP rank, DP groups the ranks TP x CP apart.

The data follows the DP rank: the ranks of one TP x CP block read the same rows, each CP rank its
chunk of every sequence (lm.parallel.context). ZeRO, though, partitions and averages over DP x CP
(the "ZeRO group", every rank with this TP rank): each CP rank's loss is the mean over its chunk,
all chunks are the same size, so the mean of their gradients is the whole sequence's. DeepSpeed
learns that group from the Megatron-style `mpu` interface below, as its data-parallel group.
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
    cp_size: int = 1
    cp_rank: int = 0
    cp_group: object = None
    zero_group: object = None  # DP x CP: the ranks of this TP rank; None: the DP group (CP = 1)

    @property
    def zero_size(self) -> int:
        """Ranks ZeRO partitions and averages over: DP x CP."""
        return self.dp_size * self.cp_size

    @property
    def zero_rank(self) -> int:
        return self.dp_rank * self.cp_size + self.cp_rank

    # The six methods DeepSpeed calls on a Megatron `mpu`: its "data parallel" is our DP x CP.
    def get_model_parallel_rank(self) -> int:
        return self.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.tp_size

    def get_model_parallel_group(self):
        return self.tp_group

    def get_data_parallel_rank(self) -> int:
        return self.zero_rank

    def get_data_parallel_world_size(self) -> int:
        return self.zero_size

    def get_data_parallel_group(self):
        return self.dp_group if self.zero_group is None else self.zero_group


def build_groups(tp_size: int, cp_size: int = 1) -> ParallelGroups:
    """Create every TP, CP, DP and ZeRO group (each rank must create all of them, in the same order)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if tp_size < 1 or cp_size < 1 or world % (tp_size * cp_size):
        sizes = f"train.tensor_parallel ({tp_size})"
        if cp_size != 1:
            sizes = f"train.tensor_parallel x train.context_parallel ({tp_size} x {cp_size})"
        raise UserError(f"{sizes} must divide the number of processes ({world})")
    block = tp_size * cp_size
    tp_rank, cp_rank, dp_rank = rank % tp_size, (rank // tp_size) % cp_size, rank // block

    def mine(ranks: list[int]):
        group = dist.new_group(ranks)  # collective: every rank creates every group
        return group if rank in ranks else None

    def first(groups) -> object:
        return next(g for g in groups if g is not None)

    tp_group = first([mine(list(range(s, s + tp_size))) for s in range(0, world, tp_size)])
    dp_group = first([mine(list(range(s, world, block))) for s in range(block)])
    cp_group = zero_group = None
    if cp_size > 1:
        starts = [d * block + t for d in range(world // block) for t in range(tp_size)]
        cp_group = first([mine(list(range(s, s + block, tp_size))) for s in starts])
        zero_group = first([mine(list(range(t, world, tp_size))) for t in range(tp_size)])
    return ParallelGroups(
        tp_size, tp_rank, tp_group, world // block, dp_rank, dp_group, cp_size, cp_rank, cp_group, zero_group
    )
