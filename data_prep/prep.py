"""`lm prep`: train a sentencepiece tokenizer (or take a given one) and write token shards, in parallel.

The command line picks a corpus source (`--input`, `--dataset`, `--wikitext-dir`,
`--hf-dataset`) and options, then hands over to `data_prep.pipeline`. Started by `mpirun`
(or `srun` with PMI), every rank takes part; see the --help epilog. `prepare_shards` is the
Python entry point for documents already in memory.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

from core.errors import UserError, run_command
from data_prep import corpus, pipeline, shards, sources, wikitext
from data_prep import ranks as ranks_mod
from data_prep.pipeline import PrepOptions

TOKENIZER_NAME = pipeline.TOKENIZER_NAME

EPILOG = """\
sources (exactly one):
  --input FILE...        text files (one document each, or one per ' = Title = ' article),
                         .jsonl (one document per line's --text-field), .parquet / .arrow
                         (one document per row); globs like 'data/*.txt' are expanded.
                         --val-fraction of the documents become the val split.
  --dataset NAME         WikiText by name (wikitext-103-raw, wikitext-103, wikitext-2-raw,
                         wikitext-2) from the Hugging Face hub (Salesforce/wikitext), with its
                         own splits: train, val (= valid), test. One document per article.
  --wikitext-dir DIR     WikiText offline from a local copy: wiki.{train,valid,test}.{raw,tokens},
                         or parquet / arrow / jsonl dumps of the hub dataset. Add --dataset to
                         pick raw or tokens when DIR holds both.
  --hf-dataset NAME      any hub dataset: one document per row of --text-field (with
                         --hf-config, --hf-split; --hf-val-split or else --val-fraction).
                         Offline, a dataset already in the datasets cache loads with
                         HF_DATASETS_OFFLINE=1.

parallelism: each split is cut into work units of --docs-per-unit documents (fewer once
  --unit-chars characters are in); units are tokenised by --workers processes, and under
  mpirun by every rank (unit u on rank u % size, each rank with its own --workers). Each
  unit becomes a part file in DIR/.prep; rank 0 then joins them in unit order into shards of
  about --tokens-per-shard tokens and writes manifest.json last. The bytes written do not
  depend on --workers or the number of ranks. With several nodes, --out must be on a shared
  filesystem. Example:
    mpirun -np 4 python -m data_prep.prep --dataset wikitext-103-raw --out data/wt103

tokenizer: without --tokenizer a sentencepiece model is trained on the train split. --tokenizer
  takes a sentencepiece .model, a Hugging Face tokenizer.json, or a directory holding either
  (tokenizer.model first). The end of a document is the tokenizer's eos: for a tokenizer.json,
  --eod-token, else eos_token of the tokenizer_config.json beside it, else <|endoftext|>, </s> or
  <eos> if it has one as an added token. DIR gets a copy (tokenizer.model, or tokenizer.json with
  its tokenizer_config.json, which then names the chosen eos).

resuming: an interrupted run leaves DIR/.prep; rerun the same command with --resume and
  finished units (checksum-verified) are skipped. --out must otherwise be empty or new
  (--overwrite replaces an earlier prep; other files there are left alone).
"""


def prepare_shards(
    train_docs: Sequence[str],
    val_docs: Sequence[str],
    out_dir: str | os.PathLike,
    *,
    vocab_size: int = 8000,
    tokenizer: str | os.PathLike | None = None,
    eod_token: str | None = None,
    workers: int = 1,
    tokens_per_shard: int = 50_000_000,
    model_type: str = "bpe",
    overwrite: bool = False,
    seed: int = 0,
    max_sentences: int | None = None,
    resume: bool = False,
    docs_per_unit: int = 1024,
    character_coverage: float = 0.9995,
) -> Path:
    """Train `out_dir/tokenizer.model` on train_docs (or copy `tokenizer`, see lm prep --tokenizer,
    --eod-token), then tokenise both splits into shards.

    Returns out_dir. The manifest is written last, so an interrupted run leaves no manifest.
    """
    if not train_docs:
        raise UserError("no training documents to prepare")
    opts = PrepOptions(
        vocab_size=vocab_size,
        tokenizer=str(Path(tokenizer).resolve()) if tokenizer is not None else None,
        eod_token=eod_token,
        workers=workers,
        tokens_per_shard=tokens_per_shard,
        model_type=model_type,
        overwrite=overwrite,
        seed=seed,
        max_sentences=max_sentences,
        resume=resume,
        docs_per_unit=docs_per_unit,
        character_coverage=character_coverage,
    )
    return pipeline.run(sources.list_corpus(train_docs, val_docs), out_dir, opts)


def demo_shards(out_dir: str | os.PathLike, vocab_size: int, workers: int = 2) -> Path:
    """Shards of the embedded corpus (90/10 split, seed 0) in `out_dir`, made there unless it holds
    them already: the data of the demo-sized benchmarks."""
    out_dir = Path(out_dir)
    if not (out_dir / "manifest.json").is_file():
        train_docs, val_docs = corpus.split_train_val(corpus.embedded_corpus(), 0.1, 0)
        prepare_shards(train_docs, val_docs, out_dir, vocab_size=vocab_size, workers=workers)
    return out_dir


def _positive_int(text: str) -> int:
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one-line UserErrors, like every other bad input."""

    def error(self, message: str):
        raise UserError(f"{message} (see lm prep --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="lm prep",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a sentencepiece tokenizer (or take --tokenizer) and write token shards\n"
        "(manifest.json, tokenizer.model or tokenizer.json, {split}-NNNNN.bin/.idx) to --out.",
    )
    src = p.add_argument_group("source (one of)")
    src.add_argument("--input", nargs="+", metavar="FILE", help="text/jsonl/parquet/arrow files or globs")
    src.add_argument("--dataset", metavar="NAME", help="WikiText: " + ", ".join(wikitext.CONFIGS))
    src.add_argument("--wikitext-dir", metavar="DIR", help="local WikiText copy (offline)")
    src.add_argument("--hf-dataset", metavar="NAME", help="any Hugging Face dataset name")
    src.add_argument("--hf-config", metavar="C", help="its config (subset) name")
    src.add_argument("--hf-split", default="train", metavar="S", help="its split to train on (default: %(default)s)")
    src.add_argument(
        "--hf-val-split", metavar="S", help="its split to use as val (default: carve --val-fraction out of --hf-split)"
    )
    src.add_argument(
        "--hf-streaming", action="store_true", help="stream hub data instead of downloading it to the datasets cache"
    )
    src.add_argument(
        "--text-field",
        "--jsonl-field",
        default="text",
        metavar="F",
        help="field holding the text in jsonl/parquet/arrow/hub rows (default: %(default)s)",
    )
    src.add_argument(
        "--val-fraction",
        type=float,
        default=0.05,
        metavar="F",
        help="fraction of documents held out as val, for sources without a val split (default: %(default)s)",
    )
    tok = p.add_argument_group("tokenizer (trained: sentencepiece, byte fallback: no input is unknown)")
    tok.add_argument(
        "--vocab-size", type=_positive_int, default=8000, metavar="N", help="vocabulary size (default: %(default)s)"
    )
    tok.add_argument(
        "--model-type",
        choices=("bpe", "unigram"),
        default="bpe",
        help="sentencepiece model type (default: %(default)s)",
    )
    tok.add_argument(
        "--character-coverage",
        type=_fraction,
        default=0.9995,
        metavar="F",
        help="share of characters given their own pieces; the rest are spelled as bytes (default: %(default)s)",
    )
    tok.add_argument(
        "--max-sentences",
        type=_positive_int,
        default=1_000_000,
        metavar="N",
        help="train on a seeded random sample of N lines (default: %(default)s)",
    )
    tok.add_argument(
        "--tokenizer",
        metavar="PATH",
        help="use this tokenizer instead of training one: a sentencepiece .model, a Hugging Face tokenizer.json, "
        "or a directory holding either",
    )
    tok.add_argument(
        "--eod-token",
        metavar="TOKEN",
        help="end-of-document token of a --tokenizer tokenizer.json (default: its eos_token, see below)",
    )
    tok.add_argument(
        "--seed",
        type=int,
        default=0,
        metavar="S",
        help="seed of the val split and the tokenizer sample (default: %(default)s)",
    )
    run = p.add_argument_group("sharding and parallelism")
    run.add_argument("--out", required=True, metavar="DIR", help="output shard directory")
    run.add_argument(
        "--workers",
        type=_positive_int,
        default=1,
        metavar="N",
        help="tokenising processes per rank (default: %(default)s)",
    )
    run.add_argument(
        "--tokens-per-shard",
        type=_positive_int,
        default=50_000_000,
        metavar="N",
        help="start a new shard file after this many tokens (default: %(default)s)",
    )
    run.add_argument(
        "--docs-per-unit",
        type=_positive_int,
        default=1024,
        metavar="N",
        help="documents per work unit (default: %(default)s)",
    )
    run.add_argument(
        "--unit-chars",
        type=_positive_int,
        default=1 << 22,
        metavar="N",
        help="close a work unit early at this many characters (default: %(default)s)",
    )
    run.add_argument(
        "--resume", action="store_true", help="continue an interrupted prep in --out, skipping finished units"
    )
    run.add_argument("--overwrite", action="store_true", help="replace an earlier prep in --out")
    run.add_argument("--mpi", action="store_true", help="use mpi4py ranks even if no MPI launcher is detected")
    return p


def corpus_from_args(args: argparse.Namespace) -> sources.Corpus:
    """The one source the arguments name; a bad combination is a UserError."""
    named = (("--input", args.input), ("--wikitext-dir", args.wikitext_dir), ("--hf-dataset", args.hf_dataset))
    chosen = [flag for flag, value in named if value]
    if args.dataset and not args.wikitext_dir:
        chosen.append("--dataset")
    if len(chosen) != 1:
        raise UserError(
            "give exactly one source: --input, --dataset, --wikitext-dir or "
            f"--hf-dataset (got {', '.join(chosen) or 'none'})"
        )
    if args.wikitext_dir:
        return wikitext.dir_corpus(args.wikitext_dir, args.dataset)
    if args.dataset:
        return wikitext.hub_corpus(args.dataset, streaming=args.hf_streaming)
    if not 0 < args.val_fraction < 1:
        raise UserError(f"--val-fraction must be between 0 and 1 (exclusive), got {args.val_fraction}")
    if args.hf_dataset:
        return sources.hf_corpus(
            args.hf_dataset,
            args.text_field,
            config=args.hf_config,
            split=args.hf_split,
            val_split=args.hf_val_split,
            val_fraction=args.val_fraction,
            seed=args.seed,
            streaming=args.hf_streaming,
        )
    return sources.files_corpus(args.input, args.text_field, args.val_fraction, args.seed)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.seed < 0:
        raise UserError(f"--seed must be non-negative, got {args.seed}")
    ranks = ranks_mod.current(args.mpi)
    opts = PrepOptions(
        vocab_size=args.vocab_size,
        model_type=args.model_type,
        character_coverage=args.character_coverage,
        max_sentences=args.max_sentences,
        seed=args.seed,
        tokenizer=str(Path(args.tokenizer).resolve()) if args.tokenizer else None,
        eod_token=args.eod_token,
        tokens_per_shard=args.tokens_per_shard,
        docs_per_unit=args.docs_per_unit,
        unit_chars=args.unit_chars,
        workers=args.workers,
        resume=args.resume,
        overwrite=args.overwrite,
    )

    def go() -> int:
        corpus = corpus_from_args(args)
        out = pipeline.run(corpus, args.out, opts, ranks)
        if ranks.rank == 0:
            result = shards.ShardSet.open(out, verify=False)
            for split in result.splits():
                print(
                    f"{split}: {result.num_documents(split)} documents, "
                    f"{result.num_tokens(split):,} tokens "
                    f"in {len(result.tokens(split))} shard(s)"
                )
            print(f"wrote {out} (tokenizer {result.tokenizer_path.name}, vocab {result.vocab_size})")
        return 0

    return ranks_mod.run_guarded(ranks, go)


if __name__ == "__main__":  # `python -m data_prep.prep` (mpirun too); `lm prep` reports alike
    raise SystemExit(run_command(main))
