"""Where a run starts, and the run directory it writes into.

    --resume none   a fresh run; a train.out_dir that already holds a run is refused
    --resume auto   the newest complete checkpoint of train.out_dir, else a fresh run
    --resume PATH   a run directory (its newest complete checkpoint) or a checkpoint directory
    --init-from PATH   a new run that starts from the weights of PATH (a run, checkpoint, converted
                       directory or Hugging Face import), with a fresh optimizer and schedule at
                       step 0, in any layout; with --resume auto a run that has checkpoints of its
                       own continues from them instead

A checkpoint must be of the same model (`attention_impl` may change: it says how attention runs,
not what it computes). DeepSpeed's files also need the same tensor-parallel layout, ZeRO stage (as
DeepSpeed ran it) and weight dtype; a weights-only checkpoint (`lm convert --to checkpoint`) fits
any layout, and the run continues from its step with a fresh optimizer. Weights to start from
(`--init-from`) must have the shapes of the config's model; what the layers compute may differ
(twicing some layers of a softmax model is the point).
"""

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from core.errors import UserError
from core.ranks import launcher_world_size
from data_prep.tokenizer import copy_tokenizer
from lm import checkpoint as ckpt
from lm.config import ModelConfig, RunConfig, TrainConfig
from lm.consolidate import load_model_weights
from lm.distributed import World
from lm.ds_config import engine_stage
from lm.engine import check_checkpoint_files
from lm.inference import load_weights, source_config
from lm.initialization import full_shapes
from lm.safe_load import load_tensors


@dataclass(frozen=True)
class ResumePoint:
    """The checkpoint a run continues from; `tag_dir` None for a fresh run, which starts from the
    weights of `init_from` if given, else from the seeded init."""

    tag_dir: Path | None = None
    init_from: Path | None = None

    @property
    def weights_only(self) -> bool:
        return self.tag_dir is not None and ckpt.is_weights_only(self.tag_dir)

    def initial_weights(self) -> dict[str, torch.Tensor] | None:
        """The full weights the engine starts from instead of the seeded init: a weights-only
        checkpoint's, or those of `init_from` for a fresh run."""
        if self.weights_only:
            return load_model_weights(self.tag_dir)
        if self.tag_dir is None and self.init_from is not None:
            return load_weights(self.init_from)[0]
        return None

    def initial_step(self) -> int:
        """The step a weights-only checkpoint was written at; DeepSpeed's files say theirs on load."""
        return ckpt.read_marker(self.tag_dir)["step"] if self.weights_only else 0


def find_resume_point(config: RunConfig, resume: str, init_from: str | None = None) -> ResumePoint:
    """The checkpoint to resume from (or the weights to start from), checked against the config;
    refuses to overwrite a run."""
    run_dir = Path(config.train.out_dir)
    start = Path(init_from) if init_from is not None else None
    if start is not None:
        if resume not in ("none", "auto"):
            raise UserError("--init-from starts a new run: it goes with --resume none or auto, not a resume path")
        check_fits_model(start, config.model)
    if resume == "none":
        if ckpt.complete_checkpoints(run_dir) or (run_dir / "metrics.jsonl").exists():
            raise UserError(
                f"{run_dir} already holds a run; pass --resume auto to continue it, or choose another train.out_dir"
            )
        return ResumePoint(init_from=start)
    if resume == "auto":
        found = ckpt.complete_checkpoints(run_dir)
        tag_dir = found[-1] if found else None
    else:
        tag_dir = ckpt.resolve_checkpoint(resume)
    if tag_dir is not None:
        ckpt.check_files(tag_dir, ckpt.read_marker(tag_dir))  # truncated or missing files, before any process group
        check_same_model(tag_dir, config.model)
        if not ckpt.is_weights_only(tag_dir):  # full weights fit any layout; DeepSpeed's files only theirs
            check_checkpoint_files(tag_dir)  # files of another save
            check_same_layout(tag_dir, config.train, launcher_world_size())
            check_same_weights_dtype(tag_dir, config.train.precision)
    return ResumePoint(tag_dir, init_from=start)


def check_fits_model(source: Path, model: ModelConfig) -> None:
    """Refuse weights to start from whose parameters differ from the config's model, naming the
    first differing one; read from the source's config, so no weights are loaded to refuse."""
    theirs = full_shapes(source_config(source)[0].model)
    ours = full_shapes(model)
    for name in sorted(set(ours) | set(theirs), key=lambda n: (n not in ours, n)):
        if name not in theirs:
            raise UserError(f"--init-from {source}: the config's {name} is not in its weights")
        if name not in ours:
            raise UserError(f"--init-from {source}: its {name} is not in the config's model")
        if ours[name] != theirs[name]:
            raise UserError(
                f"--init-from {source}: {name} is {tuple(theirs[name])} there and {tuple(ours[name])} in the config"
            )


def check_same_model(tag_dir: Path, model: ModelConfig) -> None:
    """Refuse a checkpoint written for another architecture, naming the first difference."""
    # Through ModelConfig, so keys newer than the checkpoint read as their defaults.
    saved = RunConfig.from_dict({"model": ckpt.read_marker(tag_dir)["config"]["model"]}).to_dict()["model"]
    ours = RunConfig(model=model).to_dict()["model"]
    for key in ours:
        if key == "attention_impl":  # how attention runs, not what it computes: free to change
            continue
        if saved.get(key) != ours[key]:
            raise UserError(
                f"checkpoint {tag_dir} was written for a different model: "
                f"model.{key} is {saved.get(key)!r} there and {ours[key]!r} here"
            )


def check_same_layout(tag_dir: Path, train: TrainConfig, world: int) -> None:
    """Resuming DeepSpeed's files needs the tensor-parallel layout and the ZeRO stage they were
    written with (the stage DeepSpeed ran: see lm.ds_config.engine_stage)."""
    info = ckpt.read_marker(tag_dir)
    saved = info["config"]["train"].get("tensor_parallel", 1)
    if saved != train.tensor_parallel:
        raise UserError(
            f"checkpoint {tag_dir} was written with train.tensor_parallel={saved}, not {train.tensor_parallel}; "
            "resume with the same layout"
        )
    saved_stage, stage = ckpt.layout_stage(info), engine_stage(train, max(1, world // train.tensor_parallel))
    if saved_stage != stage:
        raise UserError(
            f"checkpoint {tag_dir} holds ZeRO-{saved_stage} files ({info['world_size']} ranks), and this run of "
            f"{world} rank(s) runs ZeRO-{stage}; resume with the stage and ranks it was written with, or start "
            "from its weights (lm convert --to checkpoint)"
        )


def check_same_weights_dtype(tag_dir: Path, precision: str) -> None:
    """fp32 and bf16 (autocast) keep the same fp32 state; bf16-weights keeps DeepSpeed's other files."""
    saved = ckpt.read_marker(tag_dir)["config"]["train"].get("precision", "fp32")
    if (saved == "bf16-weights") != (precision == "bf16-weights"):
        raise UserError(
            f"{tag_dir} was written with train.precision={saved}, whose DeepSpeed files do not load "
            f"under {precision}; resume with {saved}, or start from its weights "
            "(lm convert --to checkpoint)"
        )


def restore_rng_state(tag_dir: Path, rank: int) -> None:
    """This rank's RNG streams as they were when the checkpoint was saved."""
    path = ckpt.rng_file(tag_dir, rank)
    if not path.is_file():
        raise UserError(f"{path} is missing: the checkpoint was written by a different number of ranks")
    state = ckpt.check_stamp(path, load_tensors(path))
    if not isinstance(state.get("torch"), torch.Tensor):
        raise UserError(f"{path}: not an RNG state file (no 'torch' generator state)")
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def last_checkpoint_hint(run_dir: Path) -> str:
    found = ckpt.complete_checkpoints(run_dir)
    last = f"the last complete checkpoint is {found[-1].name}" if found else "no checkpoint was saved"
    return f"{last}; resume with --resume auto"


def prepare_run_dir(run_dir: Path, config: RunConfig, tokenizer: Path, world: World) -> None:
    """Rank 0 writes the resolved config and the tokenizer and clears interrupted checkpoints."""
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        if tokenizer.is_file():  # tokenizer.model, or tokenizer.json with its tokenizer_config.json
            copy_tokenizer(tokenizer, run_dir)
        for partial in ckpt.remove_incomplete(run_dir):
            print(f"removed {partial}: an interrupted checkpoint", flush=True)
    dist.barrier()
