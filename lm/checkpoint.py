"""Run directories and checkpoints.

A run directory, as written by `lm train` and `lm demo`:

    RUN/config.yaml                  the resolved run config
    RUN/tokenizer.model              the sentencepiece model the shards were made with, or instead
    RUN/tokenizer.json               their Hugging Face tokenizer (beside its tokenizer_config.json)
    RUN/tensorboard/                 scalars
    RUN/checkpoints/latest           DeepSpeed's pointer to the newest tag
    RUN/checkpoints/step00000100/    one DeepSpeed checkpoint (per-rank files), plus
        rng_rank{R}.pt               each rank's RNG state (tensors only: loads with weights_only)
        complete.json                written last, by rank 0, after every rank has finished

A checkpoint without `complete.json` was interrupted and is never resumed from. `complete.json`
also records the step, the data position, the skipped-update count and the config, so a
checkpoint can be inspected and checked against a model without unpickling anything.

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

import torch

from core.errors import UserError

COMPLETE_MARKER = "complete.json"
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


def read_marker(tag_dir: Path) -> dict:
    try:
        return json.loads((tag_dir / COMPLETE_MARKER).read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{tag_dir / COMPLETE_MARKER}: unreadable checkpoint marker ({exc})") from None


def layout_stage(info: dict) -> int:
    """The ZeRO stage whose DeepSpeed files a checkpoint holds, from its marker `info`.

    That is the stage DeepSpeed ran (lm.ds_config.engine_stage: ZeRO-1/2 on one data-parallel
    rank write ZeRO-0's files), recorded as `zero_layout`; markers from before that key wrote
    files of train.zero_stage.
    """
    return info.get("zero_layout", info["config"]["train"].get("zero_stage", 0))


def write_marker(tag_dir: Path, info: dict) -> None:
    tmp = tag_dir / (COMPLETE_MARKER + ".tmp")
    with open(tmp, "w") as f:
        json.dump(info, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, tag_dir / COMPLETE_MARKER)


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
        (d / COMPLETE_MARKER).unlink()  # first make it incomplete, so a crash mid-delete is harmless
        shutil.rmtree(d)
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


def save_rng_state(tag_dir: Path, rank: int) -> None:
    torch.save(rng_state(), rng_file(tag_dir, rank))


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
