"""Ranks for multi-node prep: mpi4py when started by an MPI launcher, else a single rank.

Every rank runs the same program. The few steps only one rank may do (checking the output
directory, training the tokenizer, assembling the shards) run on rank 0 and their outcome
is broadcast, so a user error there reaches every rank as the same one-line error instead
of leaving the others waiting in a barrier forever.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

from core.errors import UserError

T = TypeVar("T")
# Set by Open MPI, MPICH / Intel MPI (PMI), PMIx-based launchers and MVAPICH.
_MPI_ENV = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MV2_COMM_WORLD_SIZE")


class Ranks:
    """One process on its own: rank 0 of 1. `MPIRanks` is the same over MPI."""

    rank, size = 0, 1

    def barrier(self) -> None:
        pass

    def bcast(self, obj: Any) -> Any:
        return obj

    def allgather(self, obj: Any) -> list[Any]:
        return [obj]

    def abort(self) -> None:
        raise SystemExit(1)

    def on_rank0(self, fn: Callable[[], T]) -> T:
        """Run fn on rank 0 only; every rank returns its result or raises its UserError."""
        outcome: tuple[str | None, Any] = (None, None)
        if self.rank == 0:
            try:
                outcome = (None, fn())
            except UserError as e:
                outcome = (str(e), None)
        error, result = self.bcast(outcome)
        if error is not None:
            raise UserError(error)
        return result

    def on_all(self, fn: Callable[[], T]) -> T:
        """Run fn on every rank; if any rank meets a UserError, all raise the first one."""
        try:
            result, error = fn(), None
        except UserError as e:
            result, error = None, str(e)
        errors = [e for e in self.allgather(error) if e is not None]
        if errors:
            raise UserError(errors[0])
        return result


class MPIRanks(Ranks):
    def __init__(self, comm):
        self.comm = comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()

    def barrier(self) -> None:
        self.comm.Barrier()

    def bcast(self, obj: Any) -> Any:
        return self.comm.bcast(obj, root=0)

    def allgather(self, obj: Any) -> list[Any]:
        return self.comm.allgather(obj)

    def abort(self) -> None:
        # A crash on one rank must end the job; the others would wait in a collective.
        sys.stderr.flush()
        self.comm.Abort(1)


def under_mpi_launcher() -> bool:
    return any(name in os.environ for name in _MPI_ENV)


def current(force_mpi: bool = False) -> Ranks:
    """MPI ranks if an MPI launcher started us (or force_mpi), else a single rank."""
    if not (force_mpi or under_mpi_launcher()):
        return Ranks()
    try:
        from mpi4py import MPI
    except ImportError:
        raise UserError(
            "started by an MPI launcher (or --mpi) but mpi4py is not installed: pip install mpi4py"
        ) from None
    return MPIRanks(MPI.COMM_WORLD)


def run_guarded(ranks: Ranks, fn: Callable[[], int]) -> int:
    """Run fn; on an unexpected exception under several ranks, print it and abort the job."""
    if ranks.size == 1:
        return fn()
    try:
        return fn()
    except UserError:
        raise
    except BaseException:
        print(f"rank {ranks.rank} failed:", file=sys.stderr)
        traceback.print_exc()
        ranks.abort()
        raise
