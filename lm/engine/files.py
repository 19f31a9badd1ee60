"""DeepSpeed's checkpoint files, as lm.engine reads and writes them: read without running code from
them, checked to be of one save, and written stamped with it, without raising in the middle of a save."""

import os
from pathlib import Path

from lm import checkpoint as ckpt
from lm.distributed import select_accelerator
from lm.safe_load import load_tensors


def checkpoint_classes() -> list[type]:
    """The plain DeepSpeed classes its checkpoint files pickle (values only, no code)."""
    select_accelerator()
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def read_checkpoint_file(path: Path) -> dict:
    """One file of a DeepSpeed checkpoint, read without running code from it, of the same save as
    its checkpoint's marker."""
    return ckpt.check_stamp(path, load_tensors(path, checkpoint_classes()))


def check_checkpoint_files(tag_dir: Path) -> None:
    """Every .pt file of `tag_dir` is of its checkpoint's save, checked cheaply (tensors mapped, not
    read) on every rank before any is loaded: a bad file a single rank loads would end that rank
    alone, and only rank 0 reports errors."""
    for path in sorted(tag_dir.glob("*.pt")):
        ckpt.check_stamp(path, load_tensors(path, checkpoint_classes(), mmap=True))


class GuardedWrites:
    """What DeepSpeed's save writes, through lm.checkpoint.write_tensors, each file stamped with
    the save; the first failed write is kept in `error` (and nothing more is written) instead of
    raised, so that this rank goes on through the save's collectives with the others."""

    def __init__(self):
        self.stamp: dict | None = None
        self.error: str | None = None

    def begin(self, stamp: dict) -> None:
        self.stamp, self.error = stamp, None

    def attempt(self, write, path) -> None:
        if self.error is not None:
            return
        try:
            write()
        except OSError as exc:
            self.error = ckpt.write_failure(exc, path)

    def save(self, state_dict: dict, path: str) -> None:
        self.attempt(lambda: ckpt.write_tensors({**state_dict, ckpt.STAMP_KEY: self.stamp}, Path(path)), path)

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        self.attempt(lambda: os.makedirs(path, exist_ok=exist_ok), path)
