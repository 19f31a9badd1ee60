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
"""

import contextlib
import io
import json
import os
from pathlib import Path

import torch

from lm.config import ModelConfig, RunConfig, TrainConfig
from lm.distributed import select_accelerator
from lm.errors import UserError

COMPLETE_MARKER = "complete.json"


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
    state = torch.load(path, weights_only=True)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def load_model_weights(tag_dir: Path) -> dict[str, torch.Tensor]:
    """The full fp32 model state dict of a DeepSpeed checkpoint of any ZeRO stage (TP = 1)."""
    info = read_marker(tag_dir)
    stage = info["config"]["train"]["zero_stage"]
    tp = info["config"]["train"].get("tensor_parallel", 1)
    if tp != 1:
        raise UserError(f"checkpoint {tag_dir} is split over {tp} tensor-parallel ranks; merging them for inference is not implemented yet")
    if stage == 0:
        # Without ZeRO the model-states file holds the whole module; DeepSpeed pickles more than
        # tensors into it, so only checkpoints this project wrote (complete.json present) get here.
        states = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        weights = states["module"]
    else:
        select_accelerator()
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # DeepSpeed narrates the consolidation on stdout, which must stay clean for --json.
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            weights = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    weights = {k: v.float() for k, v in weights.items()}
    # Tied weights are stored once by DeepSpeed's consolidation; restore both names.
    if "lm_head.weight" in weights and "transformer.wte.weight" not in weights:
        weights["transformer.wte.weight"] = weights["lm_head.weight"]
    if "transformer.wte.weight" in weights and "lm_head.weight" not in weights:
        weights["lm_head.weight"] = weights["transformer.wte.weight"]
    return weights


def load_model(checkpoint: str | Path, device: str | torch.device = "cpu"):
    """(model, run config, checkpoint dir) from a run directory or a checkpoint directory."""
    from lm.model import GPT

    tag_dir = resolve_checkpoint(checkpoint)
    config = RunConfig.from_dict(read_marker(tag_dir)["config"], source=str(tag_dir / COMPLETE_MARKER))
    model = GPT(config.model)
    model.load_state_dict(load_model_weights(tag_dir))
    return model.to(device).eval(), config, tag_dir


def load_for_inference(checkpoint: str | Path, device: str | torch.device = "cpu"):
    """(model, tokenizer, checkpoint dir): the model and the tokenizer its run was trained with."""
    from data_prep.tokenizer import Tokenizer

    model, _, tag_dir = load_model(checkpoint, device)
    tokenizer_path = run_dir_of(tag_dir) / "tokenizer.model"
    if not tokenizer_path.is_file():
        raise UserError(f"{tokenizer_path} is missing: the run directory has no tokenizer")
    tokenizer = Tokenizer(tokenizer_path)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise UserError(
            f"tokenizer/model vocabulary mismatch: {tokenizer_path} has {tokenizer.vocab_size} ids, "
            f"the model only {model.config.vocab_size}"
        )
    return model, tokenizer, tag_dir
