"""Where a run starts, and the run directory it writes into.

    --resume none   a fresh run; a train.out_dir that already holds a run is refused
    --resume auto   the newest complete checkpoint of train.out_dir, else a fresh run
    --resume PATH   a run directory (its newest complete checkpoint) or a checkpoint directory
    --init-from PATH   a new run that starts from the weights of PATH (a run, checkpoint, converted
                       directory or Hugging Face import), with a fresh optimizer and schedule at
                       step 0, in any layout; with --resume auto a run that has checkpoints of its
                       own continues from them instead

A checkpoint must be of the same model (`attention_impl` may change: it says how attention runs,
not what it computes). Under the layout it was written in (TP size, data-parallel size and the
ZeRO stage DeepSpeed ran, lm.ds_config.engine_stage) DeepSpeed loads its own files, and the run
continues bitwise, RNG streams included. Under another layout the checkpoint is re-split instead:
its full weights, Adam's moments and step counts (lm.consolidate) are cut for this rank's TP slice
and placed into this stage's partitions (lm.engine.Engine.set_optimizer_state); the step, and with
it the LR schedule and the data position, and the skip counter carry over. Only the dropout RNG
streams cannot (they are per data-parallel rank): they are reseeded from (train.seed, step,
data-parallel rank), and the startup line says so. DeepSpeed's bf16-weights files resume only in
their own layout, and only in that mode. A weights-only checkpoint (`lm convert --to checkpoint`)
fits any layout, and the run continues from its step with a fresh optimizer. Weights to start from
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
from lm.consolidate import MOMENTS, load_model_weights, load_optimizer_state, saved_skip_count
from lm.distributed import World
from lm.ds_config import engine_stage
from lm.engine import check_checkpoint_files
from lm.inference import load_weights, source_config
from lm.initialization import full_shapes, parameter_seed
from lm.parallel import slice_state_dict
from lm.safe_load import load_tensors


@dataclass(frozen=True)
class ResumePoint:
    """The checkpoint a run continues from; `tag_dir` None for a fresh run, which starts from the
    weights of `init_from` if given, else from the seeded init. `layout_change` (e.g.
    "TP1xDP2 ZeRO-2 -> TP2xDP1 ZeRO-3") when DeepSpeed's files are re-split for another layout."""

    tag_dir: Path | None = None
    init_from: Path | None = None
    layout_change: str | None = None

    @property
    def weights_only(self) -> bool:
        return self.tag_dir is not None and ckpt.is_weights_only(self.tag_dir)

    @property
    def resharded(self) -> bool:
        return self.layout_change is not None

    @property
    def loads_deepspeed_files(self) -> bool:
        """Whether DeepSpeed loads its own files of the checkpoint (the same layout)."""
        return self.tag_dir is not None and not self.weights_only and not self.resharded

    def initial_weights(self) -> dict[str, torch.Tensor] | None:
        """The full weights the engine starts from instead of the seeded init: a weights-only or
        re-split checkpoint's, or those of `init_from` for a fresh run."""
        if self.weights_only or self.resharded:
            return load_model_weights(self.tag_dir)
        if self.tag_dir is None and self.init_from is not None:
            return load_weights(self.init_from)[0]
        return None

    def initial_step(self) -> int:
        """The step a weights-only or re-split checkpoint was written at; DeepSpeed's files say
        theirs on load."""
        return ckpt.read_marker(self.tag_dir)["step"] if self.weights_only or self.resharded else 0

    def skipped_steps(self) -> int:
        """The skipped-update count of a checkpoint of DeepSpeed's files (0 for anything else)."""
        if self.tag_dir is None or self.weights_only:
            return 0
        return saved_skip_count(self.tag_dir, ckpt.layout_stage(ckpt.read_marker(self.tag_dir)))

    def optimizer_state(
        self, model: ModelConfig, tp: int, tp_rank: int
    ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
        """A re-split checkpoint's Adam moments, cut to TP rank `tp_rank`'s slices, and step counts.

        Every rank reads the full state (the full weights and both moments pass through memory once,
        one tensor kind at a time), as --init-from reads full weights."""
        state = load_optimizer_state(self.tag_dir)
        moments = {key: slice_state_dict(state.moments.pop(key), model, tp, tp_rank) for key in MOMENTS}
        return moments, state.steps


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
    change = None
    if tag_dir is not None and not ckpt.is_weights_only(tag_dir):  # full weights fit any layout anyway
        check_checkpoint_files(tag_dir)  # files of another save
        check_same_weights_dtype(tag_dir, config.train.precision)
        change = layout_change(tag_dir, config.train, launcher_world_size())
    return ResumePoint(tag_dir, init_from=start, layout_change=change)


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


def layout_name(tp: int, dp: int, stage: int, cp: int = 1, sp: bool = False) -> str:
    """`TP2xDP1 ZeRO-1`, `TP2(SP)xCP2xDP1 ZeRO-3`: what decides which files a rank saved and what its
    RNG streams drive (sequence parallelism gives each TP rank a dropout stream of its own)."""
    return f"TP{tp}" + ("(SP)" if sp else "") + "x" + (f"CP{cp}x" if cp > 1 else "") + f"DP{dp} ZeRO-{stage}"


def layout_change(tag_dir: Path, train: TrainConfig, world: int) -> str | None:
    """None when this run of `world` ranks has the layout DeepSpeed's files of `tag_dir` were
    written in (TP, CP and DP sizes, the stage DeepSpeed ran: lm.ds_config.engine_stage),
    else "SAVED -> THIS" (e.g. "TP1xDP2 ZeRO-2 -> TP2xDP1 ZeRO-3"); refuses what cannot be re-split."""
    info = ckpt.read_marker(tag_dir)
    saved_tp = info["config"]["train"].get("tensor_parallel", 1)
    saved_cp = info["config"]["train"].get("context_parallel", 1)
    saved_sp = info["config"]["train"].get("sequence_parallel", False)
    saved_dp = info["world_size"] // (saved_tp * saved_cp)
    saved = layout_name(saved_tp, saved_dp, ckpt.layout_stage(info), saved_cp, saved_sp)
    cp = train.context_parallel
    dp = max(1, world // (train.tensor_parallel * cp))
    ours = layout_name(train.tensor_parallel, dp, engine_stage(train, dp), cp, train.sequence_parallel)
    if saved == ours:
        return None
    if train.precision == "bf16-weights":  # its fp32 master lives in DeepSpeed's bf16 optimizer
        raise UserError(
            f"checkpoint {tag_dir} holds bf16-weights files of {saved}, which resume only in that layout, "
            f"not {ours}; resume with it, or start from its weights (lm convert --to checkpoint)"
        )
    return f"{saved} -> {ours}"


def dropout_seed(seed: int, step: int, stream: int) -> int:
    """The seed of dropout stream `stream` (lm.parallel.dropout_stream) of a run re-split at `step`:
    the saved streams belong to the old ranks."""
    return parameter_seed(seed, f"dropout/step{step}/dp{stream}")  # "dp": the name of earlier runs' streams


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
