"""Documents from text: the embedded demo corpus, UTF-8 lines, WikiText article splitting,
and the deterministic train/val split.

A document is a str; each becomes one span of token ids followed by an end-of-document
token in the shards. Readers stream (one line at a time) so corpora need not fit in memory.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from core.errors import UserError

# A WikiText article title: " = Title = " with single '=' (section headings use " = = ... = = ").
_ARTICLE_HEADING = re.compile(r"^ = [^=](?:.*[^=])? = $")


def embedded_corpus() -> list[str]:
    """The demo corpus: real English shipped with every Python, the pydoc help topics.

    About 80 documents and 0.5 MB of text, sorted by topic name so the order never varies.
    """
    from pydoc_data.topics import topics

    return [text.strip() for _, text in sorted(topics.items()) if text.strip()]


def _decode(path: Path, data: bytes, offset: int = 0) -> str:
    """UTF-8 text of `data`, which starts at byte `offset` of `path` (for the error line)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(
            f"{path} is not valid UTF-8 (bad byte 0x{data[e.start]:02x} at byte offset {offset + e.start})"
        ) from None


def iter_file_lines(path: str | os.PathLike) -> Iterator[str]:
    """The lines of a UTF-8 file without their "\n", read one at a time.

    Binary reading splits on "\n" only: str.splitlines would also split on form feeds and
    other separators that are content here. A leading byte-order mark is dropped.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"input file {path} does not exist")
    if not path.is_file():
        raise UserError(f"input {path} is not a regular file")
    offset = 0
    with open(path, "rb") as f:
        for raw in f:
            line = _decode(path, raw, offset)
            if offset == 0:
                line = line.removeprefix("\ufeff")  # a byte-order mark is not text
            offset += len(raw)
            yield line.removesuffix("\n")


def iter_articles(lines: Iterable[str]) -> Iterator[str]:
    """Group WikiText-style lines into one document per ` = Title = ` article, streaming.

    Section headings (` = = Section = = `) stay inside their article. Text before the first
    heading is a document of its own; text without any heading is one document. Documents
    are stripped and empty ones dropped.
    """
    chunk: list[str] = []
    has_text = False
    for line in lines:
        if has_text and _ARTICLE_HEADING.match(line.rstrip("\r")):
            doc = "\n".join(chunk).strip()
            if doc:
                yield doc
            chunk, has_text = [], False
        chunk.append(line)
        has_text = has_text or bool(line.strip())
    doc = "\n".join(chunk).strip()
    if doc:
        yield doc


def split_articles(text: str) -> list[str]:
    """`iter_articles` over a whole text held in memory."""
    return list(iter_articles(text.split("\n")))


def read_text_files(paths: Iterable[str | os.PathLike]) -> list[str]:
    """Read UTF-8 text files: one document per file, or per article for WikiText-style files."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise UserError("no input files given")
    docs: list[str] = []
    for path in paths:
        docs.extend(iter_articles(iter_file_lines(path)))
    if not docs:
        raise UserError(f"the input files contain no text: {', '.join(map(str, paths))}")
    return docs


def held_out_indices(n: int, val_fraction: float, seed: int = 0) -> set[int]:
    """Indices of the documents `split_train_val` holds out of n for validation."""
    if not 0 < val_fraction < 1:
        raise UserError(f"val fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if seed < 0:
        raise UserError(f"seed must be non-negative, got {seed}")
    if n == 0:
        raise UserError("the corpus is empty: nothing to split into train and val")
    if n == 1:
        return set()
    n_val = min(max(round(n * val_fraction), 1), n - 1)
    return set(np.random.default_rng(seed).permutation(n)[:n_val].tolist())


def split_train_val(docs: Sequence[str], val_fraction: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """Deterministically hold out about val_fraction of the documents for validation.

    With two or more documents, each side gets at least one; a single document all goes
    to train. Both sides keep the corpus order.
    """
    held = held_out_indices(len(docs), val_fraction, seed)
    train = [d for i, d in enumerate(docs) if i not in held]
    val = [d for i, d in enumerate(docs) if i in held]
    return train, val
