"""Writing a checkpoint: every rank's files, then the marker that makes it complete.

The layout (tag directories, `complete.json`, retention, RNG files) is lm.checkpoint's; the
DeepSpeed files are the engine's (lm.engine). This module orders them so that a checkpoint is
marked complete only once every rank's files are on disk.
"""

from pathlib import Path

import torch.distributed as dist

from core.errors import UserError
from lm import checkpoint as ckpt
from lm.config import RunConfig
from lm.distributed import World
from lm.engine import Engine
from lm.numerics import weights_are_finite
from lm.resume import last_checkpoint_hint


def save_checkpoint(
    engine: Engine, run_dir: Path, step: int, config: RunConfig, world: World, skipped_steps: int = 0
) -> Path:
    """Checkpoint `step` on every rank; marked complete only once every rank's files are on disk."""
    if not weights_are_finite(engine.local_weights(), world.device):  # the last line of defence
        raise UserError(f"non-finite weights at step {step}: checkpoint not saved ({last_checkpoint_hint(run_dir)})")
    tag_dir = ckpt.checkpoint_root(run_dir) / ckpt.tag_for_step(step)
    engine.save(tag_dir, {"step": step, "skipped_steps": skipped_steps})
    ckpt.save_rng_state(tag_dir, world.rank)
    ckpt.sync_directory(tag_dir)
    dist.barrier()  # every rank's files are on disk before the checkpoint is marked complete
    if world.is_main:
        info = {
            "step": step,
            "batches_consumed": step,
            "world_size": world.world_size,
            "zero_layout": engine.stage,  # whose files these are (lm.checkpoint.layout_stage)
            # DeepSpeed keeps a client state key of this name for itself on load: the marker holds ours.
            "skipped_steps": skipped_steps,
            "config": config.to_dict(),
        }
        ckpt.write_marker(tag_dir, info)
        ckpt.apply_retention(run_dir, config.train.keep_last)
    dist.barrier()
    return tag_dir
