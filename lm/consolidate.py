"""Full fp32 model weights from a DeepSpeed checkpoint of any ZeRO stage and tensor-parallel size.

Where the weights live in a DeepSpeed checkpoint (one `mp_rank_XX` per TP rank):
- ZeRO-0: the module state dict in `mp_rank_XX_model_states.pt`.
- ZeRO-1/2: the fp32 master weights, flattened per parameter group and split evenly over the
  data-parallel ranks, in `zero_pp_rank_D_mp_rank_XX_optim_states.pt`; concatenated over D they
  give the group's parameters in the order of `param_shapes` (padding only at the end).
- ZeRO-3: every parameter split on its own into ceil(numel / dp) pieces, one per rank, each
  rank's pieces concatenated per group in `fp32_flat_groups`.
The stage is the one DeepSpeed ran (lm.checkpoint.layout_stage): ZeRO-1/2 on one data-parallel
rank write ZeRO-0's files. TP slices are then merged with the layout of lm.parallel
(`merge_state_dicts`). DeepSpeed's own `zero_to_fp32` covers TP = 1 only and unpickles arbitrary
objects; here every file is read with `torch.load(weights_only=True)`, allowing only the few
plain DeepSpeed classes its files contain (lm.engine.read_checkpoint_file).
"""

import math
from pathlib import Path

import torch

from core.errors import UserError
from lm import checkpoint as ckpt
from lm.config import ModelConfig, RunConfig
from lm.engine import read_checkpoint_file
from lm.model import embedding_names
from lm.parallel import merge_state_dicts
from lm.safe_load import load_safetensors


def with_tied_names(weights: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Both names of a tied output layer and token embedding (files keep one or both); an untied
    model's weights as they are."""
    if config.tie_embeddings:
        names = embedding_names(config)
        tied = next((weights[name] for name in names if name in weights), None)
        if tied is not None:
            weights.update(dict.fromkeys(names, tied))
    return weights


def load_model_weights(tag_dir: Path) -> dict[str, torch.Tensor]:
    """The full fp32 state dict of a checkpoint: DeepSpeed's (any ZeRO stage, any TP) or weights-only."""
    info = ckpt.read_marker(tag_dir)
    config = RunConfig.from_dict(info["config"], source=str(tag_dir / ckpt.COMPLETE_MARKER))
    ckpt.check_files(tag_dir, info)  # truncated or missing files, before anything is read
    if ckpt.is_weights_only(tag_dir):
        return with_tied_names(load_safetensors(tag_dir / ckpt.WEIGHTS_FILE), config.model)
    return consolidate(tag_dir, config.model, ckpt.layout_stage(info), config.train.tensor_parallel, info["world_size"])


def _model_states(tag_dir: Path, stage: int, tp_rank: int) -> dict:
    name = (
        f"zero_pp_rank_0_mp_rank_{tp_rank:02d}_model_states.pt"
        if stage == 3
        else f"mp_rank_{tp_rank:02d}_model_states.pt"
    )
    return read_checkpoint_file(tag_dir / name)


def _optim_states(tag_dir: Path, tp_rank: int, dp_size: int) -> list[dict]:
    return [
        read_checkpoint_file(tag_dir / f"zero_pp_rank_{d}_mp_rank_{tp_rank:02d}_optim_states.pt")[
            "optimizer_state_dict"
        ]
        for d in range(dp_size)
    ]


def _unflatten(flat: torch.Tensor, shapes: dict, where: Path) -> dict[str, torch.Tensor]:
    out, offset = {}, 0
    for name, shape in shapes.items():
        n = math.prod(shape)
        out[name] = flat[offset : offset + n].view(shape).clone()
        offset += n
    if offset > flat.numel():
        raise UserError(f"{where}: the saved partitions hold fewer values than the model's parameters")
    return out


def _zero12_weights(tag_dir: Path, shapes: list[dict], tp_rank: int, dp_size: int) -> dict[str, torch.Tensor]:
    ranks = _optim_states(tag_dir, tp_rank, dp_size)
    weights = {}
    for group, group_shapes in enumerate(shapes):
        flat = torch.cat([r["single_partition_of_fp32_groups"][group] for r in ranks])
        weights.update(_unflatten(flat, group_shapes, tag_dir))
    return weights


def _zero3_weights(tag_dir: Path, shapes: list[dict], tp_rank: int, dp_size: int) -> dict[str, torch.Tensor]:
    ranks = _optim_states(tag_dir, tp_rank, dp_size)
    weights = {}
    for group, group_shapes in enumerate(shapes):
        flats = [r["fp32_flat_groups"][group] for r in ranks]
        offset = 0
        for name, shape in group_shapes.items():
            n = math.prod(shape)
            piece = -(-n // dp_size)  # every rank holds ceil(n / dp) values, the last one padded
            weights[name] = torch.cat([f[offset : offset + piece] for f in flats])[:n].view(shape).clone()
            offset += piece
    return weights


def tp_rank_weights(
    tag_dir: Path, model: ModelConfig, stage: int, tp_rank: int, dp_size: int
) -> dict[str, torch.Tensor]:
    """One TP rank's fp32 weights (its slices of the split parameters, all replicated ones)."""
    states = _model_states(tag_dir, stage, tp_rank)
    if stage == 0:
        weights = {k: v.float() for k, v in states["module"].items()}
    elif stage in (1, 2):
        weights = _zero12_weights(tag_dir, states["param_shapes"], tp_rank, dp_size)
    else:
        weights = _zero3_weights(tag_dir, states["param_shapes"], tp_rank, dp_size)
    return with_tied_names(weights, model)


def consolidate(tag_dir: Path, model: ModelConfig, stage: int, tp: int, world_size: int) -> dict[str, torch.Tensor]:
    """The full fp32 state dict of a complete checkpoint written by `world_size` ranks."""
    shards = [tp_rank_weights(tag_dir, model, stage, rank, world_size // tp) for rank in range(tp)]
    return merge_state_dicts(shards, model) if tp > 1 else shards[0]
