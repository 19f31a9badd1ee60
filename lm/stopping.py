"""Ending a run cleanly on a signal (`train.save_on_signal`): checkpoint the step reached, exit 0.

A scheduler announces the end of a job with a signal (SLURM: SIGTERM at a preemption or the time
limit, or the `--signal` of the job script, SIGUSR1 here), often to one process only. On every
rank such a signal only notes itself (`StopSignals`: the first one wins). At each step boundary
the ranks agree on it (`StopAgreement`): every rank reaches the same decision at the same step,
saves the same checkpoint and leaves the loop, so the collectives of the save never wait for a
rank that went on training.

The agreement is one all-reduce per step of a CPU integer over a gloo group of its own, so it
never waits for the GPU's stream; it is started at one boundary and read at the next, so it
overlaps a whole step and costs the loop next to nothing: a signal noted during step k stops the
run after step k + 1.

`stop_with_parent` is the other half of not leaving ranks behind: a rank whose launcher dies,
even by SIGKILL, is sent SIGTERM by the kernel and stops the same way.
"""

import ctypes
import os
import signal

import torch
import torch.distributed as dist

PR_SET_PDEATHSIG = 1  # linux/prctl.h


class StopSignals:
    """Handlers, while in the `with` block, for the stop signals that only note the first one.

    A second signal changes nothing: the flag is already set, so a checkpoint being written when it
    comes is finished. SIGINT, if listed, is the exception: a second Ctrl-C raises KeyboardInterrupt
    as usual, abandoning the save (a checkpoint without its marker is never resumed from).
    Signals not listed keep their handlers: an unlisted SIGINT raises KeyboardInterrupt at once.
    """

    def __init__(self, names: list[str]):
        self.signals = [signal.Signals[name] for name in names]
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, object] = {}

    def __enter__(self) -> "StopSignals":
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._note)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _note(self, signum: int, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum)
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt


class StopAgreement:
    """Which stop signal, if any, the ranks agree ends the run at this step boundary.

    Call `at_boundary()` once per optimizer step on every rank. It reads the all-reduce started at
    the previous boundary (the largest signal number any rank had noted then) and starts the next
    one with what this rank has noted since. Without `signals` (none listed, or a caller that runs
    the loop itself) it does nothing and never stops the run.
    """

    def __init__(self, signals: StopSignals | None):
        self.signals = signals if signals is not None and signals.signals else None
        # A group of its own: a CPU tensor under NCCL, and no interleaving with the loop's collectives.
        self.group = dist.new_group(backend="gloo") if self.signals is not None else None
        self.flag = torch.zeros(1, dtype=torch.int32)
        self.pending = None

    def at_boundary(self) -> signal.Signals | None:
        if self.signals is None:
            return None
        if self.pending is not None:
            self.pending.wait()  # started a step ago: long done, no device involved
            if self.flag.item():
                self.pending = None  # decided alike everywhere: no rank starts another
                return signal.Signals(int(self.flag.item()))
        self.flag = torch.tensor([self.signals.received or 0], dtype=torch.int32)
        self.pending = dist.all_reduce(self.flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        return None

    def finish(self) -> None:
        """Wait for the all-reduce still in flight at the end of the loop (every rank started it)."""
        if self.pending is not None:
            self.pending.wait()
            self.pending = None


def stop_with_parent(sig: signal.Signals = signal.SIGTERM) -> None:
    """Ask the kernel for `sig` when the process that started this one dies (Linux; elsewhere nothing).

    Only for ranks a launcher process started (the deepspeed launcher, torchrun: LOCAL_RANK is
    set): their launcher dying, even by SIGKILL, means nobody will stop them. A process started from
    a shell keeps running when the shell goes (nohup).

    A launcher that died before this call left an orphan already: that case is the owning
    launcher's (launch.processes), which stops every process left in its tree.
    """
    if "LOCAL_RANK" in os.environ and os.uname().sysname == "Linux":
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)  # refused (a sandbox): nothing lost
