"""Training: set a run up, then loop over optimizer steps.

    lm train --config configs/demo.yaml [--set train.steps=50 ...] [--resume auto]
    deepspeed --num_gpus 2 --module lm.train --config configs/demo.yaml

Every rank builds the same model from the same seed, DeepSpeed partitions it by ZeRO stage
(lm.engine), and each optimizer step consumes global batch number `step` of the data (lm.data):
the data position is the step, so a resumed run (lm.resume) sees exactly the batches an
uninterrupted one would. Rank 0 writes config.yaml, metrics.jsonl (one line per step and per
validation) and TensorBoard scalars into the run directory `train.out_dir` (lm.metrics).
"""

import argparse
import importlib.util
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.profiler import record_function

from core.errors import UserError, run_command
from core.ranks import launcher_local_size, launcher_world_size
from lm.attention import get_attention
from lm.config import RunConfig, load_config
from lm.data import rank_rows
from lm.distributed import World, close_distributed, init_distributed
from lm.ds_config import stage_name
from lm.engine import Engine, partition_zero3, quiet_deepspeed
from lm.flops import flops_per_token, mfu, run_peak_tflops
from lm.host_heap import hold_heap
from lm.initialization import build_gpt, parameter_count
from lm.metrics import RunLog, check_wandb, means_over_ranks, memory_mib, progress_line, validation_loss
from lm.mixture import RunData, open_run_data
from lm.numerics import NonFinitePolicy, SkippableAdamW
from lm.parallel import ParallelGroups, build_groups, dropout_stream
from lm.parallel.context import ContextLayout, context_layout
from lm.plan import check_memory
from lm.resume import (
    ResumePoint,
    dropout_seed,
    find_resume_point,
    last_checkpoint_hint,
    prepare_run_dir,
    restore_rng_state,
)
from lm.saving import save_checkpoint, warn_if_short_of_space
from lm.schedule import build_optimizer, build_scheduler
from lm.stopping import StopAgreement, StopSignals, stop_with_parent


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="lm train", description="Train a GPT under DeepSpeed ZeRO from a YAML run config.")
    p.add_argument("--config", required=True, help="YAML run config with sections model, data, train")
    p.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value (repeatable)"
    )
    p.add_argument(
        "--resume",
        default="none",
        metavar="auto|none|PATH",
        help="auto: continue from the newest complete checkpoint in train.out_dir, if any; "
        "PATH: a run or checkpoint directory",
    )
    p.add_argument(
        "--init-from",
        default=None,
        metavar="PATH",
        help="start a new run from the weights of a run, checkpoint, converted directory or HF import "
        "(fresh optimizer and schedule, step 0, any layout)",
    )
    p.add_argument(
        "--stop-at",
        type=int,
        default=None,
        metavar="STEP",
        help="stop after STEP steps and checkpoint, keeping the schedule of train.steps (continue with --resume auto)",
    )
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    return p.parse_args(argv)


def main(argv=None) -> int:
    stop_with_parent()  # a rank whose launcher dies stops as on SIGTERM, instead of training on alone
    args = parse_args(argv)
    if args.stop_at is not None and args.stop_at < 1:
        raise UserError(f"--stop-at must be positive, got {args.stop_at}")
    train(load_config(args.config, args.set), resume=args.resume, stop_at=args.stop_at, init_from=args.init_from)
    close_distributed()
    return 0


@dataclass
class TrainResult:
    """What a finished `train()` leaves: per-step mean losses, (step, val loss) pairs, where it ended."""

    losses: list[float] = field(default_factory=list)
    val: list[tuple[int, float]] = field(default_factory=list)
    step: int = 0
    run_dir: Path | None = None
    checkpoint: Path | None = None  # the newest complete checkpoint


@dataclass
class Run:
    """A run set up and ready to step: what the loop needs, nothing else."""

    config: RunConfig
    world: World
    groups: ParallelGroups
    context: ContextLayout  # which positions of each window this rank holds
    engine: Engine
    policy: NonFinitePolicy
    log: RunLog
    data: RunData
    grad_accum: int
    start: int
    stop: StopAgreement
    mfu_per_token: float | None  # train/mfu of one token per second (lm.flops); None: no peak FLOP/s known

    @property
    def run_dir(self) -> Path:
        return Path(self.config.train.out_dir)


def train(
    config: RunConfig,
    resume: str = "none",
    stop_at: int | None = None,
    init_from: str | None = None,
    between_intervals: Callable[[], None] | None = None,
) -> TrainResult:
    """Run (or continue) training; `stop_at` ends this invocation early, with a checkpoint, without
    changing the LR schedule, and so does a signal of train.save_on_signal (lm.stopping).
    `between_intervals`: see run_loop."""
    with StopSignals(config.train.save_on_signal) as signals:  # from the start: a signal during set-up counts
        run = start_run(config, resume, init_from, signals)
        try:
            return run_loop(run, stop_at, between_intervals)
        finally:
            run.log.close()


# ---- set-up ----------------------------------------------------------------------------------


def check_can_compile() -> None:
    """torch.compile's inductor needs Triton on a GPU and a C++ compiler on the CPU."""
    if torch.cuda.is_available():  # the device lm.distributed picks
        if importlib.util.find_spec("triton") is None:
            raise UserError("train.compile needs Triton on the GPU, which is not installed; set train.compile=false")
    elif not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "clang++")):
        raise UserError("train.compile needs a C++ compiler on the CPU (g++, clang++ or $CXX); set train.compile=false")


def build_model(
    config: RunConfig, groups: ParallelGroups, device: torch.device, initial_weights: dict | None = None
) -> tuple[torch.nn.Module, int]:
    """This rank's model and the whole model's parameter count: lm.initialization.build_gpt (sharded
    initialisation), under ZeRO-3 each parameter partitioned as soon as it is drawn, compiled if asked."""
    t = config.train
    place = (lambda params: partition_zero3(params, config, groups)) if t.zero_stage == 3 else None
    model = build_gpt(config, device, groups, initial_weights, place)
    if t.compile:
        model.compile()  # in place: parameter and state-dict names stay those of the GPT
    return model, parameter_count(config.model)


def start_run(
    config: RunConfig, resume: str = "none", init_from: str | None = None, signals: StopSignals | None = None
) -> Run:
    """Everything before the first step: data, resume point, process groups, engine, run directory.
    The loop stops on the `signals` noted (none: it never stops on a signal)."""
    t = config.train
    data = open_run_data(config)  # before any process group: bad data fails fast and alike everywhere
    if t.compile:
        check_can_compile()
    check_wandb(config)
    point = find_resume_point(config, resume, init_from)
    if t.memory_check:  # before any process group: every rank refuses alike, nothing is built
        check_memory(config, launcher_world_size(), launcher_local_size())
    world = init_distributed()
    if world.device.type == "cpu":
        hold_heap()  # each step reuses the last one's pages (lm.host_heap)
    quiet_deepspeed()
    groups = build_groups(t.tensor_parallel, t.context_parallel)
    stop = StopAgreement(signals)
    grad_accum = t.grad_accum_steps(groups.dp_size)  # refuses sizes that do not divide
    start = point.initial_step()
    model, n_params = build_model(config, groups, world.device, point.initial_weights())
    optimizer = build_optimizer(model, t, kind=SkippableAdamW)
    engine = Engine(model, optimizer, build_scheduler(optimizer, t, start), config, groups)
    # Dropout draws from a stream of its own per DP and CP rank, shared by the ranks of a TP group
    # unless sequence parallelism gives each its own shard (lm.parallel.dropout_stream); weights
    # were drawn alike.
    stream = dropout_stream(groups, t.sequence_parallel)
    torch.manual_seed(t.seed + 1 + stream)
    if point.loads_deepspeed_files:  # the same layout: DeepSpeed's own load, bitwise
        start = engine.load(point.tag_dir)["step"]
        restore_rng_state(point.tag_dir, world.rank)
    elif point.resharded:  # weights came in as initial weights; Adam's state goes into the partitions
        engine.set_optimizer_state(*point.optimizer_state(config.model, groups.tp_size, groups.tp_rank))
        torch.manual_seed(dropout_seed(t.seed, start, stream))  # the saved streams were other ranks'
    skipped = point.skipped_steps()
    run_dir = Path(t.out_dir)
    prepare_run_dir(run_dir, config, data.tokenizer_path, world)
    warn_if_short_of_space(run_dir, config, world)
    policy = NonFinitePolicy(t, engine.module, world.device, lambda: last_checkpoint_hint(run_dir), skipped)
    log = RunLog(run_dir, config, world)
    peak = run_peak_tflops(t, world.device)
    mfu_per_token = None if peak is None else mfu(1.0, flops_per_token(config.model), peak, world.world_size)
    context = context_layout(groups, t.context_parallel_impl)
    run = Run(config, world, groups, context, engine, policy, log, data, grad_accum, start, stop, mfu_per_token)
    run.log.say(startup_line(run, n_params, point))
    return run


def startup_line(run: Run, n_params: int, point: ResumePoint) -> str:
    """The contract line `training N.NNM parameters, ...`, after the engine is built."""
    m, t, g = run.config.model, run.config.train, run.groups
    line = (
        f"training {n_params / 1e6:.2f}M parameters, layers {m.layer_attention()}, {stage_name(t, g.dp_size)}, "
        f"{t.precision}, TP {g.tp_size} x DP {g.dp_size} x {run.grad_accum} micro step(s) x "
        f"{t.micro_batch_size} x {m.block_size} tokens"
    )
    if t.sequence_parallel:
        line += ", sequence parallel within TP"
    if g.cp_size > 1:
        line += f", each sequence in {g.cp_size} chunks (context parallel, {t.context_parallel_impl})"
    twicing = next((v for v in map(get_attention, m.layer_attention()) if v.twices), None)
    if twicing is not None:
        line += f", twicing on {twicing.runs_on(run.world.device, m.head_dim)}"
    if point.resharded:
        return line + (
            f", resuming at step {run.start} on a new layout ({point.layout_change}): "
            "optimizer state re-split, dropout streams reseeded"
        )
    return line + (f", resuming at step {run.start}" if run.start else "")


# ---- the loop --------------------------------------------------------------------------------


def optimizer_step(run: Run, step: int) -> tuple[torch.Tensor, bool]:
    """One optimizer step over global batch `step`: (this rank's loss summed over its micro steps, on
    the device and not yet synced; whether the update was applied)."""
    mb, device = run.config.train.micro_batch_size, run.world.device
    batch = run.data.batches.global_batch(step)
    loss_sum = torch.zeros((), device=device)  # summed on the device: no sync per micro step
    for micro in range(run.grad_accum):
        rows = rank_rows(batch, run.groups.dp_rank, run.groups.dp_size, mb, micro).to(device)
        inputs, targets = run.context.chunk(rows)  # this rank's chunk of each window (context parallel)
        # Named ranges for profilers (benchmarks/profile_step.py); free when none is recording.
        with record_function("forward"):
            _, loss = run.engine(inputs, targets)
        with record_function("backward"):  # with the gradient reduction
            run.engine.backward(loss)
        run.policy.observe_loss(loss)
        last = micro == run.grad_accum - 1  # every gradient of the step has been observed
        with record_function("optimizer"):  # clipping, the update (at the last micro step), ZeRO's all-gather
            applied = run.engine.step(skip_update=run.policy.skip_update() if last else False)
        loss_sum += loss.detach().float()
    return loss_sum, applied


@dataclass
class StepRecord:
    """What a step leaves for the log, held on the device until the log is written (`log_steps`)."""

    step: int  # steps done, this one included
    lr: float
    loss_sum: torch.Tensor  # this rank's, over its micro steps
    grad_norm: torch.Tensor | float | None
    applied: bool


def log_steps(run: Run, records: list[StepRecord], seconds: float, result: TrainResult) -> None:
    """Write the steps trained since the last log, in `seconds`: one all-reduce and one host sync
    for all of them, the only ones of the loop (lm.numerics' skip policy aside).

    Each step gets its line in metrics.jsonl, with the interval's tokens/s (on a GPU a single step
    cannot be timed without a sync); the policy sees each step in order and may end the run.
    """
    t = run.config.train
    losses = means_over_ranks(torch.stack([r.loss_sum for r in records]), run.grad_accum, run.world.device)
    tokens_per_s = len(records) * t.batch_size * run.config.model.block_size / seconds
    memory = memory_mib(run.world)
    for record, loss in zip(records, losses):
        done = record.step
        grad_norm = None if record.grad_norm is None else float(record.grad_norm)
        values = {"train/lr": record.lr, "train/tokens_per_s": tokens_per_s, "train/memory_mib": memory}
        if run.mfu_per_token is not None:
            values["train/mfu"] = tokens_per_s * run.mfu_per_token
        if run.data.is_mixture:
            values.update(mixture_values(run, done))
        if run.policy.guard is not None:
            values["train/skipped_steps"] = run.policy.skipped
        result.losses.append(loss)
        if run.policy.after_step(done, loss, grad_norm, record.applied):
            values["train/skipped_steps"] = run.policy.skipped
            line = f"step {done}/{t.steps}: non-finite loss or gradients, update skipped ({run.policy.skipped} so far)"
            run.log.record(done, line, **values)
            continue
        values["train/loss"] = loss
        if grad_norm is not None:
            values["train/grad_norm"] = grad_norm
        shown = done % t.log_interval == 0 or done == t.steps
        run.log.record(done, progress_line(done, t.steps, values) if shown else None, **values)


def mixture_values(run: Run, done: int) -> dict[str, int]:
    """data/tokens/<name> after `done` steps; each source starting another epoch in the step is an event."""
    for name, epoch, windows in run.data.batches.new_epochs(done - 1):  # a small source repeats
        run.log.event(done, f"step {done}: data source {name} starts epoch {epoch}, its {windows} windows again")
    return run.data.batches.tokens_drawn(done)


def validate(run: Run, step: int, result: TrainResult) -> None:
    """val/loss; for a mixture also val/loss/<name> per source, and val/loss their mean weighted as the mixture."""
    val = run.data.val.items()
    losses = {name: validation_loss(run.engine, windows, run.config, run.world, run.groups) for name, windows in val}
    v = run.data.batches.mixed(losses) if run.data.is_mixture else losses[""]
    result.val.append((step, v))
    by_source = {f"val/loss/{name}": loss for name, loss in losses.items() if name}
    shown = "".join(f", {name} {loss:.4f}" for name, loss in losses.items() if name)
    run.log.record(step, f"step {step}: val loss {v:.4f}{shown}", **{"val/loss": v, **by_source})


def run_loop(run: Run, stop_at: int | None = None, between_intervals: Callable[[], None] | None = None) -> TrainResult:
    """Steps from run.start to train.steps (or `stop_at`, or the step the ranks agree a stop signal
    ends, see lm.stopping: its checkpoint is saved, once, after the validation due there if any).
    The host waits for the device only where the log is written (every train.log_interval steps),
    before validation and before a checkpoint. `between_intervals`, if given, is called before the
    first logged interval and after each but the last, untimed, as lm.plain_loop.train_plain does
    (the throughput benchmark's rows take turns there)."""
    t = run.config.train
    pause = between_intervals or (lambda: None)
    result = TrainResult(step=run.start, run_dir=run.run_dir)
    if run.data.val and run.start == 0:
        validate(run, 0, result)
    last = min(t.steps, stop_at or t.steps)
    records: list[StepRecord] = []
    pause()
    clock = time.perf_counter()
    for step in range(run.start, last):
        lr = run.engine.lr()  # the rate this step uses (the schedule moves on inside the engine's step)
        loss_sum, applied = optimizer_step(run, step)
        done = result.step = step + 1
        records.append(StepRecord(done, lr, loss_sum, run.engine.grad_norm(), applied))
        stop_signal = run.stop.at_boundary()  # the same on every rank
        evaluate = run.data.val and ((t.eval_interval and done % t.eval_interval == 0) or done == t.steps)
        save = (t.checkpoint_interval and done % t.checkpoint_interval == 0) or done == last or stop_signal
        if not (evaluate or save or done % t.log_interval == 0):
            continue
        log_steps(run, records, time.perf_counter() - clock, result)  # ends a run that must stop, unsaved
        records = []
        if evaluate:
            validate(run, done, result)
        if save:
            result.checkpoint = save_checkpoint(
                run.engine, run.run_dir, done, run.config, run.world, run.policy.skipped
            )
        if stop_signal:
            run.log.event(done, f"stopped by {stop_signal.name} at step {done}, checkpoint {result.checkpoint}")
            return result
        if done < last:
            pause()
        clock = time.perf_counter()
    run.stop.finish()
    return result


if __name__ == "__main__":
    raise SystemExit(run_command(main))
