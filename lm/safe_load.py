"""Reading checkpoint files without running code from them.

`torch.load(weights_only=True)` unpickles tensors, containers and plain values only; a file that
asks for anything else (a crafted pickle, or a class we did not allow) is refused with one line
naming what it asked for. DeepSpeed's files need a few of its plain classes: lm.engine lists them.
safetensors files hold tensors only; a truncated or foreign one is one line naming it too.
"""

import re
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open

from core.errors import UserError


def load_tensors(path: Path, allowed: Iterable[type] = (), mmap: bool = False) -> dict:
    """torch.load that runs no code from the file: tensors, containers and the `allowed` classes.
    With `mmap` the tensors stay on disk until touched (only the small pickle is read)."""
    if not path.is_file():
        raise UserError(f"{path} is missing: the checkpoint is incomplete")
    try:
        with torch.serialization.safe_globals(list(allowed)), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's note on pickle protocols is not the user's business
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # a corrupt or foreign file, whatever the unpickler says
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        reason = f"it asks to run {found.group(1)}" if found else str(exc).splitlines()[0][:100]
        raise UserError(f"{path}: cannot be read as a DeepSpeed checkpoint file ({reason})") from None


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file; a truncated or foreign file is a UserError naming it."""
    if not path.is_file():
        raise UserError(f"{path} is missing")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: f.get_tensor(name) for name in f.keys()}
    except Exception as exc:  # a truncated or foreign file, whatever safetensors calls it
        raise UserError(f"{path}: not a readable safetensors file ({str(exc).splitlines()[0][:100]})") from None
