"""Tokens/s of the prep pipeline (1 and 2 workers) next to a bare sentencepiece encode loop.

    .venv/bin/python benchmarks/prep_throughput.py [--mb 8] [--workers 1 2]

The corpus is the embedded corpus (Python's help topics) repeated to about --mb megabytes,
one document per paragraph group. The tokenizer is trained once, outside the timings; the
pipeline runs use it (`--tokenizer`), so they time what scales with the corpus: streaming
the documents, tokenising the work units, writing and checksumming part files, joining
them into shards. The bare loop is `sp.encode(doc)` over the same documents in this
process. Goal: pipeline >= 0.8 x workers x bare (bounded by the free cores). Each figure
is the best of --repeats runs, interleaved, since a shared machine's speed drifts.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data_prep import pipeline, sources  # noqa: E402
from data_prep.corpus import embedded_corpus  # noqa: E402
from data_prep.shards import ShardSet  # noqa: E402
from data_prep.tokenizer import Tokenizer, train_sentencepiece  # noqa: E402


def make_docs(megabytes: float) -> list[str]:
    """Documents of a few paragraphs each, repeated until the corpus holds ~megabytes."""
    paragraphs = [p for d in embedded_corpus() for p in d.split("\n\n") if p.strip()]
    base = ["\n\n".join(paragraphs[i : i + 4]) for i in range(0, len(paragraphs), 4)]
    docs: list[str] = []
    size, target = 0, megabytes * 1e6
    while size < target:
        for d in base:
            docs.append(d)
            size += len(d.encode())
            if size >= target:
                break
    return docs


def bare_rate(tok: Tokenizer, docs: list[str]) -> tuple[float, int]:
    start = time.perf_counter()
    n = sum(len(tok.sp.encode(d, out_type=int)) + 1 for d in docs)  # +1: the eod per document
    return n / (time.perf_counter() - start), n


def pipeline_rate(model: Path, docs: list[str], workers: int, tmp: Path) -> tuple[float, int]:
    opts = pipeline.PrepOptions(tokenizer=str(model), workers=workers, docs_per_unit=256, tokens_per_shard=1 << 22)
    out = tmp / f"w{workers}"
    start = time.perf_counter()
    pipeline.run(sources.list_corpus(docs, []), out, opts)
    seconds = time.perf_counter() - start
    n = ShardSet.open(out, verify=False).num_tokens("train")
    return n / seconds, n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=float, default=8.0, help="corpus size in MB (default 8)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--repeats", type=int, default=3, help="best of this many runs (default 3)")
    args = p.parse_args()
    docs = make_docs(args.mb)
    mb = sum(len(d.encode()) for d in docs) / 1e6
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model = train_sentencepiece(embedded_corpus(), tmp / "sp", args.vocab_size)
        tok = Tokenizer(model)
        best = {"bare": 0.0, **{w: 0.0 for w in args.workers}}
        for r in range(args.repeats):
            bare, n_bare = bare_rate(tok, docs)
            best["bare"] = max(best["bare"], bare)
            for w in args.workers:
                rate, n = pipeline_rate(model, docs, w, tmp / f"r{r}")
                assert n == n_bare, (n, n_bare)
                best[w] = max(best[w], rate)
        print(
            f"corpus: {len(docs):,} documents, {mb:.1f} MB, {n_bare:,} tokens; "
            f"{os.cpu_count()} CPU cores; vocab {tok.vocab_size}; best of {args.repeats}"
        )
        print(f"{'run':<24}{'tokens/s':>12}{'x bare':>9}{'goal':>7}")
        print(f"{'bare sp.encode loop':<24}{best['bare']:>12,.0f}{1.0:>9.2f}{'':>7}")
        for w in args.workers:
            print(f"{f'pipeline, {w} worker(s)':<24}{best[w]:>12,.0f}{best[w] / best['bare']:>9.2f}{0.8 * w:>7.1f}")


if __name__ == "__main__":
    main()
