"""Work units: fixed groups of documents, tokenised independently into part files.

A split's document stream is cut into units by a rule that looks only at the documents
(at most `docs_per_unit` documents, closing early once `unit_chars` characters are in), so
unit u holds the same documents whatever the number of workers or ranks. Each unit is
tokenised on its own and written as one part file,

    .prep/parts/{split}-{u:06d}.part   u64 document count, u64 lengths (eod included),
                                        then the tokens (each document followed by eod)
    .prep/parts/{split}-{u:06d}.json   counts, tokenizer sha256 and the part's sha256

both written atomically, the .json last: a unit is finished when its .json exists and the
.part matches the checksum in it. Rank 0 later concatenates the parts in unit order.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from core.errors import UserError

_U64 = np.dtype("<u8")
# Test hook: tokenise N units in this process, then fail while writing the next one
# (DATA_PREP_FAIL_MODE=kill: SIGKILL ourselves, as the OOM killer would; else raise).
FAIL_AFTER_ENV, FAIL_MODE_ENV = "DATA_PREP_FAIL_AFTER_UNITS", "DATA_PREP_FAIL_MODE"

_tokenizer = None  # the worker's tokenizer (sentencepiece or tokenizer.json), loaded once per process
_units_done_here = 0


def iter_units(docs: Iterable[str], docs_per_unit: int, unit_chars: int) -> Iterator[tuple[int, list[str]]]:
    """(unit number, documents) in corpus order; every unit has at least one document."""
    unit: list[str] = []
    chars, number = 0, 0
    for doc in docs:
        unit.append(doc)
        chars += len(doc)
        if len(unit) >= docs_per_unit or chars >= unit_chars:
            yield number, unit
            unit, chars, number = [], 0, number + 1
    if unit:
        yield number, unit


def part_paths(parts_dir: Path, split: str, unit: int) -> tuple[Path, Path]:
    stem = f"{split}-{unit:06d}"
    return parts_dir / f"{stem}.part", parts_dir / f"{stem}.json"


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())  # the rename must not become visible before the data
    os.replace(tmp, path)


def _meta(parts_dir: Path, split: str, unit: int) -> dict | None:
    try:
        return json.loads(part_paths(parts_dir, split, unit)[1].read_text())
    except (OSError, ValueError):
        return None


def unit_is_finished(parts_dir: Path, split: str, unit: int, tokenizer_sha256: str) -> bool:
    """True if the unit's part is complete, made with this tokenizer, and checksum-clean."""
    meta = _meta(parts_dir, split, unit)
    part = part_paths(parts_dir, split, unit)[0]
    if not meta or meta.get("tokenizer_sha256") != tokenizer_sha256 or not part.is_file():
        return False
    if part.stat().st_size != meta.get("bytes"):
        return False
    return hashlib.sha256(part.read_bytes()).hexdigest() == meta.get("sha256")


def read_part(parts_dir: Path, split: str, unit: int, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, document lengths) of a finished unit, checksum verified."""
    part, meta_path = part_paths(parts_dir, split, unit)
    meta = _meta(parts_dir, split, unit)
    if meta is None or not part.is_file():
        raise UserError(f"work unit {split} {unit} is missing ({part}); rerun with --resume")
    data = part.read_bytes()
    if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
        raise UserError(
            f"part file {part} does not match its sha256 in {meta_path.name}; rerun with --resume to redo it"
        )
    n = int(np.frombuffer(data, _U64, count=1)[0])
    lengths = np.frombuffer(data, _U64, count=n, offset=_U64.itemsize)
    tokens = np.frombuffer(data, dtype, offset=_U64.itemsize * (n + 1))
    return tokens, lengths


def init_worker(model_path: str) -> None:
    """Pool initializer (and the inline path): load the tokenizer once per process."""
    global _tokenizer
    from data_prep.tokenizer import load_tokenizer

    _tokenizer = load_tokenizer(model_path)


def _maybe_fail(part: Path, data: bytes) -> None:
    limit = os.environ.get(FAIL_AFTER_ENV)
    if limit is None or _units_done_here < int(limit):
        return
    # Leave a half-written temp part behind, as a real crash mid-write would.
    part.with_name(f".{part.name}.tmp-{os.getpid()}").write_bytes(data[: len(data) // 2])
    if os.environ.get(FAIL_MODE_ENV) == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise RuntimeError(f"{FAIL_AFTER_ENV}={limit}: simulated failure")


def encode_unit(
    parts_dir: str, split: str, unit: int, docs: list[str], dtype: str, tokenizer_sha256: str
) -> tuple[str, int, int, int]:
    """Tokenise one unit and write its part; returns (split, unit, documents, tokens)."""
    global _units_done_here
    tok = _tokenizer
    ids = tok.encode_batch(docs)  # in this thread: the pool provides the parallelism
    lengths = np.fromiter((len(x) + 1 for x in ids), dtype=_U64, count=len(ids))
    tokens = np.empty(int(lengths.sum()), dtype=np.dtype(dtype))
    ends = np.cumsum(lengths, dtype=np.int64)
    starts = ends - lengths.astype(np.int64)
    for start, end, x in zip(starts.tolist(), ends.tolist(), ids):
        tokens[start : end - 1] = x
    tokens[ends - 1] = tok.eod_id
    data = np.array([len(docs)], dtype=_U64).tobytes() + lengths.tobytes() + tokens.tobytes()
    part, meta = part_paths(Path(parts_dir), split, unit)
    _maybe_fail(part, data)
    _atomic_write(part, data)
    _atomic_write(
        meta,
        json.dumps(
            {
                "split": split,
                "unit": unit,
                "documents": len(docs),
                "tokens": int(tokens.size),
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
                "tokenizer_sha256": tokenizer_sha256,
            }
        ).encode(),
    )
    _units_done_here += 1
    return split, unit, len(docs), int(tokens.size)
