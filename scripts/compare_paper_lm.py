"""Train the paper's language model with twicing and its softmax twin, and compare them.

    python scripts/compare_paper_lm.py --out DIR                          # toy scale, embedded corpus, CPU
    python scripts/compare_paper_lm.py --shards data/wt103 --out DIR --scale paper --nproc 8 \\
        --dataset wikitext-103-raw --wikitext-dir data/wikitext-103-raw --split val

"Transformer Meets Twicing" (Abdullaev & Nguyen, ICLR 2025) trains on WikiText-103 a 16-layer GPT
(d_model 128, 8 heads, d_ff 2048, context 256) with twicing attention in the last two layers,
against the same model with softmax attention everywhere: configs/paper-lm-twicing.yaml and
configs/paper-lm-softmax.yaml. Both runs here use the same shards, seed and schedule, so they
differ in the attention alone. `--scale toy` shrinks depth, width, context and steps so the pair
trains on two CPU cores in a minute or two (twicing stays in the last two layers).

Without --shards, shards are made from the embedded corpus (Python's documentation text). The
evaluation text is the val split: the held-out documents when the script made the shards, else
--text / --dataset if given, else the val shard decoded with its tokenizer (sentencepiece is
lossless up to its normalisation). Then `lm analyze` on both checkpoints: clean perplexity,
word-swap perplexity, cosine similarity per layer (see lm.analyze), written to DIR/comparison.md,
DIR/comparison.json and DIR/analysis.{json,png,md}.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a file from a checkout

from core.errors import UserError, run_command  # noqa: E402
from lm.analyze import check_out_dir, markdown_table, run_analysis  # noqa: E402
from lm.config import load_config  # noqa: E402
from lm.evaluate import EvalText, Parser, add_text_arguments, text_from_args  # noqa: E402

VARIANTS = ("twicing", "softmax")
TOY_VOCAB = 512
# Toy scale: the paper's shape shrunk to a CPU minute; the same for both variants.
TOY = {
    "model.n_layer": 4,
    "model.n_head": 4,
    "model.n_embd": 64,
    "model.d_ff": 256,
    "model.block_size": 64,
    "model.dropout": 0.0,
    "train.steps": 60,
    "train.batch_size": 8,
    "train.micro_batch_size": 8,
    "train.lr": 3.0e-3,
    "train.min_lr": 3.0e-4,
    "train.warmup_steps": 6,
    "train.weight_decay": 0.0,
    "train.precision": "fp32",
    "train.zero_stage": 0,
    "train.eval_interval": 0,
    "train.eval_windows": 8,
    "train.log_interval": 20,
    "train.checkpoint_interval": 0,
    "train.tensorboard": False,
}


def toy_shards(out: Path) -> tuple[Path, list[str]]:
    """Shards of the embedded corpus, and the val documents as text."""
    from data_prep.corpus import embedded_corpus, split_train_val
    from data_prep.prep import prepare_shards

    train, val = split_train_val(embedded_corpus(), val_fraction=0.1, seed=0)
    return prepare_shards(train, val, out, vocab_size=TOY_VOCAB), val


def decoded_val_documents(shards_dir: Path) -> list[str]:
    """The val split's documents, decoded from the shards (documents are separated by eod)."""
    from data_prep.shards import ShardSet
    from data_prep.tokenizer import load_tokenizer

    shards = ShardSet.open(shards_dir, verify=False)
    tokens = np.concatenate([np.asarray(t) for t in shards.tokens("val")])
    tokenizer = load_tokenizer(shards.tokenizer_path)
    pieces = np.split(tokens, np.flatnonzero(tokens == shards.eod_id))
    docs = [tokenizer.decode(p[p != shards.eod_id].tolist()) for p in pieces]
    return [d for d in docs if d.strip()]


def overrides(variant: str, scale: str, shards: Path, run_dir: Path, extra: list[str]) -> list[str]:
    sets = {"data.path": str(shards), "train.out_dir": str(run_dir)}
    if scale == "toy":
        from data_prep.shards import ShardSet

        sets.update(TOY)
        sets["model.vocab_size"] = ShardSet.open(shards, verify=False).vocab_size
    return [f"{k}={json.dumps(v)}" for k, v in sets.items()] + list(extra)


def train(variant: str, args, shards: Path, out: Path) -> dict:
    """`lm train` of one variant in a subprocess (torchrun with --nproc > 1); its losses."""
    run_dir = out / "runs" / variant
    config_path = REPO / "configs" / f"paper-lm-{variant}.yaml"
    config = load_config(config_path, overrides(variant, args.scale, shards, run_dir, args.set))  # fails fast
    (out / "configs").mkdir(parents=True, exist_ok=True)
    resolved = out / "configs" / f"{variant}.yaml"
    resolved.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    if args.nproc > 1:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={args.nproc}",
            "-m",
            "lm.train",
            "--config",
            str(resolved),
        ]
    else:
        command = [sys.executable, "-m", "lm.cli", "train", "--config", str(resolved)]
    print(
        f"== train {variant}: {config.model.n_layer} layers, d_model {config.model.n_embd}, "
        f"twicing layers {config.model.twicing_layer_indices() or 'none'}, {config.train.steps} steps",
        flush=True,
    )
    began = time.perf_counter()
    if subprocess.run(command, cwd=REPO).returncode != 0:
        raise UserError(f"training {variant} failed (see its output above)")
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    losses = [m["train/loss"] for m in metrics if "train/loss" in m]
    val = [m["val/loss"] for m in metrics if "val/loss" in m]
    return {
        "run_dir": str(run_dir),
        "config": str(resolved),
        "seconds": time.perf_counter() - began,
        "train_loss_start": losses[0],
        "train_loss_end": losses[-1],
        "val_loss_end": val[-1] if val else None,
    }


def parse_args(argv=None) -> argparse.Namespace:
    p = Parser(
        prog="compare_paper_lm.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--shards", help="token shards (default: made from the embedded corpus under OUT/shards)")
    p.add_argument("--out", required=True, help="new (or empty) output directory")
    p.add_argument(
        "--scale", choices=["toy", "paper"], default="toy", help="toy: CPU minutes; paper: the paper's shape"
    )
    p.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="config override for both runs"
    )
    p.add_argument("--nproc", type=int, default=1, help="training processes per run (torchrun)")
    add_text_arguments(p)
    p.add_argument("--rates", default="0,0.05,0.1,0.2", help="word-swap rates")
    p.add_argument("--windows", type=int, default=32, help="most windows for the cosine similarity")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    check_out_dir(out)
    rates = [float(r) for r in args.rates.split(",")]
    began = time.perf_counter()
    explicit_text = args.text is not None or args.dataset is not None or args.wikitext_dir is not None
    text = text_from_args(args) if explicit_text else None
    if args.shards:
        shards = Path(args.shards).resolve()
    else:
        print("== shards from the embedded corpus", flush=True)
        shards, val_docs = toy_shards(out / "shards")
        text = text or EvalText(val_docs, "embedded corpus, val split")
    text = text or EvalText(decoded_val_documents(shards), f"{shards} val split (decoded)")
    runs = {variant: train(variant, args, shards, out) for variant in VARIANTS}
    print("== analyze", flush=True)
    analysis = run_analysis(
        [runs[v]["run_dir"] for v in VARIANTS],
        text,
        out / "analysis",
        list(VARIANTS),
        rates=rates,
        max_windows=args.windows,
    )
    table = markdown_table(analysis)
    train_rows = "\n".join(
        f"| {v} | {r['train_loss_start']:.3f} | {r['train_loss_end']:.3f} | {r['seconds']:.0f} |"
        for v, r in runs.items()
    )
    report = (
        f"# Twicing vs softmax, {args.scale} scale\n\nEvaluation text: {text.source} "
        f"({analysis['text']['words']} words, {analysis['text']['bytes']} bytes).\n\n{table}\n\n"
        f"| run | train loss start | train loss end | seconds |\n|---|---|---|---|\n{train_rows}\n\n"
        f"Cosine pairs: {analysis['cosine_pairs']}.\n\n![analysis](analysis/analysis.png)\n"
    )
    (out / "comparison.md").write_text(report)
    summary = {
        "scale": args.scale,
        "shards": str(shards),
        "runs": runs,
        "analysis": analysis,
        "seconds": time.perf_counter() - began,
    }
    (out / "comparison.json").write_text(json.dumps(summary, indent=2))
    print(table)
    print(f"wrote {out / 'comparison.md'} in {summary['seconds']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(run_command(main))
