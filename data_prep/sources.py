"""Corpus sources: where documents come from, as restartable streams, one per split.

A `Corpus` maps split names ("train", "val", maybe "test") to *document streams*: functions
that return a fresh iterator over that split's documents, in a fixed order. Prep reads a
split more than once (tokenizer training, then tokenisation, on every MPI rank), and never
needs the whole corpus in memory.

Sources:
- local files (`text_files`): plain UTF-8 text (one document per file, or per article when
  it has WikiText-style ` = Title = ` headings), jsonl (one document per line's text field),
  parquet and arrow (one document per row), given as paths or globs;
- any Hugging Face dataset by name (`hf_corpus`), through `datasets`, imported lazily so
  training never needs it;
- lists already in memory (`list_corpus`, for `prepare_shards` and the demo).
WikiText-103 builds on these in `data_prep.wikitext`.

Local parquet/arrow files and hub datasets are read by the same function (`hf_rows`), the
only difference being the `load_dataset` arguments: a builder name and `data_files` for
local files (streamed straight from them, no cache copy) or the hub name and config.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import UserError
from data_prep.corpus import held_out_indices, iter_articles, iter_file_lines

DocStream = Callable[[], Iterator[str]]
HF_BUILDERS = {".parquet": "parquet", ".arrow": "arrow"}  # datasets' packaged file readers
JSONL_SUFFIXES = (".jsonl", ".json")
_HF_BATCH = 1000  # rows per batch when iterating a dataset: amortises Arrow -> Python


@dataclass
class Corpus:
    """The documents of each split, plus what identifies them (for resuming safely)."""

    splits: dict[str, DocStream]
    description: dict[str, Any]
    prepare: Callable[[], None] = field(default=lambda: None)  # e.g. download, on one rank

    def documents(self, split: str) -> Iterator[str]:
        return self.splits[split]()


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# ---- local files ---------------------------------------------------------------------------


def expand_paths(patterns: Sequence[str | os.PathLike]) -> list[Path]:
    """Paths and globs -> files, in the order given (each glob sorted). Refuses no match."""
    if not patterns:
        raise UserError("no input files given")
    paths: list[Path] = []
    for pattern in map(str, patterns):
        if glob.has_magic(pattern) and not Path(pattern).exists():
            matches = sorted(glob.glob(pattern, recursive=True))
            if not matches:
                raise UserError(f"no files match {pattern!r}")
            paths.extend(Path(m) for m in matches)
            continue
        path = Path(pattern)
        if not path.exists():
            raise UserError(f"input file {path} does not exist")
        if not path.is_file():
            raise UserError(f"input {path} is not a regular file")
        paths.append(path)
    return paths


def file_fingerprint(paths: Iterable[Path]) -> list[dict]:
    """Name, size and modification time of each file: a changed input voids a resume."""
    out = []
    for p in paths:
        st = p.stat()
        out.append({"path": str(p.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


def jsonl_rows(path: Path, field_name: str) -> Iterator[str]:
    """The `field_name` string of each JSON object in a jsonl file (blank lines skipped)."""
    for number, line in enumerate(iter_file_lines(path), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path} line {number} is not valid JSON: {e.msg}") from None
        if not isinstance(row, dict):
            raise UserError(f"{path} line {number} is not a JSON object")
        if field_name not in row:
            raise UserError(
                f"{path} line {number} has no field {field_name!r} "
                f"(fields: {', '.join(row) or 'none'}); choose one with --text-field"
            )
        value = row[field_name]
        if not isinstance(value, str):
            raise UserError(f"{path} line {number}: field {field_name!r} is {type(value).__name__}, not text")
        yield value


def _documents_of_file(path: Path, field_name: str) -> Iterator[str]:
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        rows: Iterable[str] = jsonl_rows(path, field_name)
    elif suffix in HF_BUILDERS:
        rows = hf_rows(HF_BUILDERS[suffix], field_name, data_files=[str(path)], what=str(path))
    else:
        yield from iter_articles(iter_file_lines(path))
        return
    # One document per row; rows of only whitespace carry no text.
    yield from (row for row in rows if row.strip())


def text_files(patterns: Sequence[str | os.PathLike], field_name: str = "text") -> DocStream:
    """Documents of local files (text, jsonl, parquet, arrow) in the order given."""
    paths = expand_paths(patterns)

    def stream() -> Iterator[str]:
        empty = True
        for path in paths:
            for doc in _documents_of_file(path, field_name):
                empty = False
                yield doc
        if empty:
            raise UserError(f"the input files contain no text: {', '.join(map(str, paths))}")

    stream.paths = paths  # type: ignore[attr-defined]
    return stream


# ---- Hugging Face datasets -----------------------------------------------------------------


def _datasets():
    try:
        import datasets
    except ImportError:
        raise UserError(
            "reading Hugging Face datasets (or parquet/arrow files) needs the `datasets` package: pip install datasets"
        ) from None
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()  # our own tqdm bar reports progress
    return datasets


def hf_rows(
    path: str,
    field_name: str,
    *,
    config: str | None = None,
    data_files: Sequence[str] | None = None,
    split: str = "train",
    streaming: bool | None = None,
    what: str | None = None,
) -> Iterator[str]:
    """The `field_name` column of a dataset, row by row: `load_dataset(path, config, ...)`.

    The one reader for hub datasets (`path` = "Salesforce/wikitext") and local dumps
    (`path` = "parquet"/"arrow"/"json" with `data_files`). Local files are streamed from
    where they are; hub datasets are downloaded once into the datasets cache (memory-mapped,
    so iterating does not load them into memory) unless `streaming` is set.
    """
    ds_lib = _datasets()
    what = what or f"dataset {path!r}" + (f" (config {config!r})" if config else "")
    if streaming is None:
        streaming = data_files is not None
    files = {split: list(data_files)} if data_files is not None else None
    try:
        ds = ds_lib.load_dataset(path, config, data_files=files, split=split, streaming=streaming)
    except Exception as e:  # datasets raises many types (network, config, split, file errors)
        raise UserError(f"could not load {what}, split {split!r}: {_one_line(e)}") from None
    columns = ds.column_names
    if columns is not None and field_name not in columns:
        raise UserError(
            f"{what} has no field {field_name!r} (fields: {', '.join(columns)}); choose one with --text-field"
        )
    try:
        for batch in ds.iter(batch_size=_HF_BATCH):
            if field_name not in batch:
                raise UserError(
                    f"{what} has no field {field_name!r} (fields: {', '.join(batch)}); choose one with --text-field"
                )
            for value in batch[field_name]:
                if not isinstance(value, str):
                    raise UserError(f"{what}: field {field_name!r} holds {type(value).__name__}, not text")
                yield value
    except (UserError, GeneratorExit):
        raise
    except Exception as e:  # a corrupt or unreadable file surfaces while iterating
        raise UserError(f"could not read {what}: {_one_line(e)}") from None


def hf_corpus(
    name: str,
    field_name: str,
    *,
    config: str | None = None,
    split: str = "train",
    val_split: str | None = None,
    val_fraction: float = 0.05,
    seed: int = 0,
    streaming: bool = False,
) -> Corpus:
    """Any hub dataset: one document per row of `field_name`.

    With `val_split` that split becomes "val"; otherwise val is carved out of `split`.
    """

    def rows(s: str) -> DocStream:
        return lambda: (r for r in hf_rows(name, field_name, config=config, split=s, streaming=streaming) if r.strip())

    description = {
        "source": "hf",
        "name": name,
        "config": config,
        "split": split,
        "val_split": val_split,
        "field": field_name,
        "val_fraction": val_fraction,
        "seed": seed,
    }

    def prepare() -> None:  # one rank downloads; the others then find it in the cache
        if not streaming:
            next(iter(rows(split)()), None)

    if val_split:
        return Corpus({"train": rows(split), "val": rows(val_split)}, description, prepare)
    train, val = carve_val(rows(split), val_fraction, seed)
    return Corpus({"train": train, "val": val}, description, prepare)


# ---- in memory, and carving a val split ----------------------------------------------------


def list_corpus(train_docs: Sequence[str], val_docs: Sequence[str]) -> Corpus:
    """Documents already in memory (the Python API and the demo)."""
    splits = {"train": lambda: iter(train_docs), "val": lambda: iter(val_docs)}
    return Corpus(splits, {"source": "memory", "train_documents": len(train_docs), "val_documents": len(val_docs)})


def carve_val(stream: DocStream, val_fraction: float, seed: int) -> tuple[DocStream, DocStream]:
    """Split one stream into train and val exactly as `split_train_val` splits a list.

    The held-out indices need the document count, so the first use counts the documents
    (one extra streaming pass); the indices are then kept, not the documents.
    """
    held: list[set[int]] = []

    def held_out() -> set[int]:
        if not held:
            n = sum(1 for _ in stream())
            if n == 0:
                raise UserError("the corpus is empty: no documents to prepare")
            held.append(held_out_indices(n, val_fraction, seed))
        return held[0]

    def side(keep_held: bool) -> DocStream:
        def docs() -> Iterator[str]:
            h = held_out()
            return (d for i, d in enumerate(stream()) if (i in h) == keep_held)

        return docs

    return side(False), side(True)


def files_corpus(
    patterns: Sequence[str | os.PathLike], field_name: str = "text", val_fraction: float = 0.05, seed: int = 0
) -> Corpus:
    """`lm prep --input`: local files, with val carved out by `val_fraction`."""
    stream = text_files(patterns, field_name)
    train, val = carve_val(stream, val_fraction, seed)
    description = {
        "source": "files",
        "files": file_fingerprint(stream.paths),  # type: ignore
        "field": field_name,
        "val_fraction": val_fraction,
        "seed": seed,
    }
    return Corpus({"train": train, "val": val}, description)
