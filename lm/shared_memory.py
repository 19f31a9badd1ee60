"""DeepSpeed's shared-memory all-reduce on the CPU: keep it from leaking RAM in /dev/shm.

When every rank of a CPU job is on one machine (the deepspeed launcher's LOCAL_SIZE equals the
world size), DeepSpeed's process-group set-up has each rank create
`/dev/shm/deepspeed_allreduce_buffer_{uid}_{MASTER_ADDR}_{MASTER_PORT}_{rank}` (69 MB) and map
every other rank's. Nothing ever unlinks them, so each run, finished, failed or killed, leaves
its ranks' files behind, holding RAM until the machine reboots.

The buffers serve only `deepspeed.comm.inference_all_reduce` (DeepSpeed-Inference's layers);
training reduces over gloo and never calls it. lm.distributed does not even build the extension
that makes them (`without_shm_extension`); should another version or path load it anyway:
- `without_shm_all_reduce()` hides LOCAL_SIZE while the process group is set up: no buffer is made;
- `release_own_segment(rank)` unlinks this rank's buffer should one exist anyway (another DeepSpeed
  version, another trigger): once every rank has mapped every buffer (after set-up and a barrier)
  a mapping outlives its file's name, and the memory goes back when the last rank exits, even by
  SIGKILL;
- `remove_stale_segments()` deletes buffers of earlier runs that no live process maps.
"""

import contextlib
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

SHM_DIR = Path("/dev/shm")
PREFIX = "deepspeed_allreduce_buffer_"
# A starting run creates its buffer and maps it a moment later; a file this young may be in that
# moment, so it is never taken for stale.
STALE_AFTER_S = 60.0


def segment_name(rank: int) -> str:
    """The name DeepSpeed's shm.cpp gives rank `rank`'s buffer in this job."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return f"{PREFIX}{os.getuid()}_{addr}_{port}_{rank}"


@contextlib.contextmanager
def without_shm_all_reduce() -> Iterator[None]:
    """Set up the process group without DeepSpeed's shared-memory all-reduce (it reads LOCAL_SIZE
    once, there); LOCAL_SIZE is back afterwards for everything else that reads it."""
    saved = os.environ.pop("LOCAL_SIZE", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["LOCAL_SIZE"] = saved


def release_own_segment(rank: int) -> None:
    """Unlink this rank's buffer, if DeepSpeed made one; call once every rank has mapped them all."""
    (SHM_DIR / segment_name(rank)).unlink(missing_ok=True)


def mapped_segments(pids: Iterable[int] | None = None) -> set[str]:
    """Names of the buffers that the processes `pids` map (default: every live process whose maps
    we may read)."""
    held = set()
    files = Path("/proc").glob("[0-9]*/maps") if pids is None else (Path(f"/proc/{pid}/maps") for pid in pids)
    for maps in files:
        try:
            text = maps.read_text()
        except OSError:  # the process ended, or is not ours to read
            continue
        for line in text.splitlines():
            found = line.find(str(SHM_DIR / PREFIX))
            if found >= 0:
                held.add(Path(line[found:].removesuffix(" (deleted)")).name)
    return held


def remove_stale_segments() -> list[Path]:
    """Delete this user's buffers that no live process maps and that are older than STALE_AFTER_S."""
    mine = sorted(SHM_DIR.glob(f"{PREFIX}{os.getuid()}_*")) if SHM_DIR.is_dir() else []
    if not mine:
        return []
    held, now, removed = mapped_segments(), time.time(), []
    for path in mine:
        try:
            if path.name in held or now - path.stat().st_mtime < STALE_AFTER_S:
                continue
            path.unlink()
        except OSError:  # gone meanwhile, or not ours to delete
            continue
        removed.append(path)
    return removed
