"""Where one training step's time goes: lm.train's DeepSpeed step against the plain loop's, by op.

    .venv/bin/python benchmarks/profile_step.py [--config configs/demo.yaml] [--set k=v ...]
        [--stages 0 1 2] [--steps 8] [--top 12]

One process. For the plain loop and for each ZeRO stage: torch.profiler over `--steps` optimizer
steps after two warm-up steps, then the time per step in the ops that take the most self CPU time,
and the step's wall time beside the sum of all op time (the rest is Python outside any op: hooks,
bookkeeping). Shards come from the demo corpus.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import yaml
from torch.profiler import ProfilerActivity, profile

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from data_prep.corpus import embedded_corpus, split_train_val  # noqa: E402
from data_prep.prep import prepare_shards  # noqa: E402
from lm.config import RunConfig  # noqa: E402
from lm.plain_loop import PlainStep  # noqa: E402
from lm.train import optimizer_step, start_run  # noqa: E402

WARMUP = 2


def profiled(step, steps: int) -> tuple[float, list[tuple[str, float]]]:
    """(wall seconds per step, [(op, self CPU seconds per step)]) of `steps` calls of step(i)."""
    for i in range(WARMUP):
        step(i)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for i in range(WARMUP, WARMUP + steps):
            step(i)
        wall = (time.perf_counter() - start) / steps
    ops = [(e.key, e.self_cpu_time_total / 1e6 / steps) for e in prof.key_averages()]
    return wall, sorted(ops, key=lambda op: -op[1])


def engine_stepper(config: RunConfig):
    run = start_run(config)
    return lambda i: optimizer_step(run, i)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--stages", nargs="*", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--top", type=int, default=12)
    args = p.parse_args()
    raw = yaml.safe_load(Path(args.config).read_text())
    for item in args.set:
        key, _, value = item.partition("=")
        section, _, name = key.partition(".")
        raw.setdefault(section, {})[name] = yaml.safe_load(value)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        train_docs, val_docs = split_train_val(embedded_corpus(), 0.1, 0)
        prepare_shards(train_docs, val_docs, work / "data", vocab_size=min(2048, raw["model"]["vocab_size"]))
        raw["data"]["path"] = str(work / "data")
        raw["train"].update(steps=WARMUP + args.steps, eval_windows=0, tensorboard=False, log_interval=10**6)
        runs = {"plain": PlainStep(RunConfig.from_dict(raw))}
        for stage in args.stages:
            staged = json.loads(json.dumps(raw))
            staged["train"].update(zero_stage=stage, out_dir=str(work / f"zero{stage}"))
            runs[f"ZeRO-{stage}"] = engine_stepper(RunConfig.from_dict(staged))
        for name, step in runs.items():
            wall, ops = profiled(step, args.steps)
            in_ops = sum(seconds for _, seconds in ops)
            print(f"\n## {name}: {wall * 1e3:.1f} ms per step, {in_ops * 1e3:.1f} ms in ops")
            for op, seconds in ops[: args.top]:
                print(f"  {seconds * 1e3:8.2f} ms  {op}")


if __name__ == "__main__":
    main()
