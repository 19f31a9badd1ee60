"""lm.engine's Engine: a DeepSpeed engine over one rank's model, and the calls training makes on it."""

import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from lm.config import RunConfig
from lm.ds_config import clips_itself, deepspeed_config, engine_stage, weights_are_master
from lm.engine.files import GuardedWrites, read_checkpoint_file
from lm.engine.zero import (
    gather_weights_by_broadcast,
    norm_in_one_reduction,
    reduce_buckets_async,
    share_master_weights,
    zero3_partition,
)
from lm.numerics import SkippableAdamW
from lm.parallel import ParallelGroups


def quiet_deepspeed() -> None:
    """DeepSpeed logs every step's bookkeeping at INFO; keep warnings only."""
    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)
    # DeepSpeed's ZeRO calls a collective that torch has deprecated; not ours to fix.
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)


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
            norm_in_one_reduction(self.ds.optimizer)
            reduce_buckets_async(self.ds.optimizer)
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
