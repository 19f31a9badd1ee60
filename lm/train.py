"""Training under a DeepSpeed engine.

    lm train --config configs/demo.yaml [--set train.steps=50 ...] [--resume auto]
    deepspeed --num_gpus 2 --module lm.train --config configs/demo.yaml

Every rank builds the same model from the same seed, DeepSpeed partitions it by ZeRO stage, and
each optimizer step consumes global batch number `step` of the data (see lm.data): the data
position is the step, so a resumed run sees exactly the batches an uninterrupted one would.
Rank 0 writes config.yaml, metrics.jsonl (one line per step and per validation) and TensorBoard
scalars into the run directory `train.out_dir`.
"""

import argparse
import importlib.util
import json
import math
import os
import resource
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from lm import checkpoint as ckpt
from lm.attention import get_attention
from lm.config import RunConfig, load_config
from lm.consolidate import protect_checkpoint_loading
from lm.data import WindowBatches, eval_windows, rank_rows
from lm.distributed import World, init_distributed, quiet_deepspeed
from lm.ds_config import deepspeed_config
from lm.errors import UserError, run_command
from lm.model import GPT
from lm.numerics import NonFiniteGuard, SkippableAdamW, weights_are_finite
from lm.parallel import ParallelGroups, build_groups, shard_model
from lm.schedule import build_optimizer, build_scheduler
from lm.shards import ShardSet


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="lm train", description="Train a GPT under DeepSpeed ZeRO from a YAML run config.")
    p.add_argument("--config", required=True, help="YAML run config with sections model, data, train")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value (repeatable)")
    p.add_argument(
        "--resume", default="none", metavar="auto|none|PATH",
        help="auto: continue from the newest complete checkpoint in train.out_dir, if any; PATH: a run or checkpoint directory",
    )
    p.add_argument(
        "--stop-at", type=int, default=None, metavar="STEP",
        help="stop after STEP steps and checkpoint, keeping the schedule of train.steps (continue with --resume auto)",
    )
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.stop_at is not None and args.stop_at < 1:
        raise UserError(f"--stop-at must be positive, got {args.stop_at}")
    train(load_config(args.config, args.set), resume=args.resume, stop_at=args.stop_at)
    return 0


def open_data(config: RunConfig) -> ShardSet:
    shards = ShardSet.open(config.data.path, verify=config.data.verify_checksums)
    if shards.vocab_size > config.model.vocab_size:
        raise UserError(
            f"tokenizer/model vocabulary mismatch: the shards in {config.data.path} use {shards.vocab_size} ids "
            f"but model.vocab_size is {config.model.vocab_size}"
        )
    return shards


def find_resume_point(config: RunConfig, resume: str) -> Path | None:
    """The checkpoint to resume from, or None for a fresh run; refuses to overwrite a run."""
    run_dir = Path(config.train.out_dir)
    if resume == "none":
        if ckpt.complete_checkpoints(run_dir) or (run_dir / "metrics.jsonl").exists():
            raise UserError(f"{run_dir} already holds a run; pass --resume auto to continue it, or choose another train.out_dir")
        return None
    if resume == "auto":
        found = ckpt.complete_checkpoints(run_dir)
        tag_dir = found[-1] if found else None
    else:
        tag_dir = ckpt.resolve_checkpoint(resume)
    if tag_dir is not None:
        ckpt.check_same_model(tag_dir, config.model)
        if not ckpt.is_weights_only(tag_dir):  # full weights fit any layout; DeepSpeed's files only theirs
            ckpt.check_same_layout(tag_dir, config.train)
            check_same_weights_dtype(tag_dir, config.train.precision)
    return tag_dir


def check_same_weights_dtype(tag_dir: Path, precision: str) -> None:
    """fp32 and bf16 (autocast) keep the same fp32 state; bf16-weights keeps DeepSpeed's other files."""
    saved = ckpt.read_marker(tag_dir)["config"]["train"].get("precision", "fp32")
    if (saved == "bf16-weights") != (precision == "bf16-weights"):
        raise UserError(f"{tag_dir} was written with train.precision={saved}, whose DeepSpeed files do not load under "
                        f"{precision}; resume with {saved}, or start from its weights (lm convert --to checkpoint)")


def build_engine(config: RunConfig, world: World, groups: ParallelGroups,
                 initial_weights: dict | None = None, start_step: int = 0):
    """The DeepSpeed engine; `initial_weights` (full, unsplit) replace the seeded initialisation."""
    import deepspeed

    torch.manual_seed(config.train.seed)  # same initial weights on every rank and layout
    model = GPT(config.model)
    if initial_weights is not None:
        model.load_state_dict(initial_weights)
    n_params = model.num_parameters()  # of the whole model, before TP slices and ZeRO partitions it
    model = shard_model(model, groups).to(world.device)
    t = config.train
    if t.compile:
        model.compile()  # in place: parameter and state-dict names stay those of the GPT
    optimizer = build_optimizer(model, t, world.device, kind=SkippableAdamW)
    scheduler = build_scheduler(optimizer, t, start_step)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, mpu=groups,
        config=deepspeed_config(t, groups.dp_size), dist_init_required=False,
    )
    if t.zero_stage == 0 and groups.dp_size == 1:
        # ZeRO-0 would flatten, all-reduce over a group of one and copy back every gradient.
        engine.enable_backward_allreduce = False
    return engine, optimizer, n_params


def check_can_compile() -> None:
    """torch.compile's inductor needs Triton on a GPU and a C++ compiler on the CPU."""
    if torch.cuda.is_available():  # the device lm.distributed picks
        if importlib.util.find_spec("triton") is None:
            raise UserError("train.compile needs Triton on the GPU, which is not installed; set train.compile=false")
    elif not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "clang++")):
        raise UserError("train.compile needs a C++ compiler on the CPU (g++, clang++ or $CXX); set train.compile=false")


def mean_over_ranks(value: torch.Tensor, count: int, device: torch.device) -> float:
    # Collectives run on the backend's device: NCCL has no CPU tensors.
    total = torch.stack([value.detach().float().sum(), torch.tensor(float(count), device=value.device)]).to(device)
    dist.all_reduce(total)
    return (total[0] / total[1]).item()


@torch.no_grad()
def validate(engine, windows: list[torch.Tensor], config: RunConfig, world: World, groups: ParallelGroups) -> float:
    """Mean token loss over the validation windows, split across data-parallel ranks.

    Every rank runs the same number of forward passes (ZeRO-3 gathers parameters collectively),
    padding its share with zero-weight copies of the first window. The ranks of a TP group score
    the same windows; summing over the world counts each TP replica alike, so the mean holds.
    """
    engine.eval()
    mine = windows[groups.dp_rank :: groups.dp_size]
    per_rank = -(-len(windows) // groups.dp_size)
    weights = torch.tensor([1.0] * len(mine) + [0.0] * (per_rank - len(mine)))
    mine = mine + [windows[0]] * (per_rank - len(mine))
    total = torch.zeros(())
    mb = config.train.micro_batch_size
    for i in range(0, per_rank, mb):
        rows = torch.stack(mine[i : i + mb]).to(world.device)
        _, per_token = engine(rows[:, :-1], rows[:, 1:], reduction="none")
        per_row = per_token.float().mean(dim=1)
        total += (per_row.cpu() * weights[i : i + mb]).sum()
    engine.train()
    stats = torch.stack([total, weights.sum()]).to(world.device)
    dist.all_reduce(stats)
    return (stats[0] / stats[1]).item()


def memory_mib(world: World) -> float:
    if world.device.type == "cuda":
        return torch.cuda.max_memory_allocated(world.device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak RSS (KiB on Linux)


class RunLog:
    """Rank 0's console line, metrics.jsonl and TensorBoard scalars."""

    def __init__(self, run_dir: Path, config: RunConfig, world: World):
        self.enabled = world.is_main
        self.writer = None
        if not self.enabled:
            return
        self.metrics = open(run_dir / "metrics.jsonl", "a")
        if config.train.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def record(self, step: int, console: str | None = None, **values):
        if not self.enabled:
            return
        self.metrics.write(json.dumps({"step": step, **values}) + "\n")
        self.metrics.flush()
        if self.writer:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)
        if console:
            print(console, flush=True)

    def close(self):
        if self.enabled:
            self.metrics.close()
            if self.writer:
                self.writer.close()


def progress_line(step: int, steps: int, values: dict) -> str:
    grad = f"grad {values['train/grad_norm']:.3f} | " if "train/grad_norm" in values else ""
    return (f"step {step}/{steps} | loss {values['train/loss']:.4f} | lr {values['train/lr']:.2e} | {grad}"
            f"{values['train/tokens_per_s'] / 1e3:.1f}k tok/s | {values['train/memory_mib']:.0f} MiB")


def last_checkpoint_hint(run_dir: Path) -> str:
    found = ckpt.complete_checkpoints(run_dir)
    last = f"the last complete checkpoint is {found[-1].name}" if found else "no checkpoint was saved"
    return f"{last}; resume with --resume auto"


def check_finite(loss: float, grad_norm: float | None, step: int, run_dir: Path, discarded: bool = False) -> None:
    """Stop at a non-finite loss or gradient norm, before anything non-finite can be saved.

    `discarded`: DeepSpeed dropped the update itself, which it does only for non-finite gradients.
    """
    if not discarded and math.isfinite(loss) and (grad_norm is None or math.isfinite(grad_norm)):
        return
    what = "loss" if not math.isfinite(loss) else "gradient norm"
    raise UserError(f"non-finite {what} at step {step}: training stopped without saving ({last_checkpoint_hint(run_dir)})")


def optimizer_step(engine, optimizer: SkippableAdamW, guard: NonFiniteGuard | None, batch: torch.Tensor,
                   grad_accum: int, config: RunConfig, groups: ParallelGroups, device: torch.device) -> tuple[float, bool]:
    """One optimizer step over a global batch: (mean loss over ranks, whether the update was skipped)."""
    mb = config.train.micro_batch_size
    loss_sum = torch.zeros((), device=device)  # summed on the device: no sync per micro step
    skip = False
    for micro in range(grad_accum):
        rows = rank_rows(batch, groups.dp_rank, groups.dp_size, mb, micro).to(device)
        _, loss = engine(rows[:, :-1], rows[:, 1:])
        engine.backward(loss)
        if guard is not None:
            guard.observe_loss(loss)
            if micro == grad_accum - 1:  # every gradient of the step has been observed
                skip = optimizer.skip_update = guard.agree()
        engine.step()  # DeepSpeed applies the update only at the last micro step
        loss_sum += loss.detach().float()
    optimizer.skip_update = False
    if not engine.was_step_applied():
        # DeepSpeed discarded the step itself (its own overflow check, some stages only) and so
        # did not advance the LR schedule: advance it, so the LR stays a function of the step.
        engine.lr_scheduler.step()
        skip = True
    return mean_over_ranks(loss_sum, grad_accum, device), skip


def prepare_run_dir(run_dir: Path, config: RunConfig, shards: ShardSet, world: World) -> None:
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        if shards.tokenizer_path.is_file():
            shutil.copyfile(shards.tokenizer_path, run_dir / "tokenizer.model")
    dist.barrier()


def save_checkpoint(engine, run_dir: Path, step: int, config: RunConfig, world: World, skipped_steps: int = 0) -> None:
    if not weights_are_finite(engine.module, world.device):  # the last line of defence: never a NaN checkpoint
        raise UserError(f"non-finite weights at step {step}: checkpoint not saved ({last_checkpoint_hint(run_dir)})")
    tag = ckpt.tag_for_step(step)
    root = ckpt.checkpoint_root(run_dir)
    engine.save_checkpoint(str(root), tag=tag, client_state={"step": step, "skipped_steps": skipped_steps})
    ckpt.save_rng_state(root / tag, world.rank)
    ckpt.sync_directory(root / tag)
    dist.barrier()  # every rank's files are on disk before the checkpoint is marked complete
    if world.is_main:
        info = {"step": step, "batches_consumed": step, "world_size": world.world_size, "config": config.to_dict()}
        ckpt.write_marker(root / tag, info)
        ckpt.apply_retention(run_dir, config.train.keep_last)
    dist.barrier()


def train(config: RunConfig, resume: str = "none", stop_at: int | None = None) -> dict:
    """Run (or continue) training; returns the per-step losses, validation results, the engine and groups.

    `stop_at` ends this invocation early (with a checkpoint) without changing the LR schedule.
    """
    run_dir = Path(config.train.out_dir)
    shards = open_data(config)  # before any process group: bad data fails fast and alike everywhere
    if config.train.compile:
        check_can_compile()
    resume_from = find_resume_point(config, resume)
    world = init_distributed()
    quiet_deepspeed()
    t = config.train
    groups = build_groups(t.tensor_parallel)
    seq_len = config.model.block_size
    batches = WindowBatches(shards.tokens(config.data.train_split), seq_len, t.batch_size, t.seed)
    val = eval_windows(shards.tokens(config.data.val_split), seq_len, t.eval_windows) if t.eval_windows else []
    grad_accum = t.grad_accum_steps(groups.dp_size)  # refuses sizes that do not divide
    # A weights-only checkpoint (lm convert --to checkpoint) restarts the engine from its weights.
    weights_only = resume_from is not None and ckpt.is_weights_only(resume_from)
    start = ckpt.read_marker(resume_from)["step"] if weights_only else 0
    initial = ckpt.load_model_weights(resume_from) if weights_only else None
    engine, optimizer, n_params = build_engine(config, world, groups, initial, start)
    guard = NonFiniteGuard(engine.module, world.device) if t.nonfinite == "skip" else None
    # Dropout draws from a stream of its own per data-parallel rank, shared by the ranks of a TP
    # group (it drops only replicated activations, see lm.parallel.shard); weights were drawn alike.
    torch.manual_seed(t.seed + 1 + groups.dp_rank)
    protect_checkpoint_loading(engine)
    skipped, in_a_row = 0, 0
    if resume_from is not None and not weights_only:
        _, client = engine.load_checkpoint(str(resume_from.parent), tag=resume_from.name)
        start, skipped = client["step"], client.get("skipped_steps", 0)
        ckpt.load_rng_state(resume_from, world.rank)
    prepare_run_dir(run_dir, config, shards, world)
    if world.is_main:
        for partial in ckpt.remove_incomplete(run_dir):
            print(f"removed {partial}: an interrupted checkpoint", flush=True)
    log = RunLog(run_dir, config, world)
    if world.is_main:
        twicing = next((v for v in map(get_attention, config.model.layer_attention()) if v.twices), None)
        head_dim = config.model.n_embd // config.model.n_head
        print(
            f"training {n_params / 1e6:.2f}M parameters, layers {config.model.layer_attention()}, ZeRO-{t.zero_stage}, "
            f"{t.precision}, TP {groups.tp_size} x DP {groups.dp_size} x {grad_accum} micro step(s) x {t.micro_batch_size} x {seq_len} tokens"
            + (f", twicing on {twicing.runs_on(world.device, head_dim)}" if twicing else "")
            + (f", resuming at step {start}" if start else ""),
            flush=True,
        )
    result = {"losses": [], "val": []}
    if val and start == 0:
        v = validate(engine, val, config, world, groups)
        result["val"].append((0, v))
        log.record(0, f"step 0: val loss {v:.4f}", **{"val/loss": v})
    tokens_per_step = t.batch_size * seq_len
    clock = time.perf_counter()
    last = min(t.steps, stop_at or t.steps)
    for step in range(start, last):
        lr = engine.get_lr()[0]  # the rate this step uses (the schedule moves on inside engine.step)
        loss_value, skip = optimizer_step(engine, optimizer, guard, batches.global_batch(step), grad_accum, config, groups, world.device)
        result["losses"].append(loss_value)
        done = step + 1
        norm = engine.get_global_grad_norm()  # None where DeepSpeed does not compute one (ZeRO-0 fp32)
        grad_norm = float(norm) if norm is not None else None
        elapsed, clock = time.perf_counter() - clock, time.perf_counter()
        values = {"train/lr": lr, "train/tokens_per_s": tokens_per_step / elapsed,
                  "train/memory_mib": memory_mib(world)}
        if skip and t.nonfinite == "skip":
            skipped, in_a_row = skipped + 1, in_a_row + 1
            log.record(done, f"step {done}/{t.steps}: non-finite loss or gradients, update skipped ({skipped} so far)",
                       **values, **{"train/skipped_steps": skipped})
            if in_a_row >= t.skip_limit:
                raise UserError(f"{in_a_row} steps in a row had a non-finite loss or gradients (train.skip_limit): "
                                f"training stopped at step {done} ({last_checkpoint_hint(run_dir)})")
        else:
            in_a_row = 0
            check_finite(loss_value, grad_norm, done, run_dir, discarded=skip)
            values["train/loss"] = loss_value
            if grad_norm is not None:
                values["train/grad_norm"] = grad_norm
            if guard is not None:
                values["train/skipped_steps"] = skipped
            log.record(done, progress_line(done, t.steps, values) if done % t.log_interval == 0 or done == t.steps else None, **values)
        if val and ((t.eval_interval and done % t.eval_interval == 0) or done == t.steps):
            v = validate(engine, val, config, world, groups)
            result["val"].append((done, v))
            log.record(done, f"step {done}: val loss {v:.4f}", **{"val/loss": v})
        if (t.checkpoint_interval and done % t.checkpoint_interval == 0) or done == last:
            save_checkpoint(engine, run_dir, done, config, world, skipped)
        clock = time.perf_counter()
    log.close()
    return {**result, "engine": engine, "groups": groups}


if __name__ == "__main__":
    raise SystemExit(run_command(main))
