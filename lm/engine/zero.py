"""What lm.engine changes in DeepSpeed's ZeRO: sharded initialisation for ZeRO-3, and ZeRO-1/2's
step made cheaper on our layout (no second fp32 copy, fewer collectives, gloo's faster primitive).
Each leaves what is computed as it was."""

from collections.abc import Iterable

import torch

from lm.config import RunConfig
from lm.ds_config import deepspeed_config
from lm.parallel import ParallelGroups


def partition_zero3(params: Iterable[torch.nn.Parameter], config: RunConfig, groups: ParallelGroups) -> None:
    """Partition each parameter over the data-parallel group as soon as `params` yields it.

    ZeRO-3's sharded initialisation: fed by lm.initialization.materialized, a rank never holds
    more than its partitions plus one parameter. DeepSpeed's `zero.Init(module=...)` does the same
    for a module whose parameters all exist already; its per-parameter step takes them one by one.
    """
    import deepspeed

    init = deepspeed.zero.Init(
        data_parallel_group=groups.get_data_parallel_group(),  # DP x CP
        mpu=groups,
        config_dict_or_path=deepspeed_config(config.train, groups.dp_size, config.model),  # device: ZeRO-1/2 only
    )
    if init.mem_efficient_linear:
        # What Init(module=...) also does: F.linear saves weight.t(), a view that keeps every gathered
        # weight alive until backward (a whole model at the end of forward); DeepSpeed's linear
        # saves the parameter itself, whose storage ZeRO-3 frees after each module. Global, as there.
        init._enable_mem_efficient_linear()
    init._convert_to_zero_parameters(params)


def share_master_weights(zero_optimizer) -> None:
    """Let ZeRO-1/2's fp32 master partition be the fp32 weights' own partition.

    Stages 1-2 clone this rank's partition of the flat weights as the optimizer's master copy even
    when the weights are fp32 already (stage 3 shares it in that case): 4/DP bytes per parameter
    for nothing (the whole model at DP=1). After the update DeepSpeed copies master to weights,
    which is then a copy onto itself; checkpoints hold the same values under the same names.
    """
    import torch.distributed as dist

    for i, master in enumerate(zero_optimizer.single_partition_of_fp32_groups):
        rank = dist.get_rank(group=zero_optimizer.real_dp_process_group[i])
        weights = zero_optimizer.parallel_partitioned_bit16_groups[i][rank]
        if weights.dtype == master.dtype and weights.device == master.device:
            master.data = weights.data


def gather_weights_by_broadcast() -> None:
    """ZeRO-1/2's all-gather of the updated weight partitions after each step, over gloo, as one
    broadcast per partition from the rank that owns it.

    gloo's all_gather_into_tensor takes about twice as long as broadcasting the same partitions
    (2 processes, 46 MB of fp32: 43-45 ms against 18-22 ms on the 2-core CPU machine, RESULTS.md);
    other backends keep DeepSpeed's all-gather. DeepSpeed calls the function by its module-level
    name in stage_1_and_2, so it is replaced there, once per process; the bytes are the same.
    """
    import torch.distributed as dist
    from deepspeed.runtime.zero import stage_1_and_2

    original = stage_1_and_2.all_gather_dp_groups
    if getattr(original, "broadcasts_over_gloo", False):
        return

    def all_gather_dp_groups(groups_flat, partitioned_param_groups, dp_process_group, **kwargs):
        if any(dist.get_backend(group) != "gloo" for group in dp_process_group):
            return original(groups_flat, partitioned_param_groups, dp_process_group, **kwargs)
        # Every flat group's partitions at once (views of its flat weights, in rank order: filling
        # each fills the whole), then one wait for all: no group waits for the one before it.
        sends = [
            dist.broadcast(part, src=dist.get_global_rank(group, owner), group=group, async_op=True)
            for partitions, group in zip(partitioned_param_groups, dp_process_group)
            if len(partitions) > 1
            for owner, part in enumerate(partitions)
        ]
        for work in sends:
            work.wait()

    all_gather_dp_groups.broadcasts_over_gloo = True
    stage_1_and_2.all_gather_dp_groups = all_gather_dp_groups


def norm_in_one_reduction(zero_optimizer) -> None:
    """ZeRO-1/2's gradient norm with one all-reduce for all flat groups, each group's squares
    summed by torch's foreach norm, instead of a loop over parameters and an all-reduce per group.

    The same sums (each gradient's norm in float64, their squares summed and cast to float32, added
    over the data- and then the model-parallel group), the same -1 for a group whose norm is not
    finite and the same combination (DeepSpeed's combine_grad_norm_groups). Two groups (weights that
    decay, and those that do not) made it two all-reduces per step, each a point where the ranks
    wait for each other. Offload, MoE and Muon keep DeepSpeed's own (their norms differ).
    """
    import types

    import torch.distributed as dist
    from deepspeed.comm.pg_utils import is_parallel
    from deepspeed.runtime.constants import PIPE_REPLICATED
    from deepspeed.runtime.utils import combine_grad_norm_groups, is_model_parallel_parameter
    from deepspeed.runtime.zero.utils import get_norm_dtype

    zero = zero_optimizer
    if zero.cpu_offload or zero.has_moe_layers:
        return
    deepspeeds = zero.scaled_global_norm

    def counted(gradients, params) -> list[torch.Tensor]:
        """What DeepSpeed's get_grad_norm_direct counts: no padding, no pipeline replica, model-
        parallel rank 0's copy of a replicated weight."""
        grads = (g for g in gradients if not getattr(g, "_zero_padding", False))
        return [
            g
            for g, p in zip(grads, params)
            if not (hasattr(p, PIPE_REPLICATED) and p.ds_pipe_replicated)
            and (is_model_parallel_parameter(p) or zero.model_parallel_rank == 0)
        ]

    def scaled_global_norm(self, norm_type=2):
        groups = range(len(self.bit16_groups))
        if norm_type != 2 or any(self._muon_update_lacks_loss_scale(i) for i in groups):
            return deepspeeds(norm_type)
        squares = []
        for i in groups:
            grads = counted(self.averaged_gradients[i], self.params_in_partition[i])
            norms = torch._foreach_norm(grads, 2, dtype=get_norm_dtype()) if grads else [torch.zeros(())]
            squares.append(torch.stack(norms).pow(2).sum().float())
        total = torch.stack(squares)
        dist.all_reduce(total, group=self.dp_process_group)
        if is_parallel(self.model_parallel_group):
            dist.all_reduce(total, group=self.model_parallel_group)
        norms = total.pow(0.5)
        norms.masked_fill_(~torch.isfinite(norms), -1.0)  # DeepSpeed's mark of a norm that is not finite
        return combine_grad_norm_groups(list(norms), norm_type=norm_type)

    zero.scaled_global_norm = types.MethodType(scaled_global_norm, zero)


def reduce_buckets_async(zero_optimizer) -> None:
    """ZeRO-1/2 on gloo: start each full gradient bucket's all-reduce and let backward go on; wait
    for all of them (and copy the results back) where the backward's epilogue reduces its last one
    (that one as DeepSpeed does: it is read right after).

    DeepSpeed reduces a full bucket inside the gradient hook, synchronously, where backward then
    waits for it; on a GPU overlap_comm moves that to a side stream, which gloo does not have.
    The same flattened buckets, the same all-reduce and division, the same copies back: the same
    values, only sooner. An ad-hoc run of an all-async version gained 1-2% a step on an 11.5M
    model in three buckets (RESULTS.md); this one ran in issue 15's last table (RESULTS.md, eighth
    session), with no A/B of it by a repo benchmark.
    Only the path it replaces: a plain all-reduce per bucket (no overlap_comm, no offload, no
    compact gradient buffer); anything else stays DeepSpeed's.
    """
    import types

    import torch.distributed as dist

    zero = zero_optimizer
    if zero.overlap_comm or zero.cpu_offload or zero.contiguous_gradients:
        return
    if any(dist.get_backend(group) != "gloo" for group in zero.real_dp_process_group):
        return
    deepspeeds_copy, deepspeeds_reduce = zero.allreduce_and_copy, zero.reduce_ipg_grads
    deepspeeds_epilogue = zero.independent_gradient_partition_epilogue
    pending: list[tuple] = []  # (work, flat bucket, gradients), in the order started
    flushing = False  # inside the backward's epilogue

    def allreduce_and_copy(
        self,
        small_bucket,
        communication_data_type,
        rank=None,
        log=None,
        divide=True,
        process_group=None,
        output_bucket=None,
    ):
        plain = rank is None and all(o is None for o in output_bucket or [None])
        # The epilogue's bucket is read right after it is reduced: nothing to overlap, DeepSpeed's own.
        if flushing or not plain or communication_data_type != small_bucket[0].dtype:
            return deepspeeds_copy(
                small_bucket,
                communication_data_type,
                rank=rank,
                log=log,
                divide=divide,
                process_group=process_group,
                output_bucket=output_bucket,
            )
        group = self.dp_process_group if process_group is None else process_group
        flat = self.flatten(small_bucket)
        if divide and self.gradient_average:  # as allreduce_bucket divides
            flat.div_(dist.get_world_size(group=group) / float(self.sequence_parallel_size))
        pending.append((dist.all_reduce(flat, group=group, async_op=True), flat, small_bucket))

    def reduce_ipg_grads(self, comm_dtype=None):
        deepspeeds_reduce(comm_dtype)
        if flushing:  # the epilogue reads the gradients next: every reduction must be in
            for work, flat, grads in pending:
                work.wait()
                for grad, reduced in zip(grads, self.unflatten(flat, grads)):
                    grad.copy_(reduced)
            pending.clear()

    def epilogue(self):
        nonlocal flushing
        flushing = True
        try:
            return deepspeeds_epilogue()
        finally:
            flushing = False

    zero.allreduce_and_copy = types.MethodType(allreduce_and_copy, zero)
    zero.reduce_ipg_grads = types.MethodType(reduce_ipg_grads, zero)
    zero.independent_gradient_partition_epilogue = types.MethodType(epilogue, zero)


def zero3_partition(value: torch.Tensor, piece: int, rank: int) -> torch.Tensor:
    """Data-parallel rank `rank`'s `piece` values of `value` flattened, zero padded past its end."""
    flat = value.flatten()
    out = torch.zeros(piece, dtype=flat.dtype, device=flat.device)
    mine = flat[rank * piece : (rank + 1) * piece]
    out[: mine.numel()] = mine
    return out
