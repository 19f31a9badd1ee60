"""Peak memory and step time of activation checkpointing: `lm train` with none against full, in one run.

    .venv/bin/python benchmarks/activation_memory.py [--steps 3] [--shards DIR] [--smoke] [--out table.txt]

Each setting trains in a process of its own (`python -m lm.train`, one process, DeepSpeed ZeRO-0,
fp32) on the same data: 12 layers, d 768, 12 heads, twicing in every layer, context 1024, micro
batch 8 (one micro step per optimizer step), the demo corpus's 2048-piece vocabulary. Peak RSS is
the child's own (os.wait4's ru_maxrss), measured with glibc told to hand freed memory back
(MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_), else its heap keeps what backward freed and
the peak says little. Step time is the median over the steps after the first (start-up excluded),
from metrics.jsonl. `--smoke` runs a toy model for the tests. Targets (issue 14): full's peak RSS
at most 0.5x none's, its step time at most 1.4x.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from data_prep.prep import demo_shards  # noqa: E402

MODEL = dict(vocab_size=2048, block_size=1024, n_layer=12, n_head=12, n_embd=768, twicing_layers="all", dropout=0.0)
SMOKE_MODEL = dict(vocab_size=384, block_size=32, n_layer=2, n_head=2, n_embd=32, twicing_layers="all", dropout=0.0)
TARGETS = {"peak RSS": 0.5, "step time": 1.4}  # full / none, at most


def run_config(model: dict, shards: Path, out_dir: Path, steps: int, micro_batch: int, value: str) -> dict:
    train = dict(
        out_dir=str(out_dir), steps=steps, batch_size=micro_batch, micro_batch_size=micro_batch, warmup_steps=1,
        zero_stage=0, precision="fp32", eval_windows=0, log_interval=1, tensorboard=False,
        activation_checkpointing=value,
    )  # fmt: skip
    return {"model": model, "data": {"path": str(shards)}, "train": train}


def measure(config: dict, work: Path, name: str) -> tuple[float, float]:
    """(peak RSS in MiB, median step seconds) of one `lm train` process."""
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "DS_ACCELERATOR": "cpu"}
    child = subprocess.Popen([sys.executable, "-m", "lm.train", "--config", str(path)], env=env, cwd=REPO,
                             stdout=subprocess.DEVNULL)  # fmt: skip
    _, status, usage = os.wait4(child.pid, 0)  # this child's own peak, not the maximum over all children
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise SystemExit(f"lm train ({name}) failed with exit status {child.returncode}")
    metrics = [
        json.loads(line) for line in (Path(config["train"]["out_dir"]) / "metrics.jsonl").read_text().splitlines()
    ]
    tokens = config["train"]["batch_size"] * config["model"]["block_size"]
    seconds = [tokens / m["train/tokens_per_s"] for m in metrics if "train/tokens_per_s" in m]
    return usage.ru_maxrss / 1024, statistics.median(seconds[1:] or seconds)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per setting (the first is not timed)")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--shards", default=None, help="token shards (default: made from the demo corpus, 2048 pieces)")
    p.add_argument("--smoke", action="store_true", help="a toy model and 2 steps: checks that the script runs")
    p.add_argument("--out", default=None, help="also write the table to this file")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    model = SMOKE_MODEL if args.smoke else MODEL
    steps, micro_batch = (2, 2) if args.smoke else (args.steps, args.micro_batch)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shards = demo_shards(args.shards or work / "data", min(2048, model["vocab_size"]))
        results = {}
        for value in ("none", "full"):
            config = run_config(model, shards, work / value, steps, micro_batch, value)
            results[value] = measure(config, work, value)
    (none_rss, none_s), (full_rss, full_s) = results["none"], results["full"]
    ratios = {"peak RSS": full_rss / none_rss, "step time": full_s / none_s}
    lines = [
        f"activation checkpointing, lm train, 1 process, ZeRO-0, fp32: {model['n_layer']} layers, d {model['n_embd']}, "
        f"twicing {model['twicing_layers']}, micro batch {micro_batch} x {model['block_size']} tokens, "
        f"vocab {model['vocab_size']}, {steps} steps, {os.cpu_count()} CPU cores",
        f"{'setting':<8} {'peak RSS MiB':>13} {'step s':>9}",
        f"{'none':<8} {none_rss:>13.0f} {none_s:>9.2f}",
        f"{'full':<8} {full_rss:>13.0f} {full_s:>9.2f}",
    ]
    for what, ratio in ratios.items():
        verdict = "meets" if ratio <= TARGETS[what] else "misses"
        lines.append(f"full / none {what}: {ratio:.2f}x ({verdict} the target of <= {TARGETS[what]}x)")
    table = "\n".join(lines)
    if args.out:
        Path(args.out).write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
