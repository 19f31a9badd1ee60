"""Run directories and checkpoints.

A run directory, as written by `lm train` and `lm demo`:

    RUN/config.yaml                  the resolved run config
    RUN/tokenizer.model              the sentencepiece model the shards were made with, or instead
    RUN/tokenizer.json               their Hugging Face tokenizer (beside its tokenizer_config.json)
    RUN/tensorboard/                 scalars
    RUN/checkpoints/latest           the newest complete tag (for DeepSpeed's own tools)
    RUN/checkpoints/step00000100/    one DeepSpeed checkpoint (per-rank files), plus
        rng_rank{R}.pt               each rank's RNG state (tensors only: loads with weights_only)
        complete.json                written last, by rank 0, after every rank has finished

A checkpoint without `complete.json` was interrupted and is never resumed from; `latest` is
written only after it. `complete.json` also records the step, the data position, the
skipped-update count and the config, so a checkpoint can be inspected and checked against a
model without unpickling anything, and the byte size of every other file of the checkpoint
(`files`: a truncated or replaced file is found before anything is read) and the save's
`save_id`, which every file written through `write_tensors` carries too (its STAMP_KEY): a file
of another save is refused (`check_stamp`).

`lm convert --to checkpoint` writes a weights-only checkpoint instead of DeepSpeed's files:
`model.safetensors` (the full weights, for any TP layout) beside `complete.json`.

This module is the layout alone: names, markers, retention, the RNG files' contents. It imports
nothing of the project but core; reading files safely is lm.safe_load, resuming lm.resume, and
loading a model for inference lm.inference.
"""

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from core.errors import UserError

COMPLETE_MARKER = "complete.json"
LATEST = "latest"
STAMP_KEY = "lm_checkpoint"  # in every file a save writes: {"step": N, "save_id": ...} of that save
WEIGHTS_FILE = "model.safetensors"
# A run's or converted directory's tokenizer, first found wins: data_prep.tokenizer's SP_NAME, HF_NAME.
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")


def tag_for_step(step: int) -> str:
    return f"step{step:08d}"


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint directories of a run, oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [d for d in root.iterdir() if d.is_dir() and (d / COMPLETE_MARKER).is_file()]
    return sorted(found, key=lambda d: read_marker(d)["step"])


def remove_checkpoint(tag_dir: Path) -> None:
    """Delete a checkpoint directory, its marker first: a crash mid-delete leaves it incomplete."""
    (tag_dir / COMPLETE_MARKER).unlink(missing_ok=True)
    shutil.rmtree(tag_dir, ignore_errors=True)


def read_marker(tag_dir: Path) -> dict:
    """A checkpoint's marker, checked to be one; anything else is one line naming the file."""
    path = tag_dir / COMPLETE_MARKER
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: unreadable checkpoint marker ({str(exc).splitlines()[0][:100]})") from None
    problem = marker_problem(info)
    if problem:
        raise UserError(f"{path}: not a checkpoint marker ({problem})")
    return info


def marker_problem(info: Any) -> str | None:
    """What makes `info` no checkpoint marker, or None: a JSON object with an integer step, the
    world size (null for a weights-only checkpoint) and a config object; files and save_id if there."""
    if not isinstance(info, dict):
        return "not a JSON object"
    whole = lambda value: isinstance(value, int) and not isinstance(value, bool) and value >= 0
    if not whole(info.get("step")):
        return "no integer 'step'"
    if not (whole(info.get("world_size")) or (info.get("weights_only") and info.get("world_size") is None)):
        return "no integer 'world_size'"
    if not isinstance(info.get("config"), dict):
        return "no 'config' object"
    files = info.get("files", {})
    plain = lambda name: isinstance(name, str) and Path(name).name == name  # a file of this directory
    if not (isinstance(files, dict) and all(plain(k) and whole(v) for k, v in files.items())):
        return "'files' is not an object of this directory's file names and byte sizes"
    if not isinstance(info.get("save_id", ""), str):
        return "'save_id' is not a string"
    return None


def layout_stage(info: dict) -> int:
    """The ZeRO stage whose DeepSpeed files a checkpoint holds, from its marker `info`.

    That is the stage DeepSpeed ran (lm.ds_config.engine_stage: ZeRO-1/2 on one data-parallel
    rank write ZeRO-0's files), recorded as `zero_layout`; markers from before that key wrote
    files of train.zero_stage.
    """
    return info.get("zero_layout", info["config"]["train"].get("zero_stage", 0))


def write_marker(tag_dir: Path, info: dict) -> None:
    """Mark `tag_dir` complete, recording the byte size of each of its files (`files`)."""
    files = {p.name: p.stat().st_size for p in sorted(tag_dir.iterdir()) if p.is_file() and p.name != COMPLETE_MARKER}
    write_atomically(tag_dir / COMPLETE_MARKER, json.dumps({**info, "files": files}, indent=2))


def write_latest(run_dir: str | Path, tag: str) -> None:
    """Point `latest` at a complete checkpoint (DeepSpeed's zero_to_fp32.py reads it)."""
    write_atomically(checkpoint_root(run_dir) / LATEST, tag)


def write_atomically(path: Path, text: str) -> None:
    """`path` holds `text` whole, or keeps what it held (a failed write leaves no temporary file)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def check_files(tag_dir: Path, info: dict) -> None:
    """Every file the marker `info` lists is there with its recorded size: a truncated, missing or
    replaced file is one line naming it, before anything is unpickled."""
    for name, size in info.get("files", {}).items():
        path = tag_dir / name
        if not path.is_file():
            raise UserError(f"{path} is missing: the checkpoint is incomplete")
        if path.stat().st_size != size:
            raise UserError(
                f"{path} holds {path.stat().st_size} bytes, {tag_dir / COMPLETE_MARKER} recorded {size}: "
                "the file is truncated or was replaced"
            )


def size_on_disk(tag_dir: Path) -> int:
    return sum(p.stat().st_size for p in tag_dir.rglob("*") if p.is_file())


class _RecordingSink:
    """A file for torch.save that remembers the OSError of a failed write: torch reports a failed
    write in its zip format as a RuntimeError without errno ("unexpected pos ...")."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.file.flush()


def write_tensors(obj: Any, path: Path) -> None:
    """torch.save `obj` to `path`; a failed write (ENOSPC, EIO, EACCES) raises its OSError and
    leaves no partial file."""
    sink = None
    try:
        with open(path, "wb") as f:
            sink = _RecordingSink(f)
            torch.save(obj, sink)
    except (OSError, RuntimeError) as exc:
        path.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise
        if sink is not None and sink.error is not None:
            raise sink.error from None
        raise


def write_failure(exc: OSError, path: str | Path) -> str:
    """A failed write, in words: `FILE: [Errno 28] No space left on device`."""
    reason = f"[Errno {exc.errno}] {exc.strerror}" if exc.errno else str(exc)
    return f"{Path(path).name}: {reason}"


def check_stamp(path: Path, state: Any) -> dict:
    """`state` read from `path`, without its stamp, refused unless it is a dict of the same save
    as the marker of its directory (files of two checkpoints mixed); unchecked without a marker,
    or with one from before save ids."""
    if not isinstance(state, dict):
        raise UserError(f"{path}: not a checkpoint file (it holds a {type(state).__name__}, not a dict)")
    state = dict(state)
    stamp = state.pop(STAMP_KEY, None)
    if not (path.parent / COMPLETE_MARKER).is_file():
        return state
    info = read_marker(path.parent)
    if "save_id" not in info:
        return state
    if not isinstance(stamp, dict) or stamp.get("save_id") != info["save_id"]:
        origin = f"the save of step {stamp.get('step')}" if isinstance(stamp, dict) else "no save of this project"
        raise UserError(
            f"{path} comes from {origin}, not from the save of step {info['step']} that "
            f"{path.parent / COMPLETE_MARKER} records: files of two checkpoints are mixed"
        )
    return state


def sync_directory(tag_dir: Path) -> None:
    """Flush every file of a checkpoint directory, and the directory itself, to disk."""
    for path in [*tag_dir.iterdir(), tag_dir]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove_incomplete(run_dir: str | Path) -> list[Path]:
    """Delete checkpoint directories that were never marked complete (an interrupted save)."""
    root = checkpoint_root(run_dir)
    partial = [d for d in root.iterdir() if d.is_dir() and not (d / COMPLETE_MARKER).is_file()] if root.is_dir() else []
    for d in partial:
        shutil.rmtree(d)
    return partial


def apply_retention(run_dir: str | Path, keep_last: int) -> list[Path]:
    """Keep the newest `keep_last` complete checkpoints (0 keeps all); the newest is never deleted."""
    found = complete_checkpoints(run_dir)
    doomed = found[: max(0, len(found) - keep_last)] if keep_last > 0 else []
    for d in doomed:
        remove_checkpoint(d)
    return doomed


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory or a checkpoint directory -> the newest complete checkpoint directory."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint path not found: {path}")
    if (path / COMPLETE_MARKER).is_file():
        return path
    found = complete_checkpoints(path)
    if not found:
        raise UserError(f"no complete checkpoint under {path} (expected a run directory written by `lm train`)")
    return found[-1]


def run_dir_of(tag_dir: Path) -> Path:
    return tag_dir.parent.parent


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def save_rng_state(tag_dir: Path, rank: int, stamp: dict | None = None) -> None:
    state = rng_state() if stamp is None else {**rng_state(), STAMP_KEY: stamp}
    write_tensors(state, rng_file(tag_dir, rank))


def rng_file(tag_dir: Path, rank: int) -> Path:
    return tag_dir / f"rng_rank{rank}.pt"


def is_weights_only(tag_dir: Path) -> bool:
    """A checkpoint written by `lm convert --to checkpoint`: full weights, no optimizer state."""
    return (tag_dir / WEIGHTS_FILE).is_file()


def is_converted_dir(path: Path) -> bool:
    """A directory written by `lm convert --to safetensors`."""
    return (path / WEIGHTS_FILE).is_file() and (path / "config.yaml").is_file()


def tokenizer_path_for(source: Path) -> Path:
    """A converted directory carries its tokenizer; a checkpoint's is in its run directory.

    Its tokenizer.model, else its tokenizer.json; tokenizer.model (missing) when it has neither.
    """
    directory = source if is_converted_dir(source) else run_dir_of(source)
    found = [directory / name for name in TOKENIZER_FILES if (directory / name).is_file()]
    return (found or [directory / TOKENIZER_FILES[0]])[0]
