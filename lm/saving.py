"""Writing a checkpoint: every rank's files, then the marker that makes it complete.

The layout (tag directories, `complete.json`, retention, RNG files) is lm.checkpoint's; the
DeepSpeed files are the engine's (lm.engine). This module orders them so that a checkpoint is
marked complete only once every rank's files are on disk, and so that a save that fails (a full
disk, an I/O error, a permission) ends the run on every rank alike:

1. every rank writes its files; a failed write is recorded, not raised (lm.engine.GuardedWrites,
   lm.checkpoint.write_tensors), so no rank leaves DeepSpeed's collectives early;
2. the ranks agree whether any write failed (one all-reduce; the messages only then);
3. rank 0 writes the marker, then `latest`, and the ranks agree again.
On a failure rank 0 removes the new directory, and every rank raises the same UserError naming
the directory, the bytes needed and the last complete checkpoint: nothing points at a partial
checkpoint, and the previous one is untouched.
"""

import secrets
from pathlib import Path

import torch
import torch.distributed as dist

from core.errors import UserError
from lm import checkpoint as ckpt
from lm.config import RunConfig
from lm.distributed import World
from lm.engine import Engine
from lm.numerics import weights_are_finite
from lm.plan import checkpoint_size, free_bytes, two_checkpoints_fit
from lm.resume import last_checkpoint_hint


def save_checkpoint(
    engine: Engine, run_dir: Path, step: int, config: RunConfig, world: World, skipped_steps: int = 0
) -> Path:
    """Checkpoint `step` on every rank; marked complete only once every rank's files are on disk."""
    if not weights_are_finite(engine.local_weights(), world.device):  # the last line of defence
        raise UserError(f"non-finite weights at step {step}: checkpoint not saved ({last_checkpoint_hint(run_dir)})")
    tag_dir = ckpt.checkpoint_root(run_dir) / ckpt.tag_for_step(step)
    stamp = {"step": step, "save_id": shared_save_id()}
    error = engine.save(tag_dir, {"step": step, "skipped_steps": skipped_steps}, stamp)
    rng = ckpt.rng_file(tag_dir, world.rank)
    error = error or attempt(lambda: ckpt.save_rng_state(tag_dir, world.rank, stamp), rng)
    error = error or attempt(lambda: ckpt.sync_directory(tag_dir), tag_dir)
    fail_together(error, tag_dir, config, world)  # every rank's files are on disk past this point
    if world.is_main:
        info = {
            "step": step,
            "batches_consumed": step,
            "world_size": world.world_size,
            "zero_layout": engine.stage,  # whose files these are (lm.checkpoint.layout_stage)
            # DeepSpeed keeps a client state key of this name for itself on load: the marker holds ours.
            "skipped_steps": skipped_steps,
            "save_id": stamp["save_id"],
            "config": config.to_dict(),
        }
        error = attempt(lambda: ckpt.write_marker(tag_dir, info), tag_dir / ckpt.COMPLETE_MARKER)
        error = error or attempt(lambda: ckpt.write_latest(run_dir, tag_dir.name), ckpt.checkpoint_root(run_dir))
    fail_together(error, tag_dir, config, world)
    if world.is_main:
        try:
            ckpt.apply_retention(run_dir, config.train.keep_last)
        except OSError as exc:  # the new checkpoint is complete; an old one outstays its welcome
            print(f"warning: retention (train.keep_last) could not remove a checkpoint: {exc}", flush=True)
    return tag_dir


def shared_save_id() -> str:
    """A token of this save, the same on every rank (rank 0's): stamped into every file of it."""
    token = [secrets.token_hex(8)]
    dist.broadcast_object_list(token, src=0)
    return token[0]


def attempt(write, path: Path) -> str | None:
    """Run `write`; its OSError, in words, or None."""
    try:
        write()
    except OSError as exc:
        return ckpt.write_failure(exc, path)
    return None


def first_error(error: str | None, world: World) -> tuple[int, str] | None:
    """(rank, message) of the lowest rank whose write failed, the same on every rank; None when
    none did. A collective: every rank calls it."""
    failed = torch.tensor([0.0 if error is None else 1.0], device=world.device)
    dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    if failed.item() == 0:
        return None
    errors = [None] * world.world_size
    dist.all_gather_object(errors, error)
    return next((rank, e) for rank, e in enumerate(errors) if e is not None)


def fail_together(error: str | None, tag_dir: Path, config: RunConfig, world: World) -> None:
    """If a write of checkpoint `tag_dir` failed on any rank: rank 0 removes the directory and every
    rank raises one UserError saying what failed, what it takes, and what is left to resume from."""
    found = first_error(error, world)
    if found is None:
        return
    if world.is_main:
        ckpt.remove_checkpoint(tag_dir)
    dist.barrier()  # the partial checkpoint is gone before anyone reports
    rank, message = found
    run_dir = ckpt.run_dir_of(tag_dir)
    where = tag_dir.parent
    needed = checkpoint_need(run_dir, config, world.world_size)
    free = free_bytes(where)
    raise UserError(
        f"cannot write checkpoint {tag_dir.name} in {where} (rank {rank}, {message}); it needs about "
        f"{size_text(needed)}, {size_text(free)} free; {last_checkpoint_hint(run_dir)}"
    )


def checkpoint_need(run_dir: Path, config: RunConfig, world_size: int) -> int:
    """Bytes one checkpoint of the run takes: the last complete one's, else lm.plan's estimate."""
    found = ckpt.complete_checkpoints(run_dir)
    return ckpt.size_on_disk(found[-1]) if found else checkpoint_size(config, world_size)


def warn_if_short_of_space(run_dir: Path, config: RunConfig, world: World) -> None:
    """Rank 0's warning, before the first save, when train.out_dir's filesystem has room for less
    than two checkpoints (the next one is written before an old one is deleted)."""
    if not world.is_main:
        return
    needed, free = checkpoint_need(run_dir, config, world.world_size), free_bytes(run_dir)
    if not two_checkpoints_fit(needed, free):
        print(
            f"warning: {run_dir} has {size_text(free)} free, less than two checkpoints of about "
            f"{size_text(needed)}: a save may fail for lack of space",
            flush=True,
        )


def size_text(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"
