"""Writing token shards: documents into shard files, then the manifest that marks them complete."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import UserError
from data_prep.shards.format import (
    FORMAT,
    INDEX_DTYPE,
    MANIFEST,
    SPLIT_NAME,
    TOKENIZER_KINDS,
    VERSION,
    dtype_for_vocab,
    dtype_name,
    sha256_file,
    tmp_name,
)


class ShardWriter:
    """Appends documents of one split to `{split}-{i:05d}.bin/.idx` shard files.

    A shard is closed as soon as it holds at least `tokens_per_shard` tokens, so shards
    overshoot by less than one document. `close()` returns the manifest entries.
    Use as a context manager to remove half-written temp files if something fails.
    """

    def __init__(self, out_dir: str | os.PathLike, split: str, dtype: Any, tokens_per_shard: int, eod_id: int):
        if not SPLIT_NAME.match(split):
            raise UserError(f"split name {split!r} must be letters, digits or '_'")
        if tokens_per_shard < 1:
            raise UserError(f"tokens_per_shard must be positive, got {tokens_per_shard}")
        self.out_dir = Path(out_dir)
        self.split = split
        self.dtype = np.dtype(dtype).newbyteorder("<")
        dtype_name(self.dtype)  # validate early
        self.max_id = int(np.iinfo(self.dtype).max)
        if not 0 <= eod_id <= self.max_id:
            raise UserError(f"eod_id {eod_id} does not fit the token dtype {self.dtype}")
        self.tokens_per_shard = tokens_per_shard
        self.eod_id = eod_id
        self.entries: list[dict] = []
        self._file = None  # open temp .bin of the current shard, or None between shards
        self._hash = None
        self._offsets: list[int] = []
        self._closed = False

    def _shard_path(self, suffix: str) -> Path:
        return self.out_dir / f"{self.split}-{len(self.entries):05d}{suffix}"

    def _start_shard(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(tmp_name(self._shard_path(".bin")), "wb")
        self._hash = hashlib.sha256()
        self._offsets = [0]

    def add_document(self, ids: Sequence[int] | np.ndarray) -> None:
        """Append one document's token ids, followed by the eod token."""
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        if arr.size and (arr.min() < 0 or arr.max() > self.max_id):
            raise UserError(
                f"token id out of range for {self.dtype} in a {self.split} document (min {arr.min()}, max {arr.max()})"
            )
        if self._file is None:
            self._start_shard()
        data = np.append(arr, self.eod_id).astype(self.dtype).tobytes()
        self._file.write(data)
        self._hash.update(data)
        self._offsets.append(self._offsets[-1] + arr.size + 1)
        if self._offsets[-1] >= self.tokens_per_shard:
            self._finish_shard()

    def add_encoded(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append many documents at once: `tokens` already holds each document's ids followed
        by its eod, `lengths` the per-document token counts (eod included).

        Writes exactly the bytes that add_document would for the same documents (same shard
        boundaries), but in a few large writes, so assembling big corpora stays cheap.
        """
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
        tokens = np.asarray(tokens).reshape(-1)
        ends = np.cumsum(lengths)
        if lengths.size and (lengths.min() < 1 or ends[-1] != tokens.size):
            raise ValueError("lengths must be positive and sum to the number of tokens")
        if lengths.size and np.any(tokens[ends - 1] != self.eod_id):
            raise ValueError("every document must end with the eod token")
        if tokens.size and (tokens.min() < 0 or tokens.max() > self.max_id):
            raise UserError(
                f"token id out of range for {self.dtype} in a {self.split} document "
                f"(min {tokens.min()}, max {tokens.max()})"
            )
        first = 0  # index of the first document not yet written
        while first < lengths.size:
            if self._file is None:
                self._start_shard()
            base = ends[first - 1] if first else 0
            # Shard size after each remaining document; the first to reach the limit closes it.
            filled = self._offsets[-1] + (ends[first:] - base)
            full = int(np.searchsorted(filled, self.tokens_per_shard, side="left"))
            last = min(first + full, lengths.size - 1)  # last document going into this shard
            data = tokens[base : ends[last]].astype(self.dtype, copy=False).tobytes()
            self._file.write(data)
            self._hash.update(data)
            self._offsets.extend((self._offsets[-1] + ends[first : last + 1] - base).tolist())
            if self._offsets[-1] >= self.tokens_per_shard:
                self._finish_shard()
            first = last + 1

    def _finish_shard(self) -> None:
        bin_path, idx_path = self._shard_path(".bin"), self._shard_path(".idx")
        self._file.close()
        self._file = None
        index = np.asarray(self._offsets, dtype=INDEX_DTYPE).tobytes()
        with open(tmp_name(idx_path), "wb") as f:
            f.write(index)
        os.replace(tmp_name(bin_path), bin_path)
        os.replace(tmp_name(idx_path), idx_path)
        self.entries.append(
            {
                "file": bin_path.name,
                "index": idx_path.name,
                "tokens": self._offsets[-1],
                "documents": len(self._offsets) - 1,
                "sha256": self._hash.hexdigest(),
                "index_sha256": hashlib.sha256(index).hexdigest(),
            }
        )

    def close(self) -> list[dict]:
        """Finish the last shard; return the manifest entries of every shard written."""
        if not self._closed:
            if self._file is not None:
                self._finish_shard()
            self._closed = True
        return list(self.entries)

    def abort(self) -> None:
        """Drop the unfinished shard's temp file (finished shards stay)."""
        if self._file is not None:
            self._file.close()
            self._file = None
            tmp_name(self._shard_path(".bin")).unlink(missing_ok=True)
        self._closed = True

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_manifest(
    out_dir: str | os.PathLike,
    *,
    vocab_size: int,
    eod_id: int,
    pad_id: int,
    tokenizer_path: str | os.PathLike,
    splits: dict[str, list[dict]],
    extra: dict[str, Any] | None = None,
    tokenizer_kind: str = "sentencepiece",
) -> Path:
    """Write manifest.json atomically; call it after every ShardWriter is closed.

    `tokenizer_kind` says how to read the tokenizer file: one of TOKENIZER_KINDS. `extra` adds
    fields (e.g. how the data was prepared); it cannot replace the format's own.
    """
    out_dir = Path(out_dir)
    tokenizer_path = Path(tokenizer_path)
    if tokenizer_kind not in TOKENIZER_KINDS:
        raise ValueError(f"tokenizer kind must be one of {TOKENIZER_KINDS}, got {tokenizer_kind!r}")
    if not tokenizer_path.is_file():
        raise UserError(f"tokenizer model {tokenizer_path} does not exist")
    # Stored relative when it lives in the shard dir, so the directory can be moved as a whole.
    try:
        stored = tokenizer_path.resolve().relative_to(out_dir.resolve()).as_posix()
    except ValueError:
        stored = str(tokenizer_path.resolve())
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "dtype": dtype_name(dtype_for_vocab(vocab_size)),
        "vocab_size": int(vocab_size),
        "eod_id": int(eod_id),
        "pad_id": int(pad_id),
        "tokenizer": {"path": stored, "sha256": sha256_file(tokenizer_path), "kind": tokenizer_kind},
        "splits": {name: list(entries) for name, entries in splits.items()},
    }
    for key, value in (extra or {}).items():
        if key in manifest:
            raise ValueError(f"manifest field {key!r} is reserved")
        manifest[key] = value
    path = out_dir / MANIFEST
    tmp = tmp_name(path)
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, path)
    return path
