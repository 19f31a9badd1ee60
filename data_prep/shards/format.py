"""The shard format's constants and the helpers both sides of it use."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import numpy as np

from core.errors import UserError

FORMAT = "twicing-lm-shards"
VERSION = 1
MANIFEST = "manifest.json"
INDEX_DTYPE = np.dtype("<u8")
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
SPLIT_NAME = re.compile(r"^[A-Za-z0-9_]+$")
# How to read the tokenizer file (manifest "tokenizer"."kind"); manifests without the field
# predate Hugging Face tokenizers and are sentencepiece.
TOKENIZER_KINDS = ("sentencepiece", "hf-tokenizers")


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """The smallest little-endian unsigned dtype that holds every id of the vocabulary."""
    if vocab_size < 1:
        raise UserError(f"vocab_size must be positive, got {vocab_size}")
    if vocab_size <= 1 << 16:
        return DTYPES["uint16"]
    if vocab_size <= 1 << 32:
        return DTYPES["uint32"]
    raise UserError(f"vocab_size {vocab_size} does not fit in uint32 token files")


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks so large shards do not need to fit in memory."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()


def dtype_name(dtype: np.dtype) -> str:
    for name, dt in DTYPES.items():
        if np.dtype(dtype).newbyteorder("<") == dt:
            return name
    raise ValueError(f"token dtype must be uint16 or uint32, got {np.dtype(dtype)}")


def tmp_name(final: Path) -> Path:
    # Same directory, so os.replace is an atomic rename; a leading dot keeps it out of globs.
    return final.with_name(f".{final.name}.tmp-{os.getpid()}")
