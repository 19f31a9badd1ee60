"""Corpus sources: the embedded demo corpus, local text files, and the train/val split.

A corpus is a list of documents (str). Each document later becomes one span of token ids
followed by an end-of-document token in the shards.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from lm.errors import UserError

# A WikiText article title: " = Title = " with single '=' (section headings use " = = ... = = ").
_ARTICLE_HEADING = re.compile(r"^ = [^=](?:.*[^=])? = $")


def embedded_corpus() -> list[str]:
    """The demo corpus: real English shipped with every Python, the pydoc help topics.

    About 80 documents and 0.5 MB of text, sorted by topic name so the order never varies.
    """
    from pydoc_data.topics import topics

    return [text.strip() for _, text in sorted(topics.items()) if text.strip()]


def _decode(path: Path, data: bytes) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not valid UTF-8 (bad byte 0x{data[e.start]:02x} at byte "
                        f"offset {e.start})") from None
    return text.removeprefix("\ufeff")  # a byte-order mark is not text


def split_articles(text: str) -> list[str]:
    """Split WikiText-style text into one document per ` = Title = ` article.

    Text before the first heading becomes a document of its own. Text without any heading
    is returned as one document. Documents are stripped; empty ones dropped.
    """
    # Split on "\n" only: str.splitlines would also split on form feeds and other
    # separators that are content here.
    docs: list[list[str]] = [[]]
    for line in text.split("\n"):
        if _ARTICLE_HEADING.match(line.rstrip("\r")) and any(s.strip() for s in docs[-1]):
            docs.append([])
        docs[-1].append(line)
    return [d for d in ("\n".join(chunk).strip() for chunk in docs) if d]


def read_text_files(paths: Iterable[str | os.PathLike]) -> list[str]:
    """Read UTF-8 text files: one document per file, or per article for WikiText-style files."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise UserError("no input files given")
    docs: list[str] = []
    for path in paths:
        if not path.exists():
            raise UserError(f"input file {path} does not exist")
        if not path.is_file():
            raise UserError(f"input {path} is not a regular file")
        docs.extend(split_articles(_decode(path, path.read_bytes())))
    if not docs:
        raise UserError(f"the input files contain no text: {', '.join(map(str, paths))}")
    return docs


def split_train_val(docs: Sequence[str], val_fraction: float,
                    seed: int = 0) -> tuple[list[str], list[str]]:
    """Deterministically hold out about val_fraction of the documents for validation.

    With two or more documents, each side gets at least one; a single document all goes
    to train. Both sides keep the corpus order.
    """
    if not 0 < val_fraction < 1:
        raise UserError(f"val fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if seed < 0:
        raise UserError(f"seed must be non-negative, got {seed}")
    n = len(docs)
    if n == 0:
        raise UserError("the corpus is empty: nothing to split into train and val")
    if n == 1:
        return [docs[0]], []
    n_val = min(max(round(n * val_fraction), 1), n - 1)
    held = set(np.random.default_rng(seed).permutation(n)[:n_val].tolist())
    train = [d for i, d in enumerate(docs) if i not in held]
    val = [d for i, d in enumerate(docs) if i in held]
    return train, val
