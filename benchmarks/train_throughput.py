"""Training throughput on this machine: our DeepSpeed training versus a plain PyTorch loop.

    .venv/bin/python benchmarks/train_throughput.py [--config configs/demo.yaml] [--set k=v ...]
        [--twicing none all last:2] [--stages 0 1 2] [--two-process-stages 2] [--steps 60]
        [--repeats 3] [--interval 10] [--warmup 10] [--compile auto|on|off] [--turns auto|on|off]
        [--out table.txt]

Runs on the GPU when there is one, else on the CPU. Model, batch, sequence length and precision
come from the config (`--set train.micro_batch_size=16 --set train.precision=bf16 ...`);
`--twicing` repeats every row for each attention setting (model.twicing_layers), each group
against its own references. `--compile auto` compiles on the GPU only (inductor on the CPU is slow
to build and not what we measure there).

Rows, all measured on the same data, each in fresh processes of its own:
  plain       the reference loop of lm.plain_loop (the same fused AdamW, clipping and schedule;
              bf16 autocast when the config says bf16 or bf16-weights), one process, all cores
  ds-1p-zN    lm.train in one process under a DeepSpeed engine, ZeRO stage N, train.compile as above
  ddp-2p      the plain loop data-parallel in two processes under torch's DistributedDataParallel
              (torchrun), the reference of the two-process rows
  ds-2p-zN    lm.train in two processes: on the CPU or with >= 2 GPUs
Per row: tokens/s, the ratio to its reference (the plain loop; ddp-2p for two-process rows), MFU
(model FLOPs per token, counting the second attention pass of twicing layers, against the card's
peak; GPU only) and peak memory. Every loop waits for the device, and is timed, once per
`--interval` steps (lm.train where it logs: train.log_interval), so a step's figure is its
interval's mean; the first `--warmup` steps (start-up, compilation, allocator warm-up) are left
out. A run's tokens/s is the median of its steps' figures, and its ratio to the reference the
median over steps of the two runs' figures for the same step. `--repeats R` measures every row R
times, round-robin: the table shows the median tokens/s, the median ratio to the reference
measured in the same round, and the range of those ratios.

`--turns` (auto: on the CPU) runs a round's rows at once, taking turns one interval at a time
(benchmarks/turns.py), so that the machine's drift falls on every row alike; each row still
times only its own steps, and a step's ratio compares intervals of the same cycle of turns.
Short intervals give more such pairs (`--interval 2` on a shape whose step takes seconds).
lm.train's rows then run `lm.train.train` in engine_worker (under torchrun for two processes),
which hands the turn on where it logs; without turns they are `python -m lm.train` and the
deepspeed launcher, one row after another.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.turns import Gate, Turns  # noqa: E402
from data_prep.prep import demo_shards  # noqa: E402
from launch.local import deepspeed_local_command, local_environment, torchrun_local_command  # noqa: E402
from lm.config import RunConfig  # noqa: E402
from lm.config_types import apply_overrides  # noqa: E402
from lm.distributed import close_distributed  # noqa: E402
from lm.flops import device_peak_tflops, flops_per_token  # noqa: E402
from lm.model import GPT  # noqa: E402
from lm.plain_loop import train_plain  # noqa: E402


def steady(rates: list[float], warmup: int) -> list[float]:
    """A run's per-step tokens/s after the warm-up (all of them when the run is no longer)."""
    return rates[warmup:] or rates


def paired_ratio(rates: list[float], reference: list[float]) -> float:
    """The median over steps of a run's tokens/s over its reference's at the same step."""
    return statistics.median(r / ref for r, ref in zip(rates, reference, strict=True))


@dataclass
class Launch:
    """A row's processes, ready to start: the command, its environment and where its figures land."""

    command: list[str]
    env: dict[str, str]
    ranks: int
    read: Callable[[], tuple[list[float], float]]  # (tokens/s per step, peak MiB), once the processes have exited


def deepspeed_launch(config: dict, work: Path, name: str, nproc: int, stage: int, turns: bool) -> Launch:
    """lm.train under DeepSpeed: `python -m lm.train` (one process) or the deepspeed launcher; with
    turns, engine_worker under python or torchrun (which set up the processes as the launcher does)."""
    config = json.loads(json.dumps(config))
    config["train"].update(zero_stage=stage, out_dir=str(work / name), eval_windows=0, tensorboard=False)
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    if turns:
        command, env = process_command(nproc, [__file__, "--engine-worker", str(path)])
    elif nproc == 1:
        command, env = [sys.executable, "-m", "lm.train", "--config", str(path)], dict(os.environ)
    else:
        command, env = deepspeed_local_command(nproc, "lm.train", ["--config", str(path)]), local_environment(nproc)

    def read() -> tuple[list[float], float]:
        metrics = [json.loads(line) for line in (work / name / "metrics.jsonl").read_text().splitlines()]
        rates = [m["train/tokens_per_s"] for m in metrics if "train/tokens_per_s" in m]
        return rates, max(m.get("train/memory_mib", 0.0) for m in metrics)

    return Launch(command, env, nproc, read)


def plain_launch(config: dict, work: Path, name: str, nproc: int) -> Launch:
    """The plain loop in a fresh process, as every DeepSpeed row; with `nproc` > 1 data-parallel
    under DDP (torchrun). Its peak memory is rank 0's."""
    path, out = work / f"{name}.json", work / f"{name}-result.json"
    path.write_text(json.dumps(config))
    command, env = process_command(nproc, [__file__, "--plain-worker", str(path), str(out)])

    def read() -> tuple[list[float], float]:
        result = json.loads(out.read_text())
        tokens_per_step = config["train"]["batch_size"] * config["model"]["block_size"]
        return [tokens_per_step / s for s in result["step_seconds"]], result["memory_mib"]

    return Launch(command, env, nproc, read)


def process_command(nproc: int, script: list[str]) -> tuple[list[str], dict[str, str]]:
    """`script` in one process, or in `nproc` under torchrun."""
    if nproc == 1:
        return [sys.executable, *script], dict(os.environ)
    return torchrun_local_command(nproc, script), local_environment(nproc)


def run_in_turn(launches: dict[str, Launch], work: Path, steps: int, interval: int) -> None:
    """Start every row at once and let them take turns, one interval of `interval` steps each."""
    turns = Turns(work / "turns")
    processes = {}
    try:
        for name, launch in launches.items():
            env = {**launch.env, **turns.environment(name, launch.ranks)}
            processes[name] = subprocess.Popen(launch.command, env=env, stdout=subprocess.DEVNULL)
        turns.run(processes, intervals=-(-steps // interval))
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()
        turns.close()


def plain_worker(config_path: str, out_path: str) -> None:
    """One process of plain_launch: the plain loop, under DDP when torchrun made a process group."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    grouped = "LOCAL_RANK" in os.environ  # started by torchrun
    if grouped:
        if device == "cuda":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        torch.distributed.init_process_group("nccl" if device == "cuda" else "gloo")
    run_config = RunConfig.from_dict(json.loads(Path(config_path).read_text()))
    gate = Gate.from_environment()
    plain = train_plain(
        run_config,
        device=device,
        compile=run_config.train.compile,
        sync_every=run_config.train.log_interval,
        between_intervals=gate.next_turn if gate else None,
    )
    if not grouped or torch.distributed.get_rank() == 0:
        memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        if device == "cuda":
            memory = torch.cuda.max_memory_allocated() / 2**20
        result = {"losses": plain["losses"], "step_seconds": plain["step_seconds"], "memory_mib": memory}
        Path(out_path).write_text(json.dumps(result))
    close_distributed()


def engine_worker(config_path: str) -> None:
    """One process of a DeepSpeed row taking turns: lm.train itself (as its main runs it), taking
    turns between logged intervals."""
    from lm.config import load_config
    from lm.stopping import stop_with_parent
    from lm.train import train

    stop_with_parent()
    train(load_config(config_path), between_intervals=Gate.from_environment().next_turn)
    close_distributed()


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="config override")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--interval", type=int, default=10, help="steps per timed interval, and per turn (default: 10)")
    p.add_argument("--warmup", type=int, default=10, help="first steps left out of the figures (default: 10)")
    p.add_argument(
        "--shards",
        default=None,
        help="token shards; made there from the demo corpus (2048-piece tokenizer) when missing "
        "(default: a temporary copy)",
    )
    p.add_argument(
        "--twicing",
        nargs="+",
        default=None,
        metavar="LAYERS",
        help="model.twicing_layers settings to compare: none, all, last:K (default: the config's)",
    )
    p.add_argument("--stages", nargs="*", type=int, default=[0, 2], help="ZeRO stages of the one-process rows")
    p.add_argument("--two-process-stages", nargs="*", type=int, default=[2], help="ZeRO stages of the two-process rows")
    p.add_argument(
        "--compile",
        choices=["auto", "on", "off"],
        default="auto",
        help="torch.compile the plain loop and set train.compile (auto: on the GPU only)",
    )
    p.add_argument(
        "--turns",
        choices=["auto", "on", "off"],
        default="auto",
        help="run a round's rows at once, taking turns interval by interval (auto: on the CPU only; "
        "a GPU would hold every row's model at once)",
    )
    p.add_argument("--repeats", type=int, default=1, help="rounds over all rows; the table shows medians (default: 1)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the card's peak for MFU (default: known cards)")
    p.add_argument("--out", default=None, help="also write the table to this file")
    args = p.parse_args()
    if args.repeats < 1 or args.steps < 1 or args.interval < 1:
        p.error("--repeats, --steps and --interval must be at least 1")
    if args.warmup < 0:
        p.error("--warmup must not be negative")
    return args


def main() -> None:
    if sys.argv[1:2] == ["--plain-worker"]:
        return plain_worker(*sys.argv[2:4])
    if sys.argv[1:2] == ["--engine-worker"]:
        return engine_worker(sys.argv[2])
    args = parse_args()
    # Validated per row group, once --twicing is applied (RunConfig.from_dict below).
    config = apply_overrides(yaml.safe_load(Path(args.config).read_text()), args.set)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    compile = args.compile == "on" or (args.compile == "auto" and device == "cuda")
    turns = args.turns == "on" or (args.turns == "auto" and device == "cpu")
    config["train"].update(steps=args.steps, compile=compile, log_interval=args.interval)
    # (name, label, processes, ZeRO stage or None for the plain loop); each reference before its rows
    runs = [("plain", "PyTorch loop", 1, None)]
    runs += [(f"ds-1p-z{s}", f"DeepSpeed ZeRO-{s}, 1 process", 1, s) for s in args.stages]
    if args.two_process_stages and (device == "cpu" or torch.cuda.device_count() >= 2):
        runs.append(("ddp-2p", "PyTorch DDP, 2 processes", 2, None))
        runs += [(f"ds-2p-z{s}", f"DeepSpeed ZeRO-{s}, 2 processes", 2, s) for s in args.two_process_stages]
    twicing = args.twicing or [config["model"].get("twicing_layers", "none")]
    rows = []  # Row per (attention, run), filled repeat by repeat
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        # Made here, and kept when --shards names a new directory.
        shards = demo_shards(args.shards or work / "data", min(2048, config["model"]["vocab_size"]))
        config["data"]["path"] = str(shards)
        for layers in twicing:
            config["model"]["twicing_layers"] = layers
            run_config = RunConfig.from_dict(config)
            flops = flops_per_token(run_config.model)  # train/mfu's count too
            group = [
                Row(layers, name, label + ", compiled" * (compile and stage is None), flops)
                for name, label, _, stage in runs
            ]
            rows += group
            # Round-robin over the rows, so that the machine's drift falls on every row alike; each
            # ratio is to the reference of the same round. With turns, the round's rows run at once,
            # one interval each in turn.
            for repeat in range(args.repeats):
                launches = {}
                for name, _, nproc, stage in runs:
                    tag = f"{name}-{layers}-{repeat}".replace(":", "-")
                    if stage is None:
                        launches[tag] = plain_launch(config, work, tag, nproc)
                    else:
                        launches[tag] = deepspeed_launch(config, work, tag, nproc, stage, turns)
                if turns:
                    run_in_turn(launches, work, args.steps, args.interval)
                reference = {}
                for row, (_, _, nproc, stage), launch in zip(group, runs, launches.values()):
                    if not turns:
                        subprocess.run(launch.command, env=launch.env, check=True, stdout=subprocess.DEVNULL)
                    rates, mib = launch.read()
                    rates = steady(rates, args.warmup)
                    if stage is None:
                        reference[nproc] = rates
                    row.add(statistics.median(rates), paired_ratio(rates, reference[nproc]), mib)
                    write_table(args, run_config, rows, device, compile)  # rows so far survive a timeout
    print("\n" + write_table(args, run_config, rows, device, compile))


@dataclass
class Row:
    """One row of the table: a run's tokens/s, ratio to its reference and peak memory, per repeat."""

    attention: str
    name: str
    label: str
    flops: float
    rates: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    memory: list[float] = field(default_factory=list)

    def add(self, rate: float, ratio: float, mib: float) -> None:
        self.rates.append(rate)
        self.ratios.append(ratio)
        self.memory.append(mib)


def write_table(args, run_config: RunConfig, rows: list[Row], device: str, compile: bool) -> str:
    """The table as text (medians over the repeats so far), also written to --out when given."""
    t, m = run_config.train, run_config.model
    peak = args.peak_tflops or device_peak_tflops(device)  # train/mfu's table
    where = torch.cuda.get_device_name() if device == "cuda" else f"{os.cpu_count()} CPU cores"
    params = GPT(m).num_parameters()
    memory = "peak MiB" if device == "cuda" else "peak RSS MiB"
    lines = [
        f"config {Path(args.config).name} {' '.join(args.set)}: {params / 1e6:.2f}M parameters, {t.precision}, "
        f"micro batch {t.micro_batch_size} x {m.block_size} tokens, {t.batch_size * m.block_size} tokens/step, "
        f"{args.steps} steps (timed {args.interval} at a time, the first {args.warmup} left out), "
        f"compile {'on' if compile else 'off'}, on {where}",
        f"medians of {args.repeats} round(s); ratios to the reference of the same round (range: lowest-highest); "
        "MFU counts twicing's second attention pass" + (f"; peak {peak:.0f} TFLOP/s" if peak else ""),
        f"{'twicing':<8} {'run':<9} {'what':<34} {'tokens/s':>10} {'vs ref':>7} {'range':>11} {'MFU':>6} {memory:>13}",
    ]
    for row in (r for r in rows if r.rates):
        rate, ratio = statistics.median(row.rates), statistics.median(row.ratios)
        spread = f"{min(row.ratios):.2f}-{max(row.ratios):.2f}" if len(row.ratios) > 1 else "-"
        mfu = f"{rate * row.flops / (peak * 1e12):.1%}" if peak else "-"
        lines.append(
            f"{str(row.attention):<8} {row.name:<9} {row.label:<34} {rate:>10.0f} {ratio:>6.2f}x {spread:>11} "
            f"{mfu:>6} {max(row.memory):>13.0f}"
        )
    table = "\n".join(lines)
    if args.out:
        Path(args.out).write_text(table + "\n")
    return table


if __name__ == "__main__":
    main()
