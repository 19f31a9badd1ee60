"""What a run measures and where it goes: losses averaged over ranks, the validation loss, the
memory probe, and rank 0's console line, metrics.jsonl, TensorBoard scalars and (train.wandb)
Weights & Biases, which gets what TensorBoard gets: the same keys at the same steps."""

import json
import resource
from pathlib import Path

import torch
import torch.distributed as dist

from core.errors import UserError
from lm.config import RunConfig
from lm.distributed import World
from lm.parallel import ParallelGroups
from lm.parallel.context import context_layout


def means_over_ranks(sums: torch.Tensor, count: int, device: torch.device) -> list[float]:
    """The mean over every rank of each entry of `sums` (each a sum of `count` values on this rank):
    one all-reduce for them all; syncs the host."""
    # Collectives run on the backend's device: NCCL has no CPU tensors.
    total = sums.detach().float().to(device)
    dist.all_reduce(total)
    return (total / float(count * dist.get_world_size())).tolist()


@torch.no_grad()
def validation_loss(
    engine, windows: list[torch.Tensor], config: RunConfig, world: World, groups: ParallelGroups
) -> float:
    """Mean token loss over the validation windows, split across data-parallel ranks.

    Every rank runs the same number of forward passes (ZeRO-3 gathers parameters collectively),
    padding its share with zero-weight copies of the first window. The ranks of a TP group score
    the same windows, those of a CP group each its chunk of them (chunks of one size): summing over
    the world counts each TP replica and each chunk alike, so the mean holds.
    """
    engine.eval()
    context = context_layout(groups, config.train.context_parallel_impl)
    mine = windows[groups.dp_rank :: groups.dp_size]
    per_rank = -(-len(windows) // groups.dp_size)
    weights = torch.tensor([1.0] * len(mine) + [0.0] * (per_rank - len(mine)))
    mine = mine + [windows[0]] * (per_rank - len(mine))
    total = torch.zeros(())
    mb = config.train.micro_batch_size
    for i in range(0, per_rank, mb):
        rows = torch.stack(mine[i : i + mb]).to(world.device)
        _, per_token = engine(*context.chunk(rows), reduction="none")  # this rank's chunk (context parallel)
        per_row = per_token.float().mean(dim=1)
        total += (per_row.cpu() * weights[i : i + mb]).sum()
    engine.train()
    stats = torch.stack([total, weights.sum()]).to(world.device)
    dist.all_reduce(stats)
    return (stats[0] / stats[1]).item()


def memory_mib(world: World) -> float:
    """Peak memory so far: the GPU's allocations, or this process's peak RSS on the CPU."""
    if world.device.type == "cuda":
        return torch.cuda.max_memory_allocated(world.device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def progress_line(step: int, steps: int, values: dict) -> str:
    grad = f"grad {values['train/grad_norm']:.3f} | " if "train/grad_norm" in values else ""
    mfu = f" ({values['train/mfu']:.1%} MFU)" if "train/mfu" in values else ""
    return (
        f"step {step}/{steps} | loss {values['train/loss']:.4f} | lr {values['train/lr']:.2e} | {grad}"
        f"{values['train/tokens_per_s'] / 1e3:.1f}k tok/s{mfu} | {values['train/memory_mib']:.0f} MiB"
    )


def import_wandb():
    """The wandb package, or the one line that says how to install it."""
    try:
        import wandb  # only when asked for: optional, and slow to import
    except ImportError:
        raise UserError(
            "train.wandb is set but the wandb package is not installed: pip install wandb "
            "(or pip install 'twicing-lm[wandb]'), or leave train.wandb out"
        ) from None
    return wandb


def check_wandb(config: RunConfig) -> None:
    """Before anything is built: a run that asks for wandb needs the package."""
    if config.train.wandb is not None:
        import_wandb()


def start_wandb(run_dir: Path, config: RunConfig):
    """Rank 0's wandb run, its files under run_dir/wandb. A resumed run continues the same wandb run:
    its id is kept in run_dir/wandb-run-id."""
    wandb, w = import_wandb(), config.train.wandb
    id_file = run_dir / "wandb-run-id"
    run = wandb.init(
        project=w.project,
        entity=w.entity,
        name=w.name or run_dir.resolve().name,
        mode=w.mode,
        dir=str(run_dir),
        id=id_file.read_text().strip() if id_file.is_file() else None,
        resume="allow",
        config=config.to_dict(),
        allow_val_change=True,  # a resumed run may change what does not change the training (out_dir, logging)
        settings=wandb.Settings(console="off", silent=True),  # our console stays ours
    )
    id_file.write_text(run.id)
    return run


class RunLog:
    """Rank 0's console line, metrics.jsonl, TensorBoard and wandb scalars; other ranks record nothing."""

    def __init__(self, run_dir: Path, config: RunConfig, world: World):
        self.enabled = world.is_main
        self.writer = self.wandb = None
        if not self.enabled:
            return
        self.metrics = open(run_dir / "metrics.jsonl", "a")
        if config.train.tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # slow to import: only when asked for

            self.writer = SummaryWriter(str(run_dir / "tensorboard"))
        if config.train.wandb is not None:
            self.wandb = start_wandb(run_dir, config)

    def say(self, line: str) -> None:
        if self.enabled:
            print(line, flush=True)

    def record(self, step: int, console: str | None = None, **values) -> None:
        if not self.enabled:
            return
        self.metrics.write(json.dumps({"step": step, **values}) + "\n")
        self.metrics.flush()
        if self.writer:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)
        if console:
            print(console, flush=True)

    def event(self, step: int, line: str) -> None:
        """A line that is no measurement (how the run ended): the console and metrics.jsonl, no scalar."""
        if self.enabled:
            self.metrics.write(json.dumps({"step": step, "event": line}) + "\n")
            self.metrics.flush()
            print(line, flush=True)

    def close(self) -> None:
        if self.enabled:
            self.metrics.close()
            if self.writer:
                self.writer.close()
            if self.wandb is not None:
                self.wandb.finish()
