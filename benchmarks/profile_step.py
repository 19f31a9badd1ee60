"""Where one training step's time goes: lm.train's DeepSpeed step against the plain loop's.

    .venv/bin/python benchmarks/profile_step.py [--config configs/demo.yaml] [--set k=v ...]
        [--stages 0 1 2] [--steps 8] [--top 12] [--processes 1|2]

For the plain loop and for each ZeRO stage: torch.profiler over `--steps` optimizer steps after
two warm-up steps, then per step
- the wall time, and the time in the loop's phases (`forward`, `backward`, `optimizer`: the
  record_function ranges of lm.train.optimizer_step and lm.plain_loop.PlainStep; backward holds
  the gradient reduction, optimizer the clipping, the update and ZeRO's weight all-gather);
- the ops that take the most self CPU time, and the sum of all op time (the rest of the wall time
  is Python outside any op: hooks, bookkeeping).
`--processes 2` runs every loop data-parallel over two processes (torchrun; the plain loop under
DDP) and prints rank 0's figures. `--interleave N` then times N more steps of every loop taking
turns step by step (the order rotated each step), unprofiled, so that the machine's slow spells
fall on all of them alike, and prints each loop's median step time and its speed relative to the
plain loop. Shards come from the demo corpus.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from torch.profiler import ProfilerActivity, profile

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from data_prep.prep import demo_shards  # noqa: E402
from launch.local import local_environment, torchrun_local_command  # noqa: E402
from lm.config import RunConfig  # noqa: E402
from lm.config_types import apply_overrides  # noqa: E402
from lm.distributed import close_distributed  # noqa: E402
from lm.plain_loop import PlainStep  # noqa: E402
from lm.train import optimizer_step, start_run  # noqa: E402

WARMUP = 2
PHASES = ("forward", "backward", "optimizer")


def profiled(step, steps: int) -> tuple[float, dict[str, float], list[tuple[str, float]]]:
    """(wall seconds per step, {phase: seconds per step}, [(op, self CPU seconds per step)])."""
    for i in range(WARMUP):
        step(i)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for i in range(WARMUP, WARMUP + steps):
            step(i)
        wall = (time.perf_counter() - start) / steps
    events = prof.key_averages()
    phases = {e.key: e.cpu_time_total / 1e6 / steps for e in events if e.key in PHASES}
    ops = [(e.key, e.self_cpu_time_total / 1e6 / steps) for e in events if e.key not in PHASES]
    return wall, phases, sorted(ops, key=lambda op: -op[1])


def interleaved(runs: dict, first: int, steps: int) -> dict[str, float]:
    """{name: median seconds per step} of `steps` steps of every run, taking turns step by step; the
    order rotates by one each step, so that no loop always runs after the same one (a loop right
    after another meets the caches and heap that one left)."""
    seconds = {name: [] for name in runs}
    names = list(runs)
    for i in range(first, first + steps):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            step = runs[name]
            start = time.perf_counter()
            step(i)
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # a step's time is its device's
            seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(times) for name, times in seconds.items()}


def raw_config(args: argparse.Namespace) -> dict:
    """--config with --set applied (validated where each loop is built)."""
    return apply_overrides(yaml.safe_load(Path(args.config).read_text()), args.set)


def vocab(raw: dict) -> int:
    """The demo tokenizer's size for the model of `raw`."""
    return min(2048, raw["model"].get("vocab_size", 2048))


def engine_stepper(config: RunConfig):
    run = start_run(config)
    return lambda i: optimizer_step(run, i)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--stages", nargs="*", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--processes", type=int, choices=[1, 2], default=1)
    p.add_argument("--interleave", type=int, default=0, metavar="N", help="then N steps of each, taking turns")
    p.add_argument("--shards", default=None, help="token shards to use (default: the demo corpus, made here)")
    args = p.parse_args()
    if args.steps < 1 or args.interleave < 0:
        p.error("--steps must be at least 1 and --interleave at least 0")
    return args


def main() -> None:
    args = parse_args()
    if args.processes > 1 and "LOCAL_RANK" not in os.environ:  # the parent: shards once, then torchrun
        with tempfile.TemporaryDirectory() as tmp:
            shards = args.shards or demo_shards(Path(tmp) / "data", vocab(raw_config(args)))
            command = torchrun_local_command(args.processes, [__file__, *sys.argv[1:], "--shards", str(shards)])
            subprocess.run(command, env=local_environment(args.processes), check=True)
        return
    raw = raw_config(args)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        raw["data"]["path"] = str(demo_shards(args.shards or work / "data", vocab(raw)))
        steps = WARMUP + args.steps + args.interleave
        raw["train"].update(steps=steps, eval_windows=0, tensorboard=False, log_interval=10**6)
        runs = {}
        for stage in args.stages:  # the engines first: start_run makes the process group DDP needs
            staged = json.loads(json.dumps(raw))
            staged["train"].update(zero_stage=stage, out_dir=str(work / f"zero{stage}"))
            runs[f"ZeRO-{stage}"] = engine_stepper(RunConfig.from_dict(staged))
        runs = {"plain" + (" (DDP)" if args.processes > 1 else ""): PlainStep(RunConfig.from_dict(raw)), **runs}
        main_rank = os.environ.get("RANK", "0") == "0"
        for name, step in runs.items():
            wall, phases, ops = profiled(step, args.steps)
            if not main_rank:
                continue
            in_ops = sum(seconds for _, seconds in ops)
            split = ", ".join(f"{phase} {phases.get(phase, 0.0) * 1e3:.1f}" for phase in PHASES)
            print(
                f"\n## {name}, {args.processes} process(es): {wall * 1e3:.1f} ms per step ({split}), "
                f"{in_ops * 1e3:.1f} ms in ops",
                flush=True,
            )
            for op, seconds in ops[: args.top]:
                print(f"  {seconds * 1e3:8.2f} ms  {op}", flush=True)
        if args.interleave:
            medians = interleaved(runs, WARMUP + args.steps, args.interleave)
            reference = next(iter(medians.values()))  # the plain loop's
            if main_rank:
                print(f"\n## taking turns, {args.interleave} steps each: median ms per step, speed vs the plain loop")
                for name, median in medians.items():
                    print(f"  {name:<14} {median * 1e3:8.1f} ms  {reference / median:.3f}x", flush=True)
    close_distributed()


if __name__ == "__main__":
    main()
