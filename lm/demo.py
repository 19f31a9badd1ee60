"""`lm demo --out DIR`: the whole pipeline on an embedded corpus, on the CPU, in a few minutes.

1. Corpus: Python's own reference documentation (`pydoc_data`), real English text that ships
   with every Python, so the demo needs no network.
2. Prep: a sentencepiece tokenizer and token shards in DIR/data.
3. Train: configs/demo.yaml (a small GPT, twicing in its last two layers) under the deepspeed
   launcher with 2 processes and ZeRO-2; DIR is the run directory (checkpoints, tensorboard).
4. Evaluate the final checkpoint on the held-out documents, generate a sample,
   and write DIR/summary.json.

Afterwards `lm eval|convert|generate --checkpoint DIR` work on what the demo left.
"""

import argparse
import json
import math
import time
from pathlib import Path

import torch
import yaml

from core.errors import UserError, refuse_non_empty, run_command
from data_prep.corpus import embedded_corpus, split_train_val
from data_prep.prep import prepare_shards
from launch.local import deepspeed_local_command, local_environment
from launch.processes import run_owned
from lm.evaluate import evaluate_text
from lm.generate import continuation_text, generate
from lm.inference import load_for_inference

REPO = Path(__file__).resolve().parent.parent
DEMO_CONFIG = REPO / "configs" / "demo.yaml"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="lm demo",
        description=__doc__.split("\n")[0].split(": ", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n", 2)[2],
    )
    p.add_argument("--out", required=True, help="new directory for everything the demo writes")
    p.add_argument("--procs", type=int, default=2, help="training processes (default 2)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: configs/demo.yaml)")
    p.add_argument("--workers", type=int, default=2, help="tokenisation processes")
    args = p.parse_args(argv)
    if args.procs < 1 or (args.steps is not None and args.steps < 1):
        raise UserError("--procs and --steps must be positive")
    return args


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    refuse_non_empty(out)
    if not DEMO_CONFIG.is_file():
        raise UserError(f"{DEMO_CONFIG} is missing: run the demo from a checkout of twicing-lm")
    began = time.perf_counter()
    config = yaml.safe_load(DEMO_CONFIG.read_text())

    print("== prep: tokenizer and shards from Python's bundled documentation", flush=True)
    train_docs, val_docs = split_train_val(embedded_corpus(), val_fraction=0.1, seed=0)
    data_dir = out / "data"
    prepare_shards(train_docs, val_docs, data_dir, vocab_size=config["model"]["vocab_size"], workers=args.workers)
    val_text = "\n\n".join(val_docs)
    (data_dir / "val.txt").write_text(val_text, encoding="utf-8")

    print(f"== train: deepspeed launcher, {args.procs} processes, ZeRO-{config['train']['zero_stage']}", flush=True)
    config["data"]["path"] = str(data_dir)
    config["train"]["out_dir"] = str(out)
    if args.steps:
        config["train"]["steps"] = args.steps
    config_path = data_dir / "demo.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    command = deepspeed_local_command(args.procs, "lm.train", ["--config", str(config_path)])
    ended = run_owned(command, local_environment(args.procs), label="lm demo")
    if ended.signal is not None:
        raise UserError(f"demo stopped by {ended.signal.name} during training (checkpoints saved: {out}/checkpoints)")
    if ended.status != 0:
        raise UserError("demo training failed (see the output above)")

    print("== eval and generate", flush=True)
    metrics = read_metrics(out)
    losses = [m["train/loss"] for m in metrics if "train/loss" in m]
    val = [m["val/loss"] for m in metrics if "val/loss" in m]
    model, tokenizer, tag_dir = load_for_inference(out)
    report = evaluate_text(model, tokenizer, val_text)
    sample_prompt = "The import statement"
    prompt_ids = tokenizer.encode(sample_prompt)
    new_ids = generate(model, prompt_ids, 40, temperature=0.8, top_k=40, generator=torch.Generator().manual_seed(0))
    sample = continuation_text(tokenizer, prompt_ids, new_ids)
    summary = {
        "train_loss_start": losses[0],
        "train_loss_end": losses[-1],
        "val_loss_start": val[0],
        "val_loss_end": val[-1],
        "val_ppl_start": math.exp(val[0]),
        "val_ppl": math.exp(val[-1]),
        "eval": report,
        "steps": len(losses),
        "sample": {"prompt": sample_prompt, "completion": sample},
        "checkpoint": str(tag_dir),
        "shards": str(data_dir),
        "tokenizer": str(out / "tokenizer.model"),
        "seconds": time.perf_counter() - began,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(
        f"train loss {summary['train_loss_start']:.3f} -> {summary['train_loss_end']:.3f} | "
        f"val ppl {summary['val_ppl_start']:.1f} -> {summary['val_ppl']:.1f} | word ppl {report['word_ppl']:.1f}"
    )
    print(f"sample: {sample_prompt}{sample}")
    print(f"wrote {out / 'summary.json'} in {summary['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_command(main))
