"""Training throughput on this machine: our DeepSpeed training versus a plain PyTorch loop.

    .venv/bin/python benchmarks/train_throughput.py [--steps 60] [--config configs/demo.yaml] [--set k=v]

Runs on the GPU when there is one (the plain loop then uses bf16 autocast when the config says
bf16), else on the CPU.

Prints one table, all rows measured in the same run on the same data:
  plain       the reference loop of lm.plain_loop, one process, all cores
  ds-1p-zN    lm.train in one process under a DeepSpeed engine, ZeRO stage N
  ds-2p-z2    lm.train in two processes (deepspeed launcher), ZeRO-2, as the demo (CPU or >= 2 GPUs)
Also per row: MFU (model FLOPs per token, counting the second attention pass of twicing layers,
against the card's peak; GPU only) and peak memory. Tokens/s of DeepSpeed runs are the median of the per-step figures after the first 10 steps
(start-up excluded), the same statistic for the plain loop.
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


def deepspeed_tokens_per_s(config: dict, work: Path, name: str, nproc: int, stage: int) -> float:
    config = json.loads(json.dumps(config))
    config["train"].update(zero_stage=stage, out_dir=str(work / name), eval_windows=0, tensorboard=False, log_interval=10**6)
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    if nproc == 1:
        command = [sys.executable, "-m", "lm.train", "--config", str(path)]
        env = dict(os.environ)
    else:
        command = deepspeed_local_command(nproc, "lm.train", ["--config", str(path)])
        env = local_environment(nproc)
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    metrics = [json.loads(line) for line in (work / name / "metrics.jsonl").read_text().splitlines()]
    rates = [m["train/tokens_per_s"] for m in metrics if "train/tokens_per_s" in m]
    return statistics.median(rates[10:] or rates), max(m.get("train/memory_mib", 0.0) for m in metrics)


def peak_tflops(device: str) -> float | None:
    """Dense bf16 peak of the card, for MFU (None where unknown: no MFU column)."""
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return 989.0 if ("H100" in name or "H200" in name) else 312.0 if "A100" in name else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--shards", default=None, help="existing shards (default: the demo corpus, 2048-piece tokenizer)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="config override")
    p.add_argument("--compile", action="store_true", help="torch.compile the plain loop's model")
    p.add_argument("--peak-tflops", type=float, default=None, help="the card's peak for MFU (default: known cards)")
    args = p.parse_args()
    config = yaml.safe_load(Path(args.config).read_text())
    for item in args.set:
        key, _, value = item.partition("=")
        section, _, name = key.partition(".")
        config[section][name] = yaml.safe_load(value)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gpus = torch.cuda.device_count()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shards = args.shards
        if shards is None:
            train_docs, val_docs = split_train_val(embedded_corpus(), 0.1, 0)
            shards = str(prepare_shards(train_docs, val_docs, work / "data", vocab_size=min(2048, config["model"]["vocab_size"]), workers=2))
        config["data"]["path"] = shards
        config["train"]["steps"] = args.steps
        run_config = RunConfig.from_dict(config)
        plain = train_plain(run_config, device=device, compile=args.compile)
        tokens_per_step = run_config.train.batch_size * run_config.model.block_size
        rates = [tokens_per_step / s for s in plain["step_seconds"]]
        plain_memory = (torch.cuda.max_memory_allocated() / 2**20 if device == "cuda"
                        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        rows = [("plain", "PyTorch loop, 1 process" + (", compiled" if args.compile else ""),
                 statistics.median(rates[10:] or rates), plain_memory)]
        runs = [("ds-1p-z0", "DeepSpeed ZeRO-0, 1 process", 1, 0), ("ds-1p-z2", "DeepSpeed ZeRO-2, 1 process", 1, 2)]
        if device == "cpu" or gpus >= 2:
            runs.append(("ds-2p-z2", "DeepSpeed ZeRO-2, 2 processes", 2, 2))
        for name, label, nproc, stage in runs:
            rows.append((name, label, *deepspeed_tokens_per_s(config, work, name, nproc, stage)))
    base = rows[0][2]
    model = GPT(run_config.model)
    params, flops_per_token = model.num_parameters(), model.flops_per_token()
    peak = args.peak_tflops or peak_tflops(device)
    where = torch.cuda.get_device_name() if device == "cuda" else f"{os.cpu_count()} CPU cores"
    print(f"\nconfig {Path(args.config).name} {' '.join(args.set)}: {params / 1e6:.2f}M parameters, "
          f"{run_config.train.precision}, {tokens_per_step} tokens/step, {args.steps} steps, on {where}")
    print(f"layers {run_config.model.layer_attention()}; MFU counts twicing's second attention pass"
          + (f"; peak {peak:.0f} TFLOP/s" if peak else ""))
    memory = "peak MiB" if device == "cuda" else "peak RSS MiB"
    print(f"{'run':<10} {'what':<32} {'tokens/s':>10} {'vs plain':>9} {'MFU':>6} {memory:>13}")
    for name, label, rate, mib in rows:
        mfu = f"{rate * flops_per_token / (peak * 1e12):.1%}" if peak else "-"
        print(f"{name:<10} {label:<32} {rate:>10.0f} {rate / base:>8.2f}x {mfu:>6} {mib:>13.0f}")


if __name__ == "__main__":
    main()
