"""Run directories and checkpoints.

A run directory, as written by `lm train` and `lm demo`:

    RUN/config.yaml                  the resolved run config
    RUN/tokenizer.model              the sentencepiece model the shards were made with
    RUN/tensorboard/                 scalars
    RUN/checkpoints/latest           DeepSpeed's pointer to the newest tag
    RUN/checkpoints/step00000100/    one DeepSpeed checkpoint (per-rank files), plus
        rng_rank{R}.pt               each rank's RNG state (tensors only: loads with weights_only)
        complete.json                written last, by rank 0, after every rank has finished

A checkpoint without `complete.json` was interrupted and is never resumed from. `complete.json`
also records the step, the data position and the config, so a checkpoint can be inspected and
checked against a model without unpickling anything.

`lm convert --to checkpoint` writes a weights-only checkpoint instead of DeepSpeed's files:
`model.safetensors` (the full weights, for any TP layout) beside `complete.json`. Nothing here
unpickles code: safetensors, or torch.load(weights_only=True) (see lm.consolidate).
"""

import json
import os
import shutil
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from lm.config import ModelConfig, RunConfig, TrainConfig
from lm.errors import UserError

COMPLETE_MARKER = "complete.json"
WEIGHTS_FILE = "model.safetensors"


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


def check_same_model(tag_dir: Path, model: ModelConfig) -> None:
    """Refuse a checkpoint written for another architecture, naming the first difference."""
    saved = read_marker(tag_dir)["config"]["model"]
    ours = RunConfig(model=model).to_dict()["model"]
    for key in ours:
        if key == "attention_impl":  # how attention runs, not what it computes: free to change
            continue
        if saved.get(key) != ours[key]:
            raise UserError(
                f"checkpoint {tag_dir} was written for a different model: "
                f"model.{key} is {saved.get(key)!r} there and {ours[key]!r} here"
            )


def check_same_layout(tag_dir: Path, train: TrainConfig) -> None:
    """Resuming needs the tensor-parallel layout the checkpoint was written with."""
    saved = read_marker(tag_dir)["config"]["train"].get("tensor_parallel", 1)
    if saved != train.tensor_parallel:
        raise UserError(
            f"checkpoint {tag_dir} was written with train.tensor_parallel={saved}, not {train.tensor_parallel}; "
            "resume with the same layout"
        )


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def save_rng_state(tag_dir: Path, rank: int) -> None:
    torch.save(rng_state(), tag_dir / f"rng_rank{rank}.pt")


def load_rng_state(tag_dir: Path, rank: int) -> None:
    path = tag_dir / f"rng_rank{rank}.pt"
    if not path.is_file():
        raise UserError(f"{path} is missing: the checkpoint was written by a different number of ranks")
    from lm.consolidate import load_trusted_free

    state = load_trusted_free(path)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def is_weights_only(tag_dir: Path) -> bool:
    """A checkpoint written by `lm convert --to checkpoint`: full weights, no optimizer state."""
    return (tag_dir / WEIGHTS_FILE).is_file()


def load_model_weights(tag_dir: Path) -> dict[str, torch.Tensor]:
    """The full fp32 state dict of a checkpoint: DeepSpeed's (any ZeRO stage, any TP) or weights-only."""
    if is_weights_only(tag_dir):
        return with_tied_names(load_file(tag_dir / WEIGHTS_FILE))
    from lm.consolidate import consolidate

    info = read_marker(tag_dir)
    config = RunConfig.from_dict(info["config"], source=str(tag_dir / COMPLETE_MARKER))
    return consolidate(tag_dir, config.model, config.train.zero_stage, config.train.tensor_parallel, info["world_size"])


def with_tied_names(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The output layer is tied to the token embedding; files keep one or both names."""
    tied = weights.get("lm_head.weight", weights.get("transformer.wte.weight"))
    if tied is not None:
        weights["lm_head.weight"] = weights["transformer.wte.weight"] = tied
    return weights


def is_converted_dir(path: Path) -> bool:
    """A directory written by `lm convert --to safetensors`."""
    return (path / WEIGHTS_FILE).is_file() and (path / "config.yaml").is_file()


def load_model(checkpoint: str | Path, device: str | torch.device = "cpu"):
    """(model, run config, source dir) from a run, checkpoint or converted directory."""
    from lm.model import GPT

    path = Path(checkpoint)
    if is_converted_dir(path):
        config = RunConfig.from_dict(yaml.safe_load((path / "config.yaml").read_text()), source=str(path / "config.yaml"))
        weights, source = with_tied_names(load_file(path / WEIGHTS_FILE)), path
    else:
        source = resolve_checkpoint(path)
        config = RunConfig.from_dict(read_marker(source)["config"], source=str(source / COMPLETE_MARKER))
        weights = load_model_weights(source)
    model = GPT(config.model)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise UserError(f"{source}: the weights do not fit the model of its config ({(missing or unexpected)[0]})")
    return model.to(device).eval(), config, source


def tokenizer_path_for(source: Path) -> Path:
    """A converted directory carries its tokenizer; a checkpoint's is in its run directory."""
    return source / "tokenizer.model" if is_converted_dir(source) else run_dir_of(source) / "tokenizer.model"


def load_for_inference(checkpoint: str | Path, device: str | torch.device = "cpu"):
    """(model, tokenizer, checkpoint dir): the model and the tokenizer its run was trained with."""
    from data_prep.tokenizer import Tokenizer

    model, _, tag_dir = load_model(checkpoint, device)
    tokenizer_path = tokenizer_path_for(tag_dir)
    if not tokenizer_path.is_file():
        raise UserError(f"{tokenizer_path} is missing: the run directory has no tokenizer")
    tokenizer = Tokenizer(tokenizer_path)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise UserError(
            f"tokenizer/model vocabulary mismatch: {tokenizer_path} has {tokenizer.vocab_size} ids, "
            f"the model only {model.config.vocab_size}"
        )
    return model, tokenizer, tag_dir
