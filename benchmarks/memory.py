"""Peak memory per rank of `lm train` under the deepspeed launcher, against ZeRO's arithmetic.

    .venv/bin/python benchmarks/memory.py [--layouts 0x1 3x4 2x2,offload=optimizer 0x1,activation_checkpointing=full]
        [--layers 24 --d-model 1024 --heads 16] [--block 128] [--micro-batch 1] [--steps 1]
        [--set train.precision=bf16 ...] [--shards DIR] [--out table.md]

A layout is ZxN[tK][,KEY=VALUE...]: ZeRO stage Z on N processes, tensor-parallel size K (default 1),
and train.KEY=VALUE for that row only (--set applies to every row), such as context_parallel=2 or
sequence_parallel=true; the batch is one micro batch per data-parallel rank. Each row is one launch of
--steps optimizer steps (fp32 unless --set says otherwise, the final checkpoint included) of a
twicing-in-every-layer GPT. Every rank's peak RSS (VmHWM) is read from /proc twice:
when the rank prints its `training ... parameters` line (engine built, before the first step: what
sharded initialisation leaves) and at the end of the run. From both, the same launch of a one-layer
d-64 model is subtracted (the interpreter, torch, DeepSpeed and the process group), and the
remainder is divided by the parameter count. Beside it: `lm plan`'s estimate of the same (its total
less its total for the baseline launch: with a long block the baseline's logits are no small part)
and its ratio to the measurement, and the
bytes per parameter that ZeRO's model states alone take at that stage and data-parallel size (fp32
weights 4, gradients 4, Adam 8).

Measured with MALLOC_MMAP_THRESHOLD_=65536 and MALLOC_TRIM_THRESHOLD_=0, so that RSS follows live
memory rather than what glibc keeps of freed heap. On a GPU the same figures come from
torch.cuda.max_memory_allocated in metrics.jsonl (not read here).

`--activations T [T ...]` measures activation memory per rank against the sequence length instead:

    .venv/bin/python benchmarks/memory.py --activations 1024 2048 --layers 12 --d-model 768 --heads 12 \
        --layouts 0x1 0x2,context_parallel=2 0x4,context_parallel=4 0x2t2 0x2t2,sequence_parallel=true

Each row is one torchrun launch of ranks that build the run, take one whole step, then measure one
micro step: the largest rank's peak RSS growth over its forward (what it keeps for backward) and
through its backward, from its RSS at the start (peak reset with /proc/self/clear_refs), and the
forward's figure against the first layout's at the same T.
"""

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from data_prep.prep import demo_shards  # noqa: E402
from launch.local import deepspeed_local_command, local_environment, torchrun_local_command  # noqa: E402
from lm.config import ModelConfig, RunConfig, load_config  # noqa: E402
from lm.model import GPT  # noqa: E402
from lm.plan import plan  # noqa: E402

MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
VOCAB = 2048


def ideal_bytes_per_parameter(stage: int, dp: int) -> float:
    """fp32 model states per parameter on one rank: weights 4, gradients 4, Adam's two moments 8."""
    weights, grads, adam = 4.0, 4.0, 8.0
    if stage >= 1:
        adam /= dp
    if stage >= 2:
        grads /= dp
    if stage >= 3:
        weights /= dp
    return weights + grads + adam


def rank_pids(config_path: Path) -> list[int]:
    """The training processes of one launch: their command line names its config."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if (
            b"lm.train" in cmdline
            and str(config_path).encode() in cmdline
            and b"deepspeed.launcher" not in b" ".join(cmdline)
        ):
            found.append(int(entry.name))
    return found


def peak_rss_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def launch(config: dict, work: Path, name: str, nproc: int) -> dict:
    """One launch: each rank's peak RSS at its `training` line and at the end (max over ranks)."""
    path = work / f"{name}.yaml"
    config["train"]["out_dir"] = str(work / name)
    path.write_text(yaml.safe_dump(config))
    env = {**local_environment(nproc), **MALLOC, "OMP_NUM_THREADS": "1"}
    command = deepspeed_local_command(nproc, "lm.train", ["--config", str(path)])
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peaks: dict[int, int] = {}
    at_start: dict[int, int] = {}
    done = threading.Event()

    def watch():  # VmHWM only grows: the last reading of each rank is its peak, to within one interval
        while not done.is_set():
            for pid in rank_pids(path):
                if (rss := peak_rss_bytes(pid)) is not None:
                    peaks[pid] = rss
            time.sleep(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    output = []
    for line in proc.stdout:
        output.append(line)
        if "training " in line and " parameters," in line and not at_start:
            # Every rank has built its engine: rank 0 prints after the collectives of the build.
            at_start = {pid: rss for pid in rank_pids(path) if (rss := peak_rss_bytes(pid)) is not None}
    proc.wait()
    done.set()
    watcher.join()
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{''.join(output[-30:])}")
    return {"start": max(at_start.values(), default=0), "peak": max(peaks.values(), default=0)}


def model_config(layers: int, d_model: int, heads: int, block: int) -> dict:
    return {
        "vocab_size": VOCAB,
        "block_size": block,
        "n_layer": layers,
        "n_head": heads,
        "n_embd": d_model,
        "twicing_layers": "all",
    }


def run_config(
    model: dict, shards: Path, work: Path, layout: tuple[int, int, int], overrides: list[str], micro: int, steps: int
) -> dict:
    """The run config of one launch, with --set applied and validated as `lm train` would."""
    stage, nproc, tp = layout
    cp = next((int(o.partition("=")[2]) for o in overrides if o.startswith("train.context_parallel=")), 1)
    train = {
        "steps": steps,
        "batch_size": micro * nproc // (tp * cp),
        "micro_batch_size": micro,
        "warmup_steps": 0,
        "zero_stage": stage,
        "tensor_parallel": tp,
        "eval_windows": 0,
        "tensorboard": False,
        "log_interval": 1,
    }
    path = work / "draft.yaml"
    path.write_text(yaml.safe_dump({"model": model, "data": {"path": str(shards)}, "train": train}))
    return load_config(path, overrides).to_dict()


def parameter_count(model: dict) -> int:
    with torch.device("meta"):
        return GPT(ModelConfig(**model)).num_parameters()


def planned_bytes(config: dict, nproc: int) -> int:
    """lm plan's per-rank total for one launch."""
    return plan(RunConfig.from_dict(config), nproc).total


def parse_layout(text: str) -> tuple[tuple[int, int, int], list[str]]:
    """'3x2t1,offload=optimizer' -> ((3, 2, 1), ['train.offload=optimizer'])."""
    layout, *settings = text.split(",")
    stage, _, rest = layout.partition("x")
    nproc, _, tp = rest.partition("t")
    return (int(stage), int(nproc), int(tp or 1)), [f"train.{setting}" for setting in settings]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layouts", nargs="+", default=["0x1", "1x2", "2x2", "3x2", "3x4"])
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument(
        "--steps", type=int, default=1, help="optimizer steps per launch (2: Adam's state and activations together)"
    )
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--shards", default=None, help="token shards (2048-piece tokenizer); made from the demo corpus")
    p.add_argument("--out", default=None, help="also write the table here")
    p.add_argument("--plan-only", action="store_true", help="print lm plan's column for each layout, launch nothing")
    p.add_argument("--activations", nargs="+", type=int, default=None, metavar="T", help="activations against T")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shards = demo_shards(args.shards or work / "data", VOCAB)
        if args.activations:
            table = activation_table(args, shards, work)
            print("\n" + table)
            if args.out:
                Path(args.out).write_text(table + "\n")
            return
        big = model_config(args.layers, args.d_model, args.heads, args.block)
        n_params = parameter_count(big)
        rows = [
            f"model: {args.layers} layers, d {args.d_model}, {args.heads} heads, twicing all, vocab {VOCAB}, "
            f"block {args.block}, micro-batch {args.micro_batch}, {args.steps} step(s), {n_params / 1e6:.1f}M "
            f"parameters; overrides {args.set or 'none'}",
            "",
            "| layout | peak RSS (GB) | peak − baseline (GB) | bytes/param | at `training` line | lm plan | "
            "plan / measured | ZeRO ideal | baseline (GB) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for row, text in enumerate(args.layouts):
            layout, settings = parse_layout(text)
            stage, nproc, tp = layout
            shape = (args.micro_batch, args.steps)
            small = model_config(1, 64, tp, args.block)  # the baseline, as TP can split it
            base_config = run_config(small, shards, work, layout, args.set + settings, *shape)
            config = run_config(big, shards, work, layout, args.set + settings, *shape)
            # Planned like measured: the run less its baseline (whose logits count as much as the run's).
            planned = planned_bytes(config, nproc) - planned_bytes(base_config, nproc)
            if args.plan_only:
                print(f"{text}: lm plan {planned / n_params:.1f} bytes/param")
                continue
            base = launch(base_config, work, f"base-{row}", nproc)
            meas = launch(config, work, f"run-{row}", nproc)
            used = meas["peak"] - base["peak"]
            ideal = ideal_bytes_per_parameter(stage, nproc // tp) / tp
            name = f"ZeRO-{stage} x {nproc}" + (f" (TP {tp})" if tp > 1 else "") + "".join(f", {s}" for s in settings)
            name = name.replace("train.", "")
            rows.append(
                f"| {name} | {meas['peak'] / 1e9:.2f} | {used / 1e9:.2f} | {used / n_params:.1f} | "
                f"{(meas['start'] - base['start']) / n_params:.1f} | {planned / n_params:.1f} | "
                f"{planned / used:.2f} | {ideal:.1f} | {base['peak'] / 1e9:.2f} |"
            )
            print(rows[-1], flush=True)
        if args.plan_only:
            return
        table = "\n".join(rows)
        print("\n" + table)
        if args.out:
            Path(args.out).write_text(table + "\n")


def proc_status_bytes(key: str) -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(key + ":"))
    return int(line.split()[1]) * 1024


def measure_rank_activations(config_path: str, out_dir: str) -> None:
    """One rank's activation memory (run by torchrun): after one whole step (Adam's state and every
    buffer made), the peak RSS growth of one micro step's forward (what it keeps for backward) and
    through its backward, from the RSS at its start; glibc hands freed memory back (MALLOC)."""
    import gc
    import json

    import torch.distributed as dist

    from lm.data import rank_rows
    from lm.distributed import close_distributed
    from lm.train import optimizer_step, start_run

    run = start_run(load_config(config_path))
    optimizer_step(run, 0)
    g, mb = run.groups, run.config.train.micro_batch_size
    rows = rank_rows(run.data.batches.global_batch(1), g.dp_rank, g.dp_size, mb, 0)
    inputs, targets = run.context.chunk(rows)
    gc.collect()
    dist.barrier()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = proc_status_bytes("VmRSS")
    _, loss = run.engine(inputs, targets)
    kept = proc_status_bytes("VmHWM") - before
    run.engine.backward(loss)
    through = proc_status_bytes("VmHWM") - before
    rank = dist.get_rank()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"forward": kept, "backward": through}))
    run.log.close()
    close_distributed()


def launch_activations(config: dict, work: Path, name: str, nproc: int) -> dict:
    """The largest rank's activation memory (measure_rank_activations) of one torchrun launch."""
    import json

    path, out = work / f"{name}.yaml", work / name
    config["train"]["out_dir"] = str(out / "run")
    out.mkdir(parents=True)
    path.write_text(yaml.safe_dump(config))
    env = {**local_environment(nproc), **MALLOC, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = torchrun_local_command(nproc, [__file__, "--measure-rank", str(path), str(out)])
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{name} failed:\n{result.stderr[-3000:]}")
    ranks = [json.loads(f.read_text()) for f in sorted(out.glob("rank*.json"))]
    return {key: max(r[key] for r in ranks) for key in ("forward", "backward")}


def activation_table(args, shards: Path, work: Path) -> str:
    """Per-rank activation memory of each layout at each T, against the first layout's at the same T."""
    rows = [
        f"model: {args.layers} layers, d {args.d_model}, {args.heads} heads, twicing all, vocab {VOCAB}, "
        f"micro-batch {args.micro_batch}; the largest rank's peak RSS growth over one micro step's "
        f"forward (kept for backward) and through its backward; overrides {args.set or 'none'}",
        "",
        "| layout | T | forward keeps (GB) | through backward (GB) | forward / first layout's |",
        "|---|---|---|---|---|",
    ]
    reference: dict[int, int] = {}
    for row, text in enumerate(args.layouts):
        layout, settings = parse_layout(text)
        for t in args.activations:
            model = model_config(args.layers, args.d_model, args.heads, t)
            config = run_config(model, shards, work, layout, args.set + settings, args.micro_batch, 1)
            used = launch_activations(config, work, f"act-{row}-{t}", layout[1])
            reference.setdefault(t, used["forward"])
            rows.append(
                f"| {text} | {t} | {used['forward'] / 1e9:.3f} | {used['backward'] / 1e9:.3f} | "
                f"{used['forward'] / reference[t]:.2f} |"
            )
            print(rows[-1], flush=True)
    return "\n".join(rows)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--measure-rank"]:
        measure_rank_activations(*sys.argv[2:4])
    else:
        main()
