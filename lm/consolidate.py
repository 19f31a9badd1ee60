"""Full fp32 model weights and Adam's state from a DeepSpeed checkpoint of any ZeRO stage and TP size.

Where the weights live in a DeepSpeed checkpoint (one `mp_rank_XX` per TP rank):
- ZeRO-0: the module state dict in `mp_rank_XX_model_states.pt`.
- ZeRO-1/2: the fp32 master weights, flattened per parameter group and split evenly over the
  data-parallel ranks, in `zero_pp_rank_D_mp_rank_XX_optim_states.pt`; concatenated over D they
  give the group's parameters in the order of `param_shapes` (padding only at the end).
- ZeRO-3: every parameter split on its own into ceil(numel / dp) pieces, one per rank, each
  rank's pieces concatenated per group in `fp32_flat_groups`.
Adam's moments (`exp_avg`, `exp_avg_sq`) sit beside them in the same shapes: at ZeRO-0 in the
torch optimizer state dict of the model-states file, one entry per parameter, numbered in the
order of the optimizer's groups (lm.schedule.build_optimizer); at ZeRO-1/2/3 in the optimizer
state of each flat group, flattened exactly as the weights are. Adam's step count is per
parameter at ZeRO-0 and per flat group above.
The stage is the one DeepSpeed ran (lm.checkpoint.layout_stage): ZeRO-1/2 on one data-parallel
rank write ZeRO-0's files. TP slices are then merged with the layout of lm.parallel
(`merge_state_dicts`). DeepSpeed's own `zero_to_fp32` covers TP = 1 only and unpickles arbitrary
objects; here every file is read with `torch.load(weights_only=True)`, allowing only the few
plain DeepSpeed classes its files contain (lm.engine.read_checkpoint_file).
"""

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from core.errors import UserError
from lm import checkpoint as ckpt
from lm.config import ModelConfig, RunConfig
from lm.engine import read_checkpoint_file
from lm.model import GPT, embedding_names
from lm.parallel import merge_state_dicts
from lm.safe_load import load_safetensors

MOMENTS = ("exp_avg", "exp_avg_sq")  # Adam's two per-element states


@dataclass
class OptimizerState:
    """Adam's full state by parameter name: each moment unsplit (fp32), and the step count (a 0-d
    tensor as torch keeps it, the same for every parameter unless some had no gradient)."""

    moments: dict[str, dict[str, torch.Tensor]]  # MOMENTS key -> name -> full tensor
    steps: dict[str, torch.Tensor]


def with_tied_names(weights: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Both names of a tied output layer and token embedding (files keep one or both); an untied
    model's weights as they are."""
    if config.tie_embeddings:
        names = embedding_names(config)
        tied = next((weights[name] for name in names if name in weights), None)
        if tied is not None:
            weights.update(dict.fromkeys(names, tied))
    return weights


def _run_config(tag_dir: Path) -> tuple[dict, RunConfig]:
    info = ckpt.read_marker(tag_dir)
    ckpt.check_files(tag_dir, info)  # truncated or missing files, before anything is read
    return info, RunConfig.from_dict(info["config"], source=str(tag_dir / ckpt.COMPLETE_MARKER))


def load_model_weights(tag_dir: Path) -> dict[str, torch.Tensor]:
    """The full fp32 state dict of a checkpoint: DeepSpeed's (any ZeRO stage, any TP) or weights-only."""
    info, config = _run_config(tag_dir)
    if ckpt.is_weights_only(tag_dir):
        return with_tied_names(load_safetensors(tag_dir / ckpt.WEIGHTS_FILE), config.model)
    return consolidate(tag_dir, config.model, ckpt.layout_stage(info), config.train.tensor_parallel, info["world_size"])


def load_optimizer_state(tag_dir: Path) -> OptimizerState:
    """Adam's full state in a DeepSpeed checkpoint of any ZeRO stage and TP size."""
    info, config = _run_config(tag_dir)
    stage, tp, world = ckpt.layout_stage(info), config.train.tensor_parallel, info["world_size"]
    moments = {key: consolidate(tag_dir, config.model, stage, tp, world, key) for key in MOMENTS}
    # Every TP rank steps alike; rank 0's counts stand for all.
    steps = tp_rank_tensors(tag_dir, config.model, stage, 0, world // tp, "step")
    return OptimizerState(moments, steps)


def _model_states(tag_dir: Path, stage: int, tp_rank: int) -> dict:
    name = (
        f"zero_pp_rank_0_mp_rank_{tp_rank:02d}_model_states.pt"
        if stage == 3
        else f"mp_rank_{tp_rank:02d}_model_states.pt"
    )
    return read_checkpoint_file(tag_dir / name)


def saved_skip_count(tag_dir: Path, stage: int) -> int:
    """The skipped-update count saved with a checkpoint: in its marker, or (checkpoints from before
    the marker kept it) in the client state of TP rank 0's model-states file."""
    info = ckpt.read_marker(tag_dir)
    if "skipped_steps" in info:
        return info["skipped_steps"]
    return _model_states(tag_dir, stage, 0).get("skipped_steps", 0)


def _optim_states(tag_dir: Path, tp_rank: int, dp_size: int) -> list[dict]:
    return [
        read_checkpoint_file(tag_dir / f"zero_pp_rank_{d}_mp_rank_{tp_rank:02d}_optim_states.pt")[
            "optimizer_state_dict"
        ]
        for d in range(dp_size)
    ]


def optimizer_order(model: ModelConfig) -> list[list[str]]:
    """Parameter names per optimizer group, in the order build_optimizer hands them to Adam (the
    numbering of a torch optimizer state dict). TP slicing keeps names and order."""
    with torch.device("meta"):
        gpt = GPT(model)
    names = {id(p): name for name, p in gpt.named_parameters()}
    return [[names[id(p)] for p in group["params"]] for group in gpt.optimizer_groups(0.0)]


def _zero0_tensors(states: dict, model: ModelConfig, key: str | None, where: Path) -> dict[str, torch.Tensor]:
    if key is None:
        return {k: v.float() for k, v in states["module"].items()}
    saved = states["optimizer"]
    out = {}
    for names, group in zip(optimizer_order(model), saved["param_groups"], strict=True):
        if len(names) != len(group["params"]):
            raise UserError(f"{where}: the saved optimizer groups do not match the model's parameters")
        for name, index in zip(names, group["params"]):
            out[name] = saved["state"][index][key]
    return out


def _unflatten(flat: torch.Tensor, shapes: dict, where: Path) -> dict[str, torch.Tensor]:
    out, offset = {}, 0
    for name, shape in shapes.items():
        n = math.prod(shape)
        out[name] = flat[offset : offset + n].view(shape).clone()
        offset += n
    if offset > flat.numel():
        raise UserError(f"{where}: the saved partitions hold fewer values than the model's parameters")
    return out


def _flat_groups(ranks: list[dict], stage: int, key: str | None) -> list[list[torch.Tensor]]:
    """Per flat group, every data-parallel rank's partition of the weights (`key` None) or of an
    optimizer state."""
    if key is None:
        weights = "single_partition_of_fp32_groups" if stage in (1, 2) else "fp32_flat_groups"
        return [list(group) for group in zip(*(r[weights] for r in ranks))]
    states = [(r["base_optimizer_state"] if stage in (1, 2) else r["optimizer_state_dict"])["state"] for r in ranks]
    return [[s[group][key] for s in states] for group in sorted(states[0])]


def _zero12_tensors(flats: list[list[torch.Tensor]], shapes: list[dict], where: Path) -> dict[str, torch.Tensor]:
    out = {}
    for parts, group_shapes in zip(flats, shapes, strict=True):
        out.update(_unflatten(torch.cat(parts), group_shapes, where))
    return out


def _zero3_tensors(flats: list[list[torch.Tensor]], shapes: list[dict], dp_size: int) -> dict[str, torch.Tensor]:
    out = {}
    for parts, group_shapes in zip(flats, shapes, strict=True):
        offset = 0
        for name, shape in group_shapes.items():
            n = math.prod(shape)
            piece = -(-n // dp_size)  # every rank holds ceil(n / dp) values, the last one padded
            out[name] = torch.cat([f[offset : offset + piece] for f in parts])[:n].view(shape).clone()
            offset += piece
    return out


def _per_group_steps(flats: list[list[torch.Tensor]], shapes: list[dict]) -> dict[str, torch.Tensor]:
    return {name: parts[0].clone() for parts, group_shapes in zip(flats, shapes, strict=True) for name in group_shapes}


def tp_rank_tensors(
    tag_dir: Path, model: ModelConfig, stage: int, tp_rank: int, dp_size: int, key: str | None = None
) -> dict[str, torch.Tensor]:
    """One TP rank's fp32 weights (`key` None) or Adam state `key` (a MOMENTS key, or "step"): its
    slices of the split parameters, all replicated ones."""
    states = _model_states(tag_dir, stage, tp_rank)
    if stage == 0:
        tensors = _zero0_tensors(states, model, key, tag_dir)
    else:
        shapes = states["param_shapes"]
        ranks = _optim_states(tag_dir, tp_rank, 1 if key == "step" else dp_size)  # steps: alike on every rank
        flats = _flat_groups(ranks, stage, key)
        if key == "step":
            tensors = _per_group_steps(flats, shapes)
        elif stage in (1, 2):
            tensors = _zero12_tensors(flats, shapes, tag_dir)
        else:
            tensors = _zero3_tensors(flats, shapes, dp_size)
    return with_tied_names(tensors, model)


def consolidate(
    tag_dir: Path, model: ModelConfig, stage: int, tp: int, world_size: int, key: str | None = None
) -> dict[str, torch.Tensor]:
    """The full fp32 state dict (`key` None) or Adam moment `key` of a complete checkpoint written
    by `world_size` ranks."""
    shards = [tp_rank_tensors(tag_dir, model, stage, rank, world_size // tp, key) for rank in range(tp)]
    return merge_state_dicts(shards, model) if tp > 1 else shards[0]
