"""`lm prep`: train a sentencepiece tokenizer and write token shards, in parallel.

Documents are tokenised by a pool of worker processes, but results are consumed in corpus
order (ordered imap), so the shard bytes are the same for any number of workers.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
from pathlib import Path
from typing import Iterator, Sequence

from tqdm import tqdm

from data_prep.corpus import read_text_files, split_train_val
from data_prep.tokenizer import Tokenizer, train_sentencepiece
from lm import shards
from lm.errors import UserError

TOKENIZER_NAME = "tokenizer.model"
SPLITS = ("train", "val")
_CHUNKSIZE = 16  # documents per pool task: amortises inter-process traffic

_worker_tokenizer: Tokenizer | None = None  # each pool process loads the model once


def _init_worker(model_path: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer(model_path)


def _encode(doc: str) -> list[int]:
    return _worker_tokenizer.encode(doc)


def _encoded(docs: Sequence[str], tok: Tokenizer, pool) -> Iterator[list[int]]:
    """Token ids of each document, in corpus order."""
    if pool is None:
        return map(tok.encode, docs)
    return pool.imap(_encode, docs, chunksize=_CHUNKSIZE)


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse to write over an earlier prep unless asked to; never delete anything else."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"output path {out_dir} exists and is not a directory")
    if not out_dir.is_dir() or overwrite:
        return
    if (out_dir / shards.MANIFEST).exists():
        raise UserError(f"{out_dir} already holds token shards; pass --overwrite "
                        "(overwrite=True) to replace them")
    ours = [p.name for p in out_dir.iterdir() if p.name == TOKENIZER_NAME
            or (p.suffix in (".bin", ".idx") and p.stem.split("-")[0] in SPLITS)]
    if ours:
        raise UserError(f"{out_dir} already has files a prep would replace ({sorted(ours)[0]}, "
                        "...); pass --overwrite (overwrite=True) to replace them")


def _old_shard_files(out_dir: Path) -> set[str]:
    """Files named by an existing manifest, so an overwrite can remove the ones it orphans."""
    try:
        old = shards.ShardSet.open(out_dir, verify=False).manifest["splits"]
    except UserError:
        return set()
    return {e[key] for entries in old.values() for e in entries for key in ("file", "index")}


def prepare_shards(train_docs: Sequence[str], val_docs: Sequence[str],
                   out_dir: str | os.PathLike, *, vocab_size: int, workers: int = 1,
                   tokens_per_shard: int = 50_000_000, model_type: str = "bpe",
                   overwrite: bool = False, seed: int = 0,
                   max_sentences: int | None = None) -> Path:
    """Train `out_dir/tokenizer.model` on train_docs, then tokenise both splits into shards.

    Returns out_dir. The manifest is written last, so an interrupted run leaves no manifest.
    """
    out_dir = Path(out_dir)
    if not train_docs:
        raise UserError("no training documents to prepare")
    if workers < 1:
        raise UserError(f"workers must be at least 1, got {workers}")
    _check_out_dir(out_dir, overwrite)
    old_files = _old_shard_files(out_dir) if overwrite else set()
    # From here the old manifest no longer describes the directory: drop it first.
    (out_dir / shards.MANIFEST).unlink(missing_ok=True)

    model_path = train_sentencepiece(train_docs, out_dir / Path(TOKENIZER_NAME).stem, vocab_size,
                                     model_type=model_type, max_sentences=max_sentences,
                                     seed=seed)
    tok = Tokenizer(model_path)
    dtype = shards.dtype_for_vocab(tok.vocab_size)
    entries: dict[str, list[dict]] = {}
    pool = (multiprocessing.Pool(workers, initializer=_init_worker, initargs=(str(model_path),))
            if workers > 1 else None)
    try:
        for split, docs in zip(SPLITS, (train_docs, val_docs)):
            with shards.ShardWriter(out_dir, split, dtype, tokens_per_shard, tok.eod_id) as w:
                for ids in tqdm(_encoded(docs, tok, pool), total=len(docs),
                                desc=f"tokenising {split}", unit="doc", disable=None):
                    w.add_document(ids)
            entries[split] = w.close()
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    shards.write_manifest(out_dir, vocab_size=tok.vocab_size, eod_id=tok.eod_id,
                          pad_id=tok.pad_id, tokenizer_path=model_path, splits=entries)
    new_files = {e[key] for es in entries.values() for e in es for key in ("file", "index")}
    for name in old_files - new_files:
        (out_dir / name).unlink(missing_ok=True)
    return out_dir


def _positive_int(text: str) -> int:
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lm prep",
        description="Train a sentencepiece tokenizer on text files and write token shards "
                    "(manifest.json, tokenizer.model, {train,val}-NNNNN.bin/.idx) to --out.",
        epilog="Each input file is one document, unless it has WikiText-style ' = Title = ' "
               "lines, which start a new document each. The output does not depend on "
               "--workers.")
    p.add_argument("--input", nargs="+", required=True, metavar="FILE",
                   help="UTF-8 text files to read")
    p.add_argument("--out", required=True, metavar="DIR", help="output shard directory")
    p.add_argument("--vocab-size", type=_positive_int, default=8000, metavar="N",
                   help="tokenizer vocabulary size (default: %(default)s)")
    p.add_argument("--workers", type=_positive_int, default=1, metavar="N",
                   help="tokenising processes (default: %(default)s)")
    p.add_argument("--val-fraction", type=float, default=0.05, metavar="F",
                   help="fraction of documents held out for validation (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, metavar="S",
                   help="seed of the train/val split and tokenizer training (default: %(default)s)")
    p.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe",
                   help="sentencepiece model type (default: %(default)s)")
    p.add_argument("--tokens-per-shard", type=_positive_int, default=50_000_000, metavar="N",
                   help="start a new shard file after this many tokens (default: %(default)s)")
    p.add_argument("--max-sentences", type=_positive_int, default=None, metavar="N",
                   help="train the tokenizer on at most the first N lines (default: all)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the shards of an earlier prep in --out")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    docs = read_text_files(args.input)
    train_docs, val_docs = split_train_val(docs, args.val_fraction, args.seed)
    out = prepare_shards(train_docs, val_docs, args.out, vocab_size=args.vocab_size,
                         workers=args.workers, tokens_per_shard=args.tokens_per_shard,
                         model_type=args.model_type, overwrite=args.overwrite, seed=args.seed,
                         max_sentences=args.max_sentences)
    result = shards.ShardSet.open(out, verify=False)
    for split in result.splits():
        print(f"{split}: {result.num_documents(split)} documents, "
              f"{result.num_tokens(split):,} tokens in {len(result.tokens(split))} shard(s)")
    print(f"wrote {out} (tokenizer {result.tokenizer_path.name}, vocab {result.vocab_size})")
    return 0


if __name__ == "__main__":  # `python -m data_prep.prep`; `lm prep` reports errors the same way
    try:
        raise SystemExit(main())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
