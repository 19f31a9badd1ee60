"""Token shards: the one on-disk format between data preparation and training.

A shard directory holds

    manifest.json          what is here: format version, vocab, tokenizer checksum, shard list
    train-00000.bin        flat little-endian token ids (uint16 if the vocab fits, else uint32)
    train-00000.idx        little-endian uint64 document start offsets, documents + 1 entries
    ...                    (the last entry is the shard's token count)
    val-00000.bin / .idx

Every document is followed by one end-of-document (eod) token, counted in its span, so
document d of a shard is tokens[idx[d]:idx[d + 1]] and its last token is eod. Documents are
never split across shards. Files are written under a temporary name and renamed into place
when complete, and the manifest is written last: a directory with a manifest is complete.

This module is the only place that writes or reads the format.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from core.errors import UserError

FORMAT = "twicing-lm-shards"
VERSION = 1
MANIFEST = "manifest.json"
INDEX_DTYPE = np.dtype("<u8")
_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9_]+$")


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """The smallest little-endian unsigned dtype that holds every id of the vocabulary."""
    if vocab_size < 1:
        raise UserError(f"vocab_size must be positive, got {vocab_size}")
    if vocab_size <= 1 << 16:
        return _DTYPES["uint16"]
    if vocab_size <= 1 << 32:
        return _DTYPES["uint32"]
    raise UserError(f"vocab_size {vocab_size} does not fit in uint32 token files")


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks so large shards do not need to fit in memory."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()


def _dtype_name(dtype: np.dtype) -> str:
    for name, dt in _DTYPES.items():
        if np.dtype(dtype).newbyteorder("<") == dt:
            return name
    raise ValueError(f"token dtype must be uint16 or uint32, got {np.dtype(dtype)}")


def _tmp_name(final: Path) -> Path:
    # Same directory, so os.replace is an atomic rename; a leading dot keeps it out of globs.
    return final.with_name(f".{final.name}.tmp-{os.getpid()}")


class ShardWriter:
    """Appends documents of one split to `{split}-{i:05d}.bin/.idx` shard files.

    A shard is closed as soon as it holds at least `tokens_per_shard` tokens, so shards
    overshoot by less than one document. `close()` returns the manifest entries.
    Use as a context manager to remove half-written temp files if something fails.
    """

    def __init__(self, out_dir: str | os.PathLike, split: str, dtype: Any,
                 tokens_per_shard: int, eod_id: int):
        if not _SPLIT_NAME.match(split):
            raise UserError(f"split name {split!r} must be letters, digits or '_'")
        if tokens_per_shard < 1:
            raise UserError(f"tokens_per_shard must be positive, got {tokens_per_shard}")
        self.out_dir = Path(out_dir)
        self.split = split
        self.dtype = np.dtype(dtype).newbyteorder("<")
        _dtype_name(self.dtype)  # validate early
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
        self._file = open(_tmp_name(self._shard_path(".bin")), "wb")
        self._hash = hashlib.sha256()
        self._offsets = [0]

    def add_document(self, ids: Sequence[int] | np.ndarray) -> None:
        """Append one document's token ids, followed by the eod token."""
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        if arr.size and (arr.min() < 0 or arr.max() > self.max_id):
            raise UserError(f"token id out of range for {self.dtype} in a {self.split} document "
                            f"(min {arr.min()}, max {arr.max()})")
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
            raise UserError(f"token id out of range for {self.dtype} in a {self.split} document "
                            f"(min {tokens.min()}, max {tokens.max()})")
        first = 0  # index of the first document not yet written
        while first < lengths.size:
            if self._file is None:
                self._start_shard()
            base = ends[first - 1] if first else 0
            # Shard size after each remaining document; the first to reach the limit closes it.
            filled = self._offsets[-1] + (ends[first:] - base)
            full = int(np.searchsorted(filled, self.tokens_per_shard, side="left"))
            last = min(first + full, lengths.size - 1)  # last document going into this shard
            data = tokens[base:ends[last]].astype(self.dtype, copy=False).tobytes()
            self._file.write(data)
            self._hash.update(data)
            self._offsets.extend((self._offsets[-1] + ends[first:last + 1] - base).tolist())
            if self._offsets[-1] >= self.tokens_per_shard:
                self._finish_shard()
            first = last + 1

    def _finish_shard(self) -> None:
        bin_path, idx_path = self._shard_path(".bin"), self._shard_path(".idx")
        self._file.close()
        self._file = None
        index = np.asarray(self._offsets, dtype=INDEX_DTYPE).tobytes()
        with open(_tmp_name(idx_path), "wb") as f:
            f.write(index)
        os.replace(_tmp_name(bin_path), bin_path)
        os.replace(_tmp_name(idx_path), idx_path)
        self.entries.append({
            "file": bin_path.name,
            "index": idx_path.name,
            "tokens": self._offsets[-1],
            "documents": len(self._offsets) - 1,
            "sha256": self._hash.hexdigest(),
            "index_sha256": hashlib.sha256(index).hexdigest(),
        })

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
            _tmp_name(self._shard_path(".bin")).unlink(missing_ok=True)
        self._closed = True

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_manifest(out_dir: str | os.PathLike, *, vocab_size: int, eod_id: int, pad_id: int,
                   tokenizer_path: str | os.PathLike, splits: dict[str, list[dict]],
                   extra: dict[str, Any] | None = None) -> Path:
    """Write manifest.json atomically; call it after every ShardWriter is closed.

    `extra` adds fields (e.g. how the data was prepared); it cannot replace the format's own.
    """
    out_dir = Path(out_dir)
    tokenizer_path = Path(tokenizer_path)
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
        "dtype": _dtype_name(dtype_for_vocab(vocab_size)),
        "vocab_size": int(vocab_size),
        "eod_id": int(eod_id),
        "pad_id": int(pad_id),
        "tokenizer": {"path": stored, "sha256": sha256_file(tokenizer_path)},
        "splits": {name: list(entries) for name, entries in splits.items()},
    }
    for key, value in (extra or {}).items():
        if key in manifest:
            raise ValueError(f"manifest field {key!r} is reserved")
        manifest[key] = value
    path = out_dir / MANIFEST
    tmp = _tmp_name(path)
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, path)
    return path


class ShardSet:
    """A validated, read-only view of a shard directory. Build it with `ShardSet.open`."""

    def __init__(self, path: Path, manifest: dict, offsets: dict[str, list[np.ndarray]]):
        self.path = path
        self.manifest = manifest
        self.vocab_size: int = manifest["vocab_size"]
        self.eod_id: int = manifest["eod_id"]
        self.pad_id: int = manifest["pad_id"]
        self.dtype: np.dtype = _DTYPES[manifest["dtype"]]
        self.tokenizer_path: Path = (path / manifest["tokenizer"]["path"]).resolve()
        self._offsets = offsets
        self._tokens: dict[str, list[np.memmap]] = {}

    @classmethod
    def open(cls, path: str | os.PathLike, verify: bool = True) -> "ShardSet":
        """Read and check a shard directory; with `verify`, also check every sha256."""
        path = Path(path).resolve()
        if not path.is_dir():
            raise UserError(f"token shard directory {path} does not exist")
        manifest = _read_manifest(path / MANIFEST)
        dtype = _DTYPES[manifest["dtype"]]
        offsets = {split: [_check_shard(path, split, e, dtype, manifest["eod_id"], verify)
                           for e in entries]
                   for split, entries in manifest["splits"].items()}
        shards = cls(path, manifest, offsets)
        tok = shards.tokenizer_path
        if verify and tok.is_file() and sha256_file(tok) != manifest["tokenizer"]["sha256"]:
            raise UserError(f"tokenizer {tok} does not match the checksum in {path / MANIFEST} "
                            "(the shards were made with a different tokenizer)")
        return shards

    def splits(self) -> list[str]:
        return list(self.manifest["splits"])

    def _entries(self, split: str) -> list[dict]:
        if split not in self.manifest["splits"]:
            raise UserError(f"no split {split!r} in {self.path}; "
                            f"available: {', '.join(self.splits()) or '(none)'}")
        return self.manifest["splits"][split]

    def tokens(self, split: str) -> list[np.memmap]:
        """One read-only memmap per shard file of the split, in order."""
        entries = self._entries(split)
        if split not in self._tokens:
            self._tokens[split] = [np.memmap(self.path / e["file"], dtype=self.dtype, mode="r",
                                             shape=(e["tokens"],)) for e in entries]
        return self._tokens[split]

    def document_offsets(self, split: str) -> list[np.ndarray]:
        """Per shard, int64 document start offsets (documents + 1 entries, last = tokens)."""
        self._entries(split)
        return self._offsets[split]

    def num_tokens(self, split: str) -> int:
        return sum(e["tokens"] for e in self._entries(split))

    def num_documents(self, split: str) -> int:
        return sum(e["documents"] for e in self._entries(split))


def _read_manifest(mpath: Path) -> dict:
    if not mpath.is_file():
        raise UserError(f"no {MANIFEST} in {mpath.parent}: not a token shard directory "
                        "(make one with `lm prep`)")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{mpath} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{mpath} is not a {FORMAT} manifest")
    if manifest.get("version") != VERSION:
        raise UserError(f"{mpath} has format version {manifest.get('version')!r}; "
                        f"this code reads version {VERSION}")
    for key, kind in [("dtype", str), ("vocab_size", int), ("eod_id", int), ("pad_id", int),
                      ("tokenizer", dict), ("splits", dict)]:
        if not isinstance(manifest.get(key), kind):
            raise UserError(f"{mpath}: field {key!r} is missing or not a {kind.__name__}")
    if manifest["dtype"] not in _DTYPES:
        raise UserError(f"{mpath}: dtype {manifest['dtype']!r} is not uint16 or uint32")
    vocab = manifest["vocab_size"]
    if not 0 < vocab <= int(np.iinfo(_DTYPES[manifest["dtype"]]).max) + 1:
        raise UserError(f"{mpath}: vocab_size {vocab} does not fit dtype {manifest['dtype']}")
    for key in ("eod_id", "pad_id"):
        if not 0 <= manifest[key] < vocab:
            raise UserError(f"{mpath}: {key} {manifest[key]} is outside the vocabulary of {vocab}")
    if not all(isinstance(manifest["tokenizer"].get(k), str) for k in ("path", "sha256")):
        raise UserError(f"{mpath}: tokenizer needs string fields 'path' and 'sha256'")
    for split, entries in manifest["splits"].items():
        if not isinstance(entries, list):
            raise UserError(f"{mpath}: split {split!r} is not a list of shards")
        for e in entries:
            _check_entry_fields(mpath, split, e)
    return manifest


def _check_entry_fields(mpath: Path, split: str, e: Any) -> None:
    fields = [("file", str), ("index", str), ("tokens", int), ("documents", int),
              ("sha256", str), ("index_sha256", str)]
    if not isinstance(e, dict) or not all(isinstance(e.get(k), t) for k, t in fields):
        raise UserError(f"{mpath}: a {split!r} shard entry lacks one of "
                        f"{', '.join(k for k, _ in fields)}")
    for key in ("file", "index"):
        # Plain names only: a manifest must not point outside its directory.
        if Path(e[key]).name != e[key] or e[key] in ("", ".", ".."):
            raise UserError(f"{mpath}: shard {key} {e[key]!r} must be a plain file name")
    if e["documents"] < 1 or e["tokens"] < e["documents"]:
        raise UserError(f"{mpath}: shard {e['file']} has {e['documents']} documents and "
                        f"{e['tokens']} tokens; expected at least one token per document")


def _check_shard(root: Path, split: str, e: dict, dtype: np.dtype, eod_id: int,
                 verify: bool) -> np.ndarray:
    """Check one shard's files against its manifest entry; return its document offsets."""
    bin_path, idx_path = root / e["file"], root / e["index"]
    for p in (bin_path, idx_path):
        if not p.is_file():
            raise UserError(f"shard file {p} listed in {root / MANIFEST} is missing")
    want = e["tokens"] * dtype.itemsize
    if bin_path.stat().st_size != want:
        raise UserError(f"shard file {bin_path} has {bin_path.stat().st_size} bytes, expected "
                        f"{want} ({e['tokens']} tokens); it is truncated or corrupt")
    want = (e["documents"] + 1) * INDEX_DTYPE.itemsize
    if idx_path.stat().st_size != want:
        raise UserError(f"index file {idx_path} has {idx_path.stat().st_size} bytes, expected "
                        f"{want} ({e['documents']} documents); it is truncated or corrupt")
    if verify:
        for p, key in ((bin_path, "sha256"), (idx_path, "index_sha256")):
            if sha256_file(p) != e[key]:
                raise UserError(f"shard file {p} does not match its sha256 in {root / MANIFEST} "
                                "(the file is corrupt or was changed)")
    offsets = np.fromfile(idx_path, dtype=INDEX_DTYPE).astype(np.int64)
    if offsets[0] != 0 or offsets[-1] != e["tokens"] or np.any(np.diff(offsets) < 1):
        raise UserError(f"index file {idx_path} is inconsistent: offsets must rise from 0 to "
                        f"{e['tokens']} by at least one token per document")
    # Each document ends with eod: a cheap check that index and tokens belong together.
    tokens = np.memmap(bin_path, dtype=dtype, mode="r", shape=(e["tokens"],))
    if np.any(tokens[offsets[1:] - 1] != eod_id):
        raise UserError(f"index file {idx_path} is inconsistent with {bin_path}: "
                        f"a document does not end with the eod token {eod_id}")
    return offsets
