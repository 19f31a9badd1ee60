"""Which of DeepSpeed's shared-memory buffers in /dev/shm this test session's runs made.

Other jobs on the machine make such files too, so a file counts as this session's only when a
process descended from this pytest maps it. A thread looks at each new file while it is young:
a run maps its buffers from its set-up until it exits (seconds at least), so a buffer a run
leaves behind is seen mapped by it first. Files there before the session are never ours.
"""

import os
import threading
import time
from pathlib import Path

from lm.shared_memory import PREFIX, SHM_DIR, mapped_segments

WATCH_FOR_S = 10.0  # how long a new, still unattributed file is looked at again


def descendants(root: int) -> set[int]:
    """Process ids of `root`'s children, their children, and so on."""
    parent = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        except (OSError, IndexError):
            continue
        parent[int(stat.parent.name)] = int(fields[1])
    found, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, ppid in parent.items() if ppid in frontier} - found
        found |= frontier
    return found


class SegmentWatch:
    """Watches /dev/shm for the session: `left_behind()` are this session's buffers still there."""

    def __init__(self, interval_s: float = 1.0):
        self.interval_s = interval_s
        self.before = {p.name for p in SHM_DIR.glob(PREFIX + "*")}
        self.first_seen: dict[str, float] = {}
        self.ours: set[str] = set()
        self.lock = threading.Lock()  # the watcher and the tests both poll
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.watch, daemon=True, name="shm-watch")

    def watch(self) -> None:
        while not self.stop.wait(self.interval_s):
            self.poll()

    def poll(self) -> None:
        with self.lock:
            now = time.monotonic()
            for path in SHM_DIR.glob(PREFIX + "*"):
                self.first_seen.setdefault(path.name, now)
            young = {n for n, t in self.first_seen.items() if now - t < WATCH_FOR_S} - self.ours - self.before
            if young:
                self.ours |= young & mapped_segments(descendants(os.getpid()))

    def left_behind(self) -> list[str]:
        self.poll()
        return sorted(n for n in self.ours if (SHM_DIR / n).exists())
