"""A new run removes DeepSpeed shared-memory buffers that earlier runs left, and only those.

Runs themselves leave none (the session-wide `shm_segments` check and test_faults.py's runs show
it); this is the clean-up of what older versions or other programs left behind.
"""

import mmap
import os
import time

import pytest

from lm.shared_memory import PREFIX, SHM_DIR, remove_stale_segments

pytestmark = pytest.mark.skipif(not SHM_DIR.is_dir(), reason="no /dev/shm here")


def buffer(tag: str, age_s: float):
    """A small file named like one of this user's buffers, last written `age_s` seconds ago."""
    path = SHM_DIR / f"{PREFIX}{os.getuid()}_test-{os.getpid()}-{tag}_29500_0"
    path.write_bytes(b"\0" * mmap.PAGESIZE)
    then = time.time() - age_s
    os.utime(path, (then, then))
    return path


def test_only_old_buffers_that_no_live_process_maps_are_removed():
    stale, young, held = buffer("stale", 3600), buffer("young", 0), buffer("held", 3600)
    try:
        with open(held, "r+b") as f, mmap.mmap(f.fileno(), mmap.PAGESIZE):  # a live run's buffer
            removed = remove_stale_segments()
            assert stale in removed and not stale.exists()
            assert young.exists() and held.exists()  # perhaps a run in its set-up; a run using it
    finally:
        for path in (stale, young, held):
            path.unlink(missing_ok=True)
