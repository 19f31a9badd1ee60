"""The same training step in plain PyTorch, without DeepSpeed: the reference our engine must match.

Tests compare DeepSpeed runs of every ZeRO stage against it, and the throughput benchmark uses it
(optionally compiled) as the speed to beat. Same model init, data order, AdamW, clipping and
learning-rate schedule as lm.train. In one process it takes the whole global batch by gradient
accumulation; in a process group (torchrun) it is data-parallel under torch's
DistributedDataParallel, each rank on lm.train's rows, the reference for several-rank engines.
"""

import contextlib
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from data_prep.shards import ShardSet
from lm.config import RunConfig
from lm.data import WindowBatches, rank_rows
from lm.initialization import build_gpt
from lm.schedule import build_optimizer, build_scheduler


def train_plain(config: RunConfig, steps: int | None = None, device: str = "cpu", compile: bool = False) -> dict:
    """Train for `steps` (default train.steps) optimizer steps.

    Returns the per-step losses and wall-clock seconds, the whole run's tokens/s, and the model.
    """
    t = config.train
    steps = t.steps if steps is None else steps
    shards = ShardSet.open(config.data.path, verify=False)
    batches = WindowBatches(shards.tokens(config.data.train_split), config.model.block_size, t.batch_size, t.seed)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    model = build_gpt(config, device)  # lm.train's model, whole: no ZeRO
    torch.manual_seed(t.seed + 1 + rank)  # lm.train's dropout stream of this data-parallel rank
    optimizer = build_optimizer(model, t)
    scheduler = build_scheduler(optimizer, t)
    replicas = DistributedDataParallel(model) if world > 1 else model  # averages gradients over ranks
    forward = torch.compile(replicas) if compile else replicas
    # Both bf16 modes compute under autocast here; only lm.train's bf16-weights also stores bf16 weights.
    autocast = torch.autocast(
        device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=t.precision != "fp32"
    )
    accum = t.grad_accum_steps(world)
    losses, step_seconds, start = [], [], time.perf_counter()
    for step in range(steps):
        step_start = time.perf_counter()
        batch = batches.global_batch(step).to(device)
        total = torch.zeros((), device=device)  # summed on the device: no sync per micro step
        for micro in range(accum):
            rows = rank_rows(batch, rank, world, t.micro_batch_size, micro)
            # DDP reduces once per step: at the last micro step, as DeepSpeed does.
            reduce_later = replicas.no_sync() if world > 1 and micro < accum - 1 else contextlib.nullcontext()
            with reduce_later:
                with autocast:
                    _, loss = forward(rows[:, :-1], rows[:, 1:])
                (loss / accum).backward()
            total += loss.detach().float()
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        if world > 1:
            dist.all_reduce(total)  # the mean over ranks, as lm.train reports it
        losses.append(total.item() / (accum * world))  # one sync per step, as lm.train's logging does
        step_seconds.append(time.perf_counter() - step_start)
    seconds = time.perf_counter() - start
    tokens = steps * t.batch_size * config.model.block_size  # over all ranks
    return {
        "losses": losses,
        "step_seconds": step_seconds,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "model": model,
    }
