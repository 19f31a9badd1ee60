"""Reading token shards: a validated, read-only view of a shard directory."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import UserError
from data_prep.shards.format import (
    DTYPES,
    FORMAT,
    INDEX_DTYPE,
    MANIFEST,
    TOKENIZER_KINDS,
    VERSION,
    sha256_file,
)


class ShardSet:
    """A validated, read-only view of a shard directory. Build it with `ShardSet.open`."""

    def __init__(self, path: Path, manifest: dict, offsets: dict[str, list[np.ndarray]]):
        self.path = path
        self.manifest = manifest
        self.vocab_size: int = manifest["vocab_size"]
        self.eod_id: int = manifest["eod_id"]
        self.pad_id: int = manifest["pad_id"]
        self.dtype: np.dtype = DTYPES[manifest["dtype"]]
        self.tokenizer_path: Path = (path / manifest["tokenizer"]["path"]).resolve()
        self.tokenizer_kind: str = manifest["tokenizer"].get("kind", TOKENIZER_KINDS[0])
        self._offsets = offsets
        self._tokens: dict[str, list[np.memmap]] = {}

    @classmethod
    def open(cls, path: str | os.PathLike, verify: bool = True) -> ShardSet:
        """Read and check a shard directory; with `verify`, also check every sha256."""
        path = Path(path).resolve()
        if not path.is_dir():
            raise UserError(f"token shard directory {path} does not exist")
        manifest = _read_manifest(path / MANIFEST)
        dtype = DTYPES[manifest["dtype"]]
        offsets = {
            split: [_check_shard(path, split, e, dtype, manifest["eod_id"], verify) for e in entries]
            for split, entries in manifest["splits"].items()
        }
        shards = cls(path, manifest, offsets)
        tok = shards.tokenizer_path
        if verify and tok.is_file() and sha256_file(tok) != manifest["tokenizer"]["sha256"]:
            raise UserError(
                f"tokenizer {tok} does not match the checksum in {path / MANIFEST} "
                "(the shards were made with a different tokenizer)"
            )
        return shards

    def splits(self) -> list[str]:
        return list(self.manifest["splits"])

    def _entries(self, split: str) -> list[dict]:
        if split not in self.manifest["splits"]:
            raise UserError(f"no split {split!r} in {self.path}; available: {', '.join(self.splits()) or '(none)'}")
        return self.manifest["splits"][split]

    def tokens(self, split: str) -> list[np.memmap]:
        """One read-only memmap per shard file of the split, in order."""
        entries = self._entries(split)
        if split not in self._tokens:
            self._tokens[split] = [
                np.memmap(self.path / e["file"], dtype=self.dtype, mode="r", shape=(e["tokens"],)) for e in entries
            ]
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
        raise UserError(f"no {MANIFEST} in {mpath.parent}: not a token shard directory (make one with `lm prep`)")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{mpath} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{mpath} is not a {FORMAT} manifest")
    if manifest.get("version") != VERSION:
        raise UserError(f"{mpath} has format version {manifest.get('version')!r}; this code reads version {VERSION}")
    for key, kind in [
        ("dtype", str),
        ("vocab_size", int),
        ("eod_id", int),
        ("pad_id", int),
        ("tokenizer", dict),
        ("splits", dict),
    ]:
        if not isinstance(manifest.get(key), kind):
            raise UserError(f"{mpath}: field {key!r} is missing or not a {kind.__name__}")
    if manifest["dtype"] not in DTYPES:
        raise UserError(f"{mpath}: dtype {manifest['dtype']!r} is not uint16 or uint32")
    vocab = manifest["vocab_size"]
    if not 0 < vocab <= int(np.iinfo(DTYPES[manifest["dtype"]]).max) + 1:
        raise UserError(f"{mpath}: vocab_size {vocab} does not fit dtype {manifest['dtype']}")
    for key in ("eod_id", "pad_id"):
        if not 0 <= manifest[key] < vocab:
            raise UserError(f"{mpath}: {key} {manifest[key]} is outside the vocabulary of {vocab}")
    if not all(isinstance(manifest["tokenizer"].get(k), str) for k in ("path", "sha256")):
        raise UserError(f"{mpath}: tokenizer needs string fields 'path' and 'sha256'")
    if manifest["tokenizer"].get("kind", TOKENIZER_KINDS[0]) not in TOKENIZER_KINDS:
        raise UserError(f"{mpath}: tokenizer kind {manifest['tokenizer']['kind']!r} is not one of {TOKENIZER_KINDS}")
    for split, entries in manifest["splits"].items():
        if not isinstance(entries, list):
            raise UserError(f"{mpath}: split {split!r} is not a list of shards")
        for e in entries:
            _check_entry_fields(mpath, split, e)
    return manifest


def _check_entry_fields(mpath: Path, split: str, e: Any) -> None:
    fields = [
        ("file", str),
        ("index", str),
        ("tokens", int),
        ("documents", int),
        ("sha256", str),
        ("index_sha256", str),
    ]
    if not isinstance(e, dict) or not all(isinstance(e.get(k), t) for k, t in fields):
        raise UserError(f"{mpath}: a {split!r} shard entry lacks one of {', '.join(k for k, _ in fields)}")
    for key in ("file", "index"):
        # Plain names only: a manifest must not point outside its directory.
        if Path(e[key]).name != e[key] or e[key] in ("", ".", ".."):
            raise UserError(f"{mpath}: shard {key} {e[key]!r} must be a plain file name")
    if e["documents"] < 1 or e["tokens"] < e["documents"]:
        raise UserError(
            f"{mpath}: shard {e['file']} has {e['documents']} documents and "
            f"{e['tokens']} tokens; expected at least one token per document"
        )


def _check_shard(root: Path, split: str, e: dict, dtype: np.dtype, eod_id: int, verify: bool) -> np.ndarray:
    """Check one shard's files against its manifest entry; return its document offsets."""
    bin_path, idx_path = root / e["file"], root / e["index"]
    for p in (bin_path, idx_path):
        if not p.is_file():
            raise UserError(f"shard file {p} listed in {root / MANIFEST} is missing")
    want = e["tokens"] * dtype.itemsize
    if bin_path.stat().st_size != want:
        raise UserError(
            f"shard file {bin_path} has {bin_path.stat().st_size} bytes, expected "
            f"{want} ({e['tokens']} tokens); it is truncated or corrupt"
        )
    want = (e["documents"] + 1) * INDEX_DTYPE.itemsize
    if idx_path.stat().st_size != want:
        raise UserError(
            f"index file {idx_path} has {idx_path.stat().st_size} bytes, expected "
            f"{want} ({e['documents']} documents); it is truncated or corrupt"
        )
    if verify:
        for p, key in ((bin_path, "sha256"), (idx_path, "index_sha256")):
            if sha256_file(p) != e[key]:
                raise UserError(
                    f"shard file {p} does not match its sha256 in {root / MANIFEST} "
                    "(the file is corrupt or was changed)"
                )
    offsets = np.fromfile(idx_path, dtype=INDEX_DTYPE).astype(np.int64)
    if offsets[0] != 0 or offsets[-1] != e["tokens"] or np.any(np.diff(offsets) < 1):
        raise UserError(
            f"index file {idx_path} is inconsistent: offsets must rise from 0 to "
            f"{e['tokens']} by at least one token per document"
        )
    # Each document ends with eod: a cheap check that index and tokens belong together.
    tokens = np.memmap(bin_path, dtype=dtype, mode="r", shape=(e["tokens"],))
    if np.any(tokens[offsets[1:] - 1] != eod_id):
        raise UserError(
            f"index file {idx_path} is inconsistent with {bin_path}: "
            f"a document does not end with the eod token {eod_id}"
        )
    return offsets
