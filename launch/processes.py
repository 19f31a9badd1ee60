"""Owning the processes of a run: start the launcher, pass stop signals to its ranks, and return
only once every process it started is gone.

The deepspeed runner starts `deepspeed.launcher.launch`, which starts the ranks. Left alone, a
signal to the runner kills it and leaves launch.py and the ranks training as orphans, and a
signal to launch.py makes it SIGTERM every rank, SIGKILL them 30 s later (mid-save) and exit 1.
So `run_owned`:

- starts the launcher in a session of its own, so that a terminal's Ctrl-C reaches this process
  only, and makes this process the child subreaper, so that orphans of the tree re-parent to it;
- passes SIGINT, SIGTERM and SIGUSR1 to the rank processes only (the topmost descendants whose
  environment has LOCAL_RANK): they stop by themselves (lm.stopping: checkpoint, exit 0), and
  launch.py, seeing every rank exit 0, exits 0 too. Before any rank exists the launcher gets it;
- when the launcher ends while processes of its tree remain (a user killed the runner), sends
  SIGTERM to the ranks left (to every process left, if none is a rank), so they save and stop;
- waits for every descendant, reaping the adopted ones, and once `grace` seconds have passed since
  a stop began, SIGKILLs whatever is left, naming it.
"""

import ctypes
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import psutil

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
GRACE_SECONDS = 120.0  # for the ranks to save and exit once asked to stop
POLL_SECONDS = 0.2
PR_SET_CHILD_SUBREAPER, PR_GET_CHILD_SUBREAPER = 36, 37  # linux/prctl.h
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE")


@dataclass(frozen=True)
class Ended:
    """How an owned launcher ended: its exit status (128 + N for a signal N), and the stop signal
    this process passed on, if any."""

    status: int
    signal: signal.Signals | None


def run_owned(command: list[str], env: dict[str, str], label: str = "lm", grace: float = GRACE_SECONDS) -> Ended:
    """Run a launcher `command` as the owned head of its process tree (see the module's docstring)."""
    tree = OwnedTree(label, grace, others={p.pid for p in safe_children(psutil.Process())})
    previous = {sig: signal.signal(sig, tree.note) for sig in STOP_SIGNALS}  # before the start: none is missed
    was_subreaper = set_child_subreaper(True)
    try:
        # Only the ranks carry rank variables, however this process was started: that is how they are found.
        clean = {k: v for k, v in env.items() if k not in RANK_VARIABLES}
        tree.runner = subprocess.Popen(command, env=clean, start_new_session=True)
        return tree.wait()
    finally:
        set_child_subreaper(was_subreaper)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class OwnedTree:
    """The launcher, and everything under it, until all of it has ended."""

    def __init__(self, label: str, grace: float, others: set[int]):
        self.label, self.grace = label, grace
        self.others = others  # this process's children from before: not of the tree, not ours to reap
        self.runner: subprocess.Popen | None = None
        self.noted: list[signal.Signals] = []  # by the handler; acted on by the loop, outside it
        self.received: signal.Signals | None = None  # the first stop signal this process got
        self.stop_began: float | None = None
        self.status: int | None = None

    def note(self, signum: int, frame) -> None:
        self.noted.append(signal.Signals(signum))

    def wait(self) -> Ended:
        while True:
            while self.noted:
                sig = self.noted.pop(0)
                self.received = self.received or sig
                self.stop(sig)
            if self.status is None and self.runner.poll() is not None:
                code = self.runner.returncode
                self.status = 128 - code if code < 0 else code
                left = self.descendants()
                if left:
                    self.say(f"the launcher ended (status {self.status}) with {len(left)} process(es) left")
                    self.stop(signal.SIGTERM, self.rank_processes() or left)
            self.reap_adopted()
            left = self.descendants()
            if self.status is not None and not left:
                return Ended(self.status, self.received)
            if self.stop_began is not None and time.monotonic() - self.stop_began > self.grace:
                self.kill(left)
            time.sleep(POLL_SECONDS)

    def stop(self, sig: signal.Signals, targets: list[psutil.Process] | None = None) -> None:
        """Send `sig` to the ranks (or `targets`); before any rank exists, to the launcher."""
        if targets is None:
            targets = self.rank_processes() or ([psutil.Process(self.runner.pid)] if self.status is None else [])
        sent = [p.pid for p in targets if send(p, sig)]
        if sent:
            self.say(f"{sig.name} to process(es) {', '.join(map(str, sent))}; waiting for them to end")
        if self.stop_began is None:
            self.stop_began = time.monotonic()

    def kill(self, left: list[psutil.Process]) -> None:
        for p in left:
            if send(p, signal.SIGKILL):
                self.say(f"killed process {p.pid} ({describe(p)}): still running {self.grace:.0f} s after the stop")
        self.stop_began = time.monotonic()  # the kernel reaps them; give it a moment before trying again

    def say(self, line: str) -> None:
        print(f"{self.label}: {line}", file=sys.stderr, flush=True)

    def children(self) -> list[psutil.Process]:
        """This process's children of the tree: the launcher and the orphans adopted from under it."""
        return [p for p in safe_children(psutil.Process()) if p.pid not in self.others]

    def descendants(self) -> list[psutil.Process]:
        """Every process of the tree still there (zombies awaiting their parent included: not gone yet)."""
        return [q for p in self.children() for q in [p, *safe_children(p, recursive=True)]]

    def rank_processes(self) -> list[psutil.Process]:
        """The topmost processes of the tree whose environment has LOCAL_RANK: the ranks a launcher
        started (their own children, data loader workers say, inherit it and are theirs to stop)."""
        found, level = [], self.children()
        while level:
            below = []
            for p in level:
                try:
                    (found if "LOCAL_RANK" in p.environ() else below).append(p)
                except psutil.Error:  # gone, a zombie, or not ours to read
                    continue
            level = [c for p in below for c in safe_children(p)]
        return found

    def reap_adopted(self) -> None:
        """Collect the exit status of orphans that re-parented to this process (the runner is Popen's)."""
        for child in self.children():
            if child.pid != self.runner.pid:
                try:
                    os.waitpid(child.pid, os.WNOHANG)
                except ChildProcessError:
                    pass


def safe_children(p: psutil.Process, recursive: bool = False) -> list[psutil.Process]:
    try:
        return p.children(recursive=recursive)
    except psutil.Error:
        return []


def send(p: psutil.Process, sig: signal.Signals) -> bool:
    try:
        if p.status() == psutil.STATUS_ZOMBIE:
            return False
        p.send_signal(sig)
        return True
    except psutil.Error:
        return False


def describe(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())[:120]
    except psutil.Error:
        return "?"


def set_child_subreaper(on: bool) -> bool:
    """Make this process the one orphans below it re-parent to (Linux); returns the previous setting."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None)
    previous = ctypes.c_int(0)
    libc.prctl(PR_GET_CHILD_SUBREAPER, ctypes.byref(previous), 0, 0, 0)
    libc.prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0)
    return bool(previous.value)
