"""Everything the project asks of DeepSpeed, in one module: a DeepSpeed upgrade is an audit of this file.

DeepSpeed's engine partitions the model and its optimizer state by ZeRO stage, reduces gradients
over the data-parallel group, applies the update at the last micro step of a global batch, and
saves and loads its own checkpoint files. Around it, we:
- build it from our model, optimizer and LR schedule, with the JSON of lm.ds_config and our
  tensor-parallel groups as its Megatron `mpu`;
- run ZeRO-1/2 as ZeRO-0 on one data-parallel rank (lm.ds_config.engine_stage), and switch off
  ZeRO-0's gradient all-reduce there (a group of one);
- clip gradients with torch's foreach clip_grad_norm_ where each rank holds them whole (ZeRO-0,
  no TP: lm.ds_config.clips_itself), instead of DeepSpeed's loop over parameters;
- on one such rank with no data parallelism, step as the plain loop does (Engine.direct): the
  engine there has nothing to reduce, partition or scale, and its wrappers' Python (hooks,
  timers, profiler checks, zero_grad over named_parameters) cost 1-2% of a small model's step;
  its counters are kept, so its checkpoints are the same;
- let ZeRO-1/2's fp32 master partition be the fp32 weights' own (share_master_weights);
- gather ZeRO-1/2's updated weights over gloo by broadcasts, twice as fast as its all-gather;
- skip an update that lm.numerics found non-finite (SkippableAdamW), and advance the LR schedule
  where DeepSpeed discards a step itself, which it does not do;
- read its checkpoint files without running code from them (lm.safe_load, allowing the few plain
  DeepSpeed classes they contain), for resuming and for lm.consolidate, refusing a file of another
  save than its checkpoint's (lm.checkpoint.check_stamp);
- write its checkpoint files through lm.checkpoint.write_tensors, stamped with the save, and
  record a failed write (a full disk) instead of raising it, so that every rank still meets
  DeepSpeed's collectives inside its save and lm.saving can end the run on all ranks alike;
- partition ZeRO-3 parameters one at a time as they are first drawn (sharded initialisation);
- reach each rank's share of a ZeRO-3 parameter (`ds_tensor`);
- place Adam's state re-split for this layout (resuming on another layout, lm.resume) into
  whatever holds it under each stage, and read it back whole;
- keep its logger to warnings.
Process-group set-up (`deepspeed.init_distributed`) is lm.distributed's.
"""

import logging
import os
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from lm import checkpoint as ckpt
from lm.config import RunConfig
from lm.distributed import select_accelerator
from lm.ds_config import clips_itself, deepspeed_config, engine_stage, weights_are_master
from lm.numerics import SkippableAdamW
from lm.parallel import ParallelGroups
from lm.safe_load import load_tensors


def quiet_deepspeed() -> None:
    """DeepSpeed logs every step's bookkeeping at INFO; keep warnings only."""
    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)
    # DeepSpeed's ZeRO calls a collective that torch has deprecated; not ours to fix.
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)


def checkpoint_classes() -> list[type]:
    """The plain DeepSpeed classes its checkpoint files pickle (values only, no code)."""
    select_accelerator()
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def read_checkpoint_file(path: Path) -> dict:
    """One file of a DeepSpeed checkpoint, read without running code from it, of the same save as
    its checkpoint's marker."""
    return ckpt.check_stamp(path, load_tensors(path, checkpoint_classes()))


def check_checkpoint_files(tag_dir: Path) -> None:
    """Every .pt file of `tag_dir` is of its checkpoint's save, checked cheaply (tensors mapped, not
    read) on every rank before any is loaded: a bad file a single rank loads would end that rank
    alone, and only rank 0 reports errors."""
    for path in sorted(tag_dir.glob("*.pt")):
        ckpt.check_stamp(path, load_tensors(path, checkpoint_classes(), mmap=True))


class GuardedWrites:
    """What DeepSpeed's save writes, through lm.checkpoint.write_tensors, each file stamped with
    the save; the first failed write is kept in `error` (and nothing more is written) instead of
    raised, so that this rank goes on through the save's collectives with the others."""

    def __init__(self):
        self.stamp: dict | None = None
        self.error: str | None = None

    def begin(self, stamp: dict) -> None:
        self.stamp, self.error = stamp, None

    def attempt(self, write, path) -> None:
        if self.error is not None:
            return
        try:
            write()
        except OSError as exc:
            self.error = ckpt.write_failure(exc, path)

    def save(self, state_dict: dict, path: str) -> None:
        self.attempt(lambda: ckpt.write_tensors({**state_dict, ckpt.STAMP_KEY: self.stamp}, Path(path)), path)

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        self.attempt(lambda: os.makedirs(path, exist_ok=exist_ok), path)


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
        for partitions, group in zip(partitioned_param_groups, dp_process_group):
            if len(partitions) == 1:
                continue
            # Views of the group's flat weights, in rank order: filling each fills the whole.
            sends = [
                dist.broadcast(part, src=dist.get_global_rank(group, owner), group=group, async_op=True)
                for owner, part in enumerate(partitions)
            ]
            for work in sends:
                work.wait()

    all_gather_dp_groups.broadcasts_over_gloo = True
    stage_1_and_2.all_gather_dp_groups = all_gather_dp_groups


def zero3_partition(value: torch.Tensor, piece: int, rank: int) -> torch.Tensor:
    """Data-parallel rank `rank`'s `piece` values of `value` flattened, zero padded past its end."""
    flat = value.flatten()
    out = torch.zeros(piece, dtype=flat.dtype, device=flat.device)
    mine = flat[rank * piece : (rank + 1) * piece]
    out[: mine.numel()] = mine
    return out


class Engine:
    """A DeepSpeed engine over one rank's model, and the calls training makes on it."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: SkippableAdamW,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        config: RunConfig,
        groups: ParallelGroups,
    ):
        import deepspeed

        train = config.train
        device = next(model.parameters()).device.type
        self.ds, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            mpu=groups,
            config=deepspeed_config(train, groups.dp_size, config.model, device),
            dist_init_required=False,
        )
        self.optimizer = optimizer
        self.zero_rank = groups.zero_rank  # its ZeRO partitions' index, over DP x CP
        self.stage = engine_stage(train, groups.dp_size)  # the stage DeepSpeed runs, and saves files of
        clip_is_ours = clips_itself(train, groups.dp_size)
        self.clip = train.grad_clip if clip_is_ours else 0.0
        self.norm: torch.Tensor | None = None  # the last step's gradient norm, where we clip
        if self.stage in (1, 2) and weights_are_master(train):
            share_master_weights(self.ds.optimizer)
        if self.stage in (1, 2):
            gather_weights_by_broadcast()
        if self.stage == 0 and groups.zero_size == 1:
            # ZeRO-0 would flatten, all-reduce over a group of one and copy back every gradient.
            self.ds.enable_backward_allreduce = False
        self.direct = clip_is_ours and groups.zero_size == 1
        if self.direct:  # its forward hooks would still run on the module: removed as DeepCompile does
            for hook in ("module_forward_pre_hook", "module_forward_post_hook"):
                getattr(self.ds, hook).remove()
                setattr(self.ds, hook, None)
        self.accum = self.ds.gradient_accumulation_steps()
        self.autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=train.precision == "bf16")
        # DeepSpeed's own loader calls torch.load(weights_only=False), which executes whatever a
        # crafted file asks for; every file it reads goes through the safe reader instead.
        self.ds.checkpoint_engine.load = lambda path, map_location=None: read_checkpoint_file(Path(path))
        self.writes = GuardedWrites()
        self.ds.checkpoint_engine.save = self.writes.save
        self.ds.checkpoint_engine.makedirs = self.writes.makedirs
        copy_script = self.ds._copy_recovery_script  # rank 0 copies zero_to_fp32.py beside the checkpoints
        self.ds._copy_recovery_script = lambda path: self.writes.attempt(lambda: copy_script(path), path)

    @property
    def module(self) -> torch.nn.Module:
        """The model as this rank holds it (ZeRO-3: parameters gathered only inside forward/backward)."""
        return self.ds.module

    def __call__(self, *args, **kwargs):
        if self.direct:
            with self.autocast:  # as DeepSpeed's torch_autocast (lm.ds_config.precision_config)
                return self.ds.module(*args, **kwargs)
        return self.ds(*args, **kwargs)

    def train(self) -> None:
        self.ds.train()

    def eval(self) -> None:
        self.ds.eval()

    def lr(self) -> float:
        """The learning rate the next update uses."""
        return self.ds.get_lr()[0]

    def backward(self, loss: torch.Tensor) -> None:
        if self.direct:
            (loss / self.accum).backward()  # DeepSpeed's scaling for gradient accumulation
        else:
            self.ds.backward(loss)

    def step(self, skip_update: bool = False) -> bool:
        """DeepSpeed's step after every micro batch: it updates at the last one of a global batch.

        `skip_update` (meaningful at the last micro step) leaves weights and Adam's state as they
        are. Returns False when this was the last micro step and no update was applied.
        """
        boundary = self.ds.is_gradient_accumulation_boundary()  # asked before step() moves on
        if boundary and self.clip > 0:  # gradients are whole and reduced by now (see clips_itself)
            self.norm = torch.nn.utils.clip_grad_norm_(self.ds.module.parameters(), self.clip)
        if self.direct:
            return self._direct_step(boundary, skip_update)
        self.optimizer.skip_update = skip_update
        try:
            self.ds.step()
        finally:
            self.optimizer.skip_update = False
        if not boundary:
            return True
        if not self.ds.was_step_applied():
            # DeepSpeed discarded the step itself (its own overflow check, some stages only) and so
            # did not advance the LR schedule: advance it, so the LR stays a function of the step.
            self.ds.lr_scheduler.step()
            return False
        return not skip_update

    def _direct_step(self, boundary: bool, skip_update: bool) -> bool:
        """DeepSpeed's ZeRO-0 step on one rank, for fp32 weights (_take_model_step), without its
        wrappers; it advances the counters its checkpoints save."""
        ds = self.ds
        ds.micro_steps += 1
        if not boundary:
            return True
        if not skip_update:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        ds.lr_scheduler.step()
        ds.global_steps += 1
        ds.global_samples += ds.train_batch_size()
        return not skip_update

    def grad_norm(self) -> torch.Tensor | float | None:
        """The last step's global gradient norm, left on the device (no sync); None where nobody
        computed one (no clipping at ZeRO-0)."""
        return self.norm if self.norm is not None else self.ds.get_global_grad_norm()

    def local_weights(self) -> Iterator[torch.Tensor]:
        """This rank's share of every parameter (ZeRO-3 keeps it in `ds_tensor`, else the parameter)."""
        for p in self.ds.module.parameters():
            yield getattr(p, "ds_tensor", p)

    def save(self, tag_dir: Path, client_state: dict, stamp: dict) -> str | None:
        """Every rank writes its DeepSpeed files of checkpoint `tag_dir` (a collective), each
        carrying `stamp`; returns this rank's failed write, in words, or None. `latest` is
        lm.saving's to write, once the checkpoint is complete."""
        self.writes.begin(stamp)
        self.ds.save_checkpoint(str(tag_dir.parent), tag=tag_dir.name, client_state=client_state, save_latest=False)
        return self.writes.error

    def load(self, tag_dir: Path) -> dict:
        """Weights, optimizer and schedule from DeepSpeed's files of `tag_dir`; returns the client state."""
        _, client_state = self.ds.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
        return client_state

    def _flat_groups(self) -> list[tuple[torch.Tensor, list[torch.nn.Parameter]]]:
        """ZeRO-1/2/3: per flat group, this rank's fp32 partition (what Adam steps on) and the
        model parameters flattened into it."""
        zero = self.ds.optimizer
        if self.stage in (1, 2):
            return list(zip(zero.single_partition_of_fp32_groups, zero.bit16_groups))
        return list(zip(zero.fp32_partitioned_groups_flat, zero.fp16_groups))

    def _link_optimizer_state(self) -> None:
        """ZeRO-1/2: point each parameter's fragment of the flat state at Adam's state tensors.

        DeepSpeed links them once, after its first group's first update, when the other groups'
        state does not exist yet: their parameters never get a fragment (safe_get_full_optimizer_state
        fails on them). Linking again, once every group has state, is what it meant to do."""
        from deepspeed.utils import lazy_init_hp_params_optimizer_state

        if self.stage in (1, 2):
            for flat, params in self._flat_groups():
                lazy_init_hp_params_optimizer_state(params, flat, self.optimizer.state)

    @torch.no_grad()
    def set_optimizer_state(self, moments: dict[str, dict[str, torch.Tensor]], steps: dict[str, torch.Tensor]) -> None:
        """Adam's state for a freshly built engine, before its first step: `moments[key][name]` is
        this TP rank's slice of parameter `name`, whole over the data-parallel ranks; each keeps its
        own partition. `steps[name]` is Adam's step count (all of a flat group's parameters share
        one). The weights are the model's already (its initial weights are the checkpoint's)."""
        from deepspeed.utils import safe_set_full_optimizer_state, safe_set_local_optimizer_state

        names = {id(p): name for name, p in self.ds.module.named_parameters()}
        state = self.optimizer.state  # Adam's own state, under every stage: DeepSpeed steps this optimizer
        if self.stage == 0:
            for p in self.ds.module.parameters():
                name = names[id(p)]
                state[p] = {"step": steps[name].to(p.device, torch.float32).clone()}
                state[p].update({key: moments[key][name].to(p.device, p.dtype).clone() for key in moments})
            return
        for flat, params in self._flat_groups():
            step = steps[names[id(params[0])]].to(flat.device, torch.float32).clone()
            state[flat] = {"step": step, **{key: torch.zeros_like(flat) for key in moments}}
        self._link_optimizer_state()
        for p in self.ds.module.parameters():
            for key, values in moments.items():
                value = values[names[id(p)]]
                if self.stage in (1, 2):
                    safe_set_full_optimizer_state(p, value, key)
                else:  # its partition, cut as ZeRO-3 cuts the weights: ceil(n / dp) values each, zero padded
                    safe_set_local_optimizer_state(p, zero3_partition(value, p.ds_tensor.numel(), self.zero_rank), key)

    @torch.no_grad()
    def full_optimizer_state(self) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
        """This TP rank's Adam state as set_optimizer_state takes it: each moment whole over the
        data-parallel ranks (a collective under ZeRO-1/2/3), and the step counts."""
        from deepspeed.utils import safe_get_full_optimizer_state

        moments: dict[str, dict[str, torch.Tensor]] = {"exp_avg": {}, "exp_avg_sq": {}}
        steps = {}
        self._link_optimizer_state()
        flat_of = {id(p): flat for flat, params in (self._flat_groups() if self.stage else []) for p in params}
        for name, p in self.ds.module.named_parameters():
            state = self.optimizer.state[p] if self.stage == 0 else self.optimizer.state[flat_of[id(p)]]
            steps[name] = state["step"].cpu().clone()
            for key in moments:
                value = state[key] if self.stage == 0 else safe_get_full_optimizer_state(p, key)
                moments[key][name] = value.cpu().clone()
        return moments, steps
