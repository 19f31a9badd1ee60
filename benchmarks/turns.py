"""Rows of a benchmark that take turns: each in its own processes, one interval of steps at a time.

This machine's speed drifts by 10-20% over seconds (a shared 2-core VM: one 2048² matmul loop
ran at 100-151 GFLOP/s within a second). Rows measured one after another each get a different
spell of it, and their ratios scatter by more than the overheads being measured. Taking turns,
every row runs one interval (train_throughput's --interval steps) while the others wait, idle,
so a slow spell falls on all rows alike; each row is still its own fresh processes, with their
own set-up, and times only its own steps (the waits fall outside its intervals).

The coordinator (`Turns`) and each rank of a row (`Gate`) talk over two FIFOs per rank: a byte
on `go-R` starts the rank's next interval, a byte on `done-R` says the interval's steps are
timed. A row's last interval is handed back by its processes exiting. Both ends open the FIFOs
read-write, so neither blocks in open(); the coordinator waits with a timeout and gives up on a
row whose processes have exited early.
"""

import os
import select
import subprocess
import time
from pathlib import Path

TURNS_DIR = "BENCHMARK_TURNS_DIR"  # in a row's environment: the directory of its FIFOs


class Gate:
    """A rank's side of the turns: `next_turn()` before each interval; the last ends at exit."""

    def __init__(self, directory: Path, rank: int):
        self.go = os.open(directory / f"go-{rank}", os.O_RDWR)
        self.finished = os.open(directory / f"done-{rank}", os.O_RDWR)
        self.turns = 0

    @classmethod
    def from_environment(cls) -> "Gate | None":
        """This rank's gate when the benchmark takes turns, else None."""
        directory = os.environ.get(TURNS_DIR)
        return cls(Path(directory), int(os.environ.get("RANK", "0"))) if directory else None

    def next_turn(self) -> None:
        """Hand the last interval's turn back (if any), then wait for the next."""
        if self.turns:
            os.write(self.finished, b"d")
        os.read(self.go, 1)
        self.turns += 1


class Turns:
    """The coordinator: rows started with `environment(name, ranks)` run one interval each in turn."""

    def __init__(self, directory: Path, timeout: float = 3600.0):
        self.directory = directory
        self.timeout = timeout
        self.rows: dict[str, tuple[list[int], list[int]]] = {}  # name -> (go fds, done fds), one per rank

    def environment(self, name: str, ranks: int) -> dict[str, str]:
        """Variables for row `name`'s processes (`ranks` of them), whose FIFOs are made here."""
        row = self.directory / name
        row.mkdir(parents=True)
        fds: tuple[list[int], list[int]] = ([], [])
        for rank in range(ranks):
            for kind, opened in zip(("go", "done"), fds):
                os.mkfifo(row / f"{kind}-{rank}")
                opened.append(os.open(row / f"{kind}-{rank}", os.O_RDWR))
        self.rows[name] = fds
        return {TURNS_DIR: str(row)}

    def run(self, processes: dict[str, subprocess.Popen], intervals: int) -> None:
        """Let every row run `intervals` intervals, round-robin in the order of `processes`; the
        last one ends when the row's process exits. Raises if one fails or exits early."""
        for interval in range(intervals):
            for name, process in processes.items():
                go, done = self.rows[name]
                for fd in go:
                    os.write(fd, b"g")
                if interval == intervals - 1:
                    self._wait_exit(name, process)
                else:
                    for fd in done:
                        self._read(name, process, fd)

    def _read(self, name: str, process: subprocess.Popen, fd: int) -> None:
        deadline = time.monotonic() + self.timeout
        while not select.select([fd], [], [], 1.0)[0]:
            if process.poll() is not None:
                raise RuntimeError(f"row {name} exited (code {process.returncode}) before its turn was over")
            if time.monotonic() > deadline:
                raise RuntimeError(f"row {name} took more than {self.timeout:.0f} s for one interval")
        os.read(fd, 1)

    def _wait_exit(self, name: str, process: subprocess.Popen) -> None:
        if process.wait(timeout=self.timeout) != 0:
            raise RuntimeError(f"row {name} failed (exit code {process.returncode})")

    def close(self) -> None:
        for go, done in self.rows.values():
            for fd in go + done:
                os.close(fd)
        self.rows.clear()
