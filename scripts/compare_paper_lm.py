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
lossless up to its normalisation). Then `lm analyze` on every checkpoint: clean perplexity,
word-swap perplexity, cosine similarity per layer (see lm.analyze), written to DIR/comparison.md,
DIR/comparison.json and DIR/analysis/analysis.{json,png,md}.

Seeds. `--seeds N` trains each variant N times, with train.seed = s, s + 1, ..., s + N - 1 (s the
config's seed; a seed changes the initialisation and the batches drawn, the data stay the same),
into DIR/runs/VARIANT/seedS. The table gives, per metric (word-level perplexity, clean and at each
word-swap rate; cosine similarity per layer), mean ± sample standard deviation over the seeds, the
difference of the means (twicing - softmax) and whether it is significant: Welch's t-test (unequal
variances), p < 0.05, with scipy; without scipy the plain rule |difference| > 2 sqrt(s1²/N + s2²/N),
two standard errors of the difference. The table names the test used. One seed tests nothing.
"""

import argparse
import json
import math
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
from lm.analyze import check_out_dir, run_analysis  # noqa: E402
from lm.config import load_config  # noqa: E402
from lm.evaluate import EvalText, Parser, add_text_arguments, text_from_args  # noqa: E402

VARIANTS = ("twicing", "softmax")
ALPHA = 0.05  # Welch's t-test level
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


def base_seed(args, shards: Path, out: Path) -> int:
    """The seed of the first run: the config's, after --set."""
    config_path = REPO / "configs" / "paper-lm-twicing.yaml"
    return load_config(config_path, overrides("twicing", args.scale, shards, out / "runs", args.set)).train.seed


def train(variant: str, seed: int, args, shards: Path, out: Path) -> dict:
    """`lm train` of one variant and seed in a subprocess (torchrun with --nproc > 1); its losses."""
    run_dir = out / "runs" / variant / f"seed{seed}"
    config_path = REPO / "configs" / f"paper-lm-{variant}.yaml"
    sets = overrides(variant, args.scale, shards, run_dir, args.set) + [f"train.seed={seed}"]
    config = load_config(config_path, sets)  # fails fast
    (out / "configs").mkdir(parents=True, exist_ok=True)
    resolved = out / "configs" / f"{variant}-seed{seed}.yaml"
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
        f"== train {variant}, seed {seed}: {config.model.n_layer} layers, d_model {config.model.n_embd}, "
        f"twicing layers {config.model.twicing_layer_indices() or 'none'}, {config.train.steps} steps",
        flush=True,
    )
    began = time.perf_counter()
    if subprocess.run(command, cwd=REPO).returncode != 0:
        raise UserError(f"training {variant} (seed {seed}) failed (see its output above)")
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    losses = [m["train/loss"] for m in metrics if "train/loss" in m]
    val = [m["val/loss"] for m in metrics if "val/loss" in m]
    return {
        "seed": seed,
        "run_dir": str(run_dir),
        "config": str(resolved),
        "seconds": time.perf_counter() - began,
        "train_loss_start": losses[0],
        "train_loss_end": losses[-1],
        "val_loss_end": val[-1] if val else None,
    }


# ---- seeds: mean, spread, and whether a difference exceeds the spread -------------------------


def metric_values(model: dict, rates: list[float]) -> dict[str, float]:
    """One model's compared numbers, named as in lm.analyze's table."""
    values = {"clean word PPL": model["clean"]["word_ppl"]}
    for rate, swap in zip(rates, model["word_swap"]):
        if rate:
            values[f"word-swap {rate:.0%} word PPL"] = swap["word_ppl"]
    for layer, cosine in enumerate(model["cosine_similarity"]):
        values[f"cos sim layer {layer} ({'embedding' if layer == 0 else f'block {layer}'})"] = cosine
    return values


def significance_test():
    """(name, test(a, b) -> (significant, p or None)): Welch's t-test with scipy, else 2 standard errors."""
    try:
        from scipy.stats import ttest_ind
    except ImportError:

        def two_standard_errors(a, b):
            spread = 2 * math.sqrt(np.var(a, ddof=1) / len(a) + np.var(b, ddof=1) / len(b))
            return bool(abs(np.mean(a) - np.mean(b)) > spread), None

        return "|difference| > 2 sqrt(s1²/N + s2²/N), two standard errors (scipy not installed)", two_standard_errors

    def welch(a, b):
        if np.var(a) == 0 and np.var(b) == 0:  # no spread at all: any difference exceeds it
            return bool(np.mean(a) != np.mean(b)), None
        p = float(ttest_ind(a, b, equal_var=False).pvalue)
        return p < ALPHA, p

    return f"Welch's t-test (unequal variances), p < {ALPHA}", welch


def seed_statistics(models: dict[str, list[dict]], rates: list[float], test) -> list[dict]:
    """Per metric: each variant's values over its seeds, their mean and standard deviation, the
    difference of the means (twicing - softmax) and the test's verdict (None with one seed)."""
    values = {v: [metric_values(m, rates) for m in models[v]] for v in VARIANTS}
    rows = []
    for metric in values[VARIANTS[0]][0]:
        row = {"metric": metric}
        for v in VARIANTS:
            xs = [seed[metric] for seed in values[v]]
            row[v] = {
                "values": xs,
                "mean": float(np.mean(xs)),
                "sd": float(np.std(xs, ddof=1)) if len(xs) > 1 else None,
            }
        row["difference"] = row[VARIANTS[0]]["mean"] - row[VARIANTS[1]]["mean"]
        a, b = (row[v]["values"] for v in VARIANTS)
        row["significant"], row["p"] = test(a, b) if min(len(a), len(b)) > 1 else (None, None)
        rows.append(row)
    return rows


def number(x: float, digits: int) -> str:
    return f"{x:.4g}" if abs(x) >= 1e5 else f"{x:.{digits}f}"  # an untrained toy's PPL runs to 1e9


def statistics_table(rows: list[dict]) -> str:
    def cell(stat, digits):
        return number(stat["mean"], digits) + (f" ± {number(stat['sd'], digits)}" if stat["sd"] is not None else "")

    def verdict(row):
        if row["significant"] is None:
            return "n/a (one seed)"
        return ("yes" if row["significant"] else "no") + (f" (p = {row['p']:.3f})" if row["p"] is not None else "")

    lines = [
        f"| metric | {' | '.join(VARIANTS)} | {VARIANTS[0]} − {VARIANTS[1]} | significant |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        digits = 4 if row["metric"].startswith("cos") else 2
        difference = ("+" if row["difference"] >= 0 else "") + number(row["difference"], digits)
        cells = [cell(row[v], digits) for v in VARIANTS] + [difference, verdict(row)]
        lines.append(f"| {row['metric']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


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
    p.add_argument("--seeds", type=int, default=1, help="runs per variant, seeds s .. s+N-1 (s: the config's)")
    add_text_arguments(p)
    p.add_argument("--rates", default="0,0.05,0.1,0.2", help="word-swap rates")
    p.add_argument("--windows", type=int, default=32, help="most windows for the cosine similarity")
    args = p.parse_args(argv)
    if args.seeds < 1:
        raise UserError(f"--seeds must be at least 1, got {args.seeds}")
    return args


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
    seeds = [base_seed(args, shards, out) + i for i in range(args.seeds)]
    runs = {variant: [train(variant, seed, args, shards, out) for seed in seeds] for variant in VARIANTS}
    print("== analyze", flush=True)
    analysis = run_analysis(
        [r["run_dir"] for v in VARIANTS for r in runs[v]],
        text,
        out / "analysis",
        [f"{v}-seed{r['seed']}" for v in VARIANTS for r in runs[v]],
        rates=rates,
        max_windows=args.windows,
    )
    by_variant = {v: analysis["models"][i * len(seeds) : (i + 1) * len(seeds)] for i, v in enumerate(VARIANTS)}
    test_name, test = significance_test()
    rows = seed_statistics(by_variant, rates, test)
    table = statistics_table(rows)
    layers = ", ".join(f"{v} {by_variant[v][0]['twicing_layers'] or 'none'}" for v in VARIANTS)
    train_rows = "\n".join(
        f"| {v} | {r['seed']} | {r['train_loss_start']:.3f} | {r['train_loss_end']:.3f} | {r['seconds']:.0f} |"
        for v in VARIANTS
        for r in runs[v]
    )
    report = (
        f"# Twicing vs softmax, {args.scale} scale, {len(seeds)} seed(s)\n\nEvaluation text: {text.source} "
        f"({analysis['text']['words']} words, {analysis['text']['bytes']} bytes). Seeds: "
        f"{', '.join(map(str, seeds))}; cells are the mean ± standard deviation over them. "
        f"Significant: {test_name}. Twicing layers: {layers}.\n\n{table}\n\n"
        f"| run | seed | train loss start | train loss end | seconds |\n|---|---|---|---|---|\n{train_rows}\n\n"
        f"Cosine pairs: {analysis['cosine_pairs']}.\n\nEach run's numbers: analysis/analysis.md.\n\n"
        "![analysis](analysis/analysis.png)\n"
    )
    (out / "comparison.md").write_text(report)
    summary = {
        "scale": args.scale,
        "shards": str(shards),
        "seeds": seeds,
        "test": test_name,
        "statistics": rows,
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
