"""Training throughput on this machine: our DeepSpeed training versus a plain PyTorch loop.

    .venv/bin/python benchmarks/train_throughput.py [--config configs/demo.yaml] [--set k=v ...]
        [--twicing none all last:2] [--stages 0 1 2] [--two-process-stages 2] [--steps 60]
        [--compile auto|on|off] [--out table.txt]

Runs on the GPU when there is one, else on the CPU. Model, batch, sequence length and precision
come from the config (`--set train.micro_batch_size=16 --set train.precision=bf16 ...`);
`--twicing` repeats every row for each attention setting (model.twicing_layers), each group
against its own plain loop. `--compile auto` compiles on the GPU only (inductor on the CPU is slow
to build and not what we measure there).

Rows, all measured in the same run on the same data:
  plain       the reference loop of lm.plain_loop (fused AdamW on CUDA, bf16 autocast when the
              config says bf16 or bf16-weights), one process, all cores
  ds-1p-zN    lm.train in one process under a DeepSpeed engine, ZeRO stage N, train.compile as above
  ddp-2p      the plain loop data-parallel in two processes under torch's DistributedDataParallel
              (torchrun), the reference of the two-process rows
  ds-2p-zN    lm.train in two processes (deepspeed launcher): on the CPU or with >= 2 GPUs
Also per row: the ratio to its reference (the plain loop; ddp-2p for two-process rows), MFU
(model FLOPs per token, counting the second attention pass of twicing layers, against the card's
peak; GPU only) and peak memory. Tokens/s is
the median of the per-step figures after the first 10 steps (start-up and compilation excluded).
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from data_prep.corpus import embedded_corpus, split_train_val  # noqa: E402
from data_prep.prep import prepare_shards  # noqa: E402
from launch.local import deepspeed_local_command, local_environment  # noqa: E402
from lm.config import RunConfig  # noqa: E402
from lm.model import GPT  # noqa: E402
from lm.plain_loop import train_plain  # noqa: E402

WARMUP_STEPS = 10  # left out of the median: start-up, compilation, allocator warm-up


def steady_rate(rates: list[float]) -> float:
    return statistics.median(rates[WARMUP_STEPS:] or rates)


def deepspeed_row(config: dict, work: Path, name: str, nproc: int, stage: int) -> tuple[float, float]:
    """(tokens/s, peak MiB) of lm.train under DeepSpeed, read back from its metrics.jsonl."""
    config = json.loads(json.dumps(config))
    config["train"].update(
        zero_stage=stage, out_dir=str(work / name), eval_windows=0, tensorboard=False, log_interval=10**6
    )
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    if nproc == 1:
        command, env = [sys.executable, "-m", "lm.train", "--config", str(path)], dict(os.environ)
    else:
        command, env = deepspeed_local_command(nproc, "lm.train", ["--config", str(path)]), local_environment(nproc)
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    metrics = [json.loads(line) for line in (work / name / "metrics.jsonl").read_text().splitlines()]
    rates = [m["train/tokens_per_s"] for m in metrics if "train/tokens_per_s" in m]
    return steady_rate(rates), max(m.get("train/memory_mib", 0.0) for m in metrics)


def ddp_row(config: dict, work: Path, name: str, nproc: int) -> tuple[float, float]:
    """(tokens/s, peak RSS/MiB of rank 0) of the plain loop under DDP in `nproc` processes (torchrun)."""
    path, out = work / f"{name}.json", work / f"{name}-result.json"
    path.write_text(json.dumps(config))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    command += [__file__, "--ddp-worker", str(path), str(out)]
    subprocess.run(command, env=local_environment(nproc), check=True, stdout=subprocess.DEVNULL)
    result = json.loads(out.read_text())
    tokens_per_step = config["train"]["batch_size"] * config["model"]["block_size"]
    return steady_rate([tokens_per_step / s for s in result["step_seconds"]]), result["memory_mib"]


def ddp_worker(config_path: str, out_path: str) -> None:
    """One rank of ddp_row."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    torch.distributed.init_process_group("nccl" if device == "cuda" else "gloo")
    run_config = RunConfig.from_dict(json.loads(Path(config_path).read_text()))
    plain = train_plain(run_config, device=device, compile=run_config.train.compile)
    if torch.distributed.get_rank() == 0:
        memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        if device == "cuda":
            memory = torch.cuda.max_memory_allocated() / 2**20
        result = {"losses": plain["losses"], "step_seconds": plain["step_seconds"], "memory_mib": memory}
        Path(out_path).write_text(json.dumps(result))
    torch.distributed.destroy_process_group()


def plain_row(run_config: RunConfig, device: str, compile: bool) -> tuple[float, float]:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    plain = train_plain(run_config, device=device, compile=compile)
    tokens_per_step = run_config.train.batch_size * run_config.model.block_size
    memory = (
        torch.cuda.max_memory_allocated() / 2**20
        if device == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )  # RSS: the process's peak so far
    rate = steady_rate([tokens_per_step / s for s in plain.pop("step_seconds")])
    del plain  # the model: free the GPU for the DeepSpeed processes
    if device == "cuda":
        torch.cuda.empty_cache()
    return rate, memory


def peak_tflops(device: str) -> float | None:
    """Dense bf16 peak of the card, for MFU (None where unknown: no MFU column)."""
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return 989.0 if ("H100" in name or "H200" in name) else 312.0 if "A100" in name else None


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="config override")
    p.add_argument("--steps", type=int, default=60)
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
    p.add_argument("--peak-tflops", type=float, default=None, help="the card's peak for MFU (default: known cards)")
    p.add_argument("--out", default=None, help="also write the table to this file")
    return p.parse_args()


def main() -> None:
    if sys.argv[1:2] == ["--ddp-worker"]:
        return ddp_worker(*sys.argv[2:4])
    args = parse_args()
    config = yaml.safe_load(Path(args.config).read_text())
    for item in args.set:
        key, _, value = item.partition("=")
        section, _, name = key.partition(".")
        config.setdefault(section, {})[name] = yaml.safe_load(value)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    compile = args.compile == "on" or (args.compile == "auto" and device == "cuda")
    config["train"].update(steps=args.steps, compile=compile)
    stage_runs = [(1, s) for s in args.stages]
    if device == "cpu" or torch.cuda.device_count() >= 2:
        stage_runs += [(2, s) for s in args.two_process_stages]
    twicing = args.twicing or [config["model"].get("twicing_layers", "none")]
    rows = []  # (attention, name, what, tokens/s, ratio, MiB, flops per token)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shards = Path(args.shards) if args.shards else work / "data"
        if not (shards / "manifest.json").is_file():  # made here, kept when --shards names a new directory
            train_docs, val_docs = split_train_val(embedded_corpus(), 0.1, 0)
            vocab = min(2048, config["model"]["vocab_size"])
            prepare_shards(train_docs, val_docs, shards, vocab_size=vocab, workers=2)
        config["data"]["path"] = str(shards)
        for layers in twicing:
            config["model"]["twicing_layers"] = layers
            run_config = RunConfig.from_dict(config)
            flops = GPT(run_config.model).flops_per_token()
            base, memory = plain_row(run_config, device, compile)
            rows.append((layers, "plain", "PyTorch loop" + (", compiled" if compile else ""), base, 1.0, memory, flops))
            write_table(args, run_config, rows, device, compile)
            reference = {1: base}
            for nproc, stage in stage_runs:
                if nproc not in reference:
                    reference[nproc], mib = ddp_row(config, work, f"ddp-{nproc}p-{len(rows)}", nproc)
                    label = f"PyTorch DDP, {nproc} processes" + (", compiled" if compile else "")
                    rows.append((layers, f"ddp-{nproc}p", label, reference[nproc], 1.0, mib, flops))
                name = f"ds-{nproc}p-z{stage}"
                rate, mib = deepspeed_row(config, work, f"{name}-{len(rows)}", nproc, stage)
                label = f"DeepSpeed ZeRO-{stage}, {nproc} process" + "es" * (nproc > 1)
                rows.append((layers, name, label, rate, rate / reference[nproc], mib, flops))
                write_table(args, run_config, rows, device, compile)  # rows so far survive a timeout
    print("\n" + write_table(args, run_config, rows, device, compile))


def write_table(args, run_config: RunConfig, rows: list, device: str, compile: bool) -> str:
    """The table as text, also written to --out when given."""
    t, m = run_config.train, run_config.model
    peak = args.peak_tflops or peak_tflops(device)
    where = torch.cuda.get_device_name() if device == "cuda" else f"{os.cpu_count()} CPU cores"
    params = GPT(m).num_parameters()
    memory = "peak MiB" if device == "cuda" else "peak RSS MiB"
    lines = [
        f"config {Path(args.config).name} {' '.join(args.set)}: {params / 1e6:.2f}M parameters, {t.precision}, "
        f"micro batch {t.micro_batch_size} x {m.block_size} tokens, {t.batch_size * m.block_size} tokens/step, "
        f"{args.steps} steps, compile {'on' if compile else 'off'}, on {where}",
        "MFU counts twicing's second attention pass" + (f"; peak {peak:.0f} TFLOP/s" if peak else ""),
        f"{'twicing':<8} {'run':<9} {'what':<34} {'tokens/s':>10} {'vs ref':>9} {'MFU':>6} {memory:>13}",
    ]
    for layers, name, label, rate, ratio, mib, flops in rows:
        mfu = f"{rate * flops / (peak * 1e12):.1%}" if peak else "-"
        lines.append(f"{str(layers):<8} {name:<9} {label:<34} {rate:>10.0f} {ratio:>8.2f}x {mfu:>6} {mib:>13.0f}")
    table = "\n".join(lines)
    if args.out:
        Path(args.out).write_text(table + "\n")
    return table


if __name__ == "__main__":
    main()
