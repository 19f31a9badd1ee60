"""The same training step in plain PyTorch, without DeepSpeed: the reference our engine must match.

Tests compare DeepSpeed runs of every ZeRO stage against it, and the throughput benchmark uses it
(optionally compiled) as the speed to beat. Same model init, data order, AdamW, clipping and
learning-rate schedule as lm.train. In one process it takes the whole global batch by gradient
accumulation; in a process group (torchrun) it is data-parallel under torch's
DistributedDataParallel, each rank on lm.train's rows, the reference for several-rank engines.
"""

import contextlib
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.profiler import record_function

from lm.config import RunConfig
from lm.data import rank_rows
from lm.initialization import build_gpt
from lm.mixture import open_run_data
from lm.schedule import build_optimizer, build_scheduler


class PlainStep:
    """One optimizer step of the plain loop, callable for global batch `step`; returns the mean loss.

    Built once per run: lm.train's model (whole: no ZeRO), AdamW and schedule, DDP in a group.
    benchmarks/profile_step.py times these same steps.
    """

    def __init__(self, config: RunConfig, device: str = "cpu", compile: bool = False):
        t = self.train = config.train
        self.device = device
        self.batches = open_run_data(config, verify=False).batches  # data.path's, or a mixture's
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        self.model = build_gpt(config, device)
        torch.manual_seed(t.seed + 1 + self.rank)  # lm.train's dropout stream of this data-parallel rank
        self.optimizer = build_optimizer(self.model, t)
        self.scheduler = build_scheduler(self.optimizer, t)
        self.replicas = DistributedDataParallel(self.model) if self.world > 1 else self.model  # averages gradients
        self.forward = torch.compile(self.replicas) if compile else self.replicas
        # Both bf16 modes compute under autocast here; only lm.train's bf16-weights also stores bf16 weights.
        self.autocast = torch.autocast(
            device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=t.precision != "fp32"
        )
        self.accum = t.grad_accum_steps(self.world)

    def __call__(self, step: int) -> torch.Tensor:
        t, accum = self.train, self.accum
        batch = self.batches.global_batch(step).to(self.device)
        total = torch.zeros((), device=self.device)  # summed on the device: no sync per micro step
        for micro in range(accum):
            rows = rank_rows(batch, self.rank, self.world, t.micro_batch_size, micro)
            # DDP reduces once per step: at the last micro step, as DeepSpeed does.
            last = micro == accum - 1
            reduce_later = self.replicas.no_sync() if self.world > 1 and not last else contextlib.nullcontext()
            with reduce_later:
                with self.autocast, record_function("forward"):  # the ranges lm.train names too
                    _, loss = self.forward(rows[:, :-1], rows[:, 1:])
                with record_function("backward"):
                    (loss / accum).backward()
            total += loss.detach().float()
        with record_function("optimizer"):
            if t.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
        if self.world > 1:
            dist.all_reduce(total)  # the mean over ranks, as lm.train reports it
        return total / float(accum * self.world)  # on the device: the caller syncs when it logs


def train_plain(
    config: RunConfig,
    steps: int | None = None,
    device: str = "cpu",
    compile: bool = False,
    sync_every: int = 1,
    between_intervals: Callable[[], None] | None = None,
) -> dict:
    """Train for `steps` (default train.steps) optimizer steps, the host waiting for the device
    only every `sync_every` steps (as lm.train waits only where it logs, every train.log_interval).
    `between_intervals`, if given, is called before the first interval and after each but the
    last, untimed (the throughput benchmark's rows take turns there).

    Returns the per-step losses and wall-clock seconds (each step of an interval its mean), the
    whole run's tokens/s, and the model.
    """
    steps = config.train.steps if steps is None else steps
    step_once = PlainStep(config, device, compile)
    pause = between_intervals or (lambda: None)
    losses, step_seconds, pending = [], [], []
    pause()
    seconds = 0.0
    clock = time.perf_counter()
    for step in range(steps):
        pending.append(step_once(step))
        if (step + 1) % sync_every == 0 or step + 1 == steps:
            losses += torch.stack(pending).tolist()  # the sync
            now = time.perf_counter()
            step_seconds += [(now - clock) / len(pending)] * len(pending)
            seconds += now - clock
            pending = []
            if step + 1 < steps:
                pause()
            clock = time.perf_counter()
    tokens = steps * config.train.batch_size * config.model.block_size  # over all ranks
    return {
        "losses": losses,
        "step_seconds": step_seconds,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "model": step_once.model,
    }
