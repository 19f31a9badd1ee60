"""Which process of a job this is, as each launcher tells it, decided in one place.

A rank learns its place from its launcher's environment: torchrun and the deepspeed launcher set
RANK / WORLD_SIZE / LOCAL_RANK, Open MPI and MPICH (Hydra) their own names, SLURM's `srun` its
SLURM_* variables. Every "am I rank 0" question of the project (who prints an error, who writes
a file) is answered by `launcher_rank`, so an `srun`-started job reports an error once, not once
per task.
"""

import os
import socket
from dataclasses import dataclass


@dataclass(frozen=True)
class LauncherVariables:
    """How one launcher names a process's rank, the world size, and the same within a node."""

    launcher: str
    rank: str
    size: str
    local_rank: str
    local_size: str


# In order of precedence: torch's own names win, since torchrun and the deepspeed launcher set
# them for their children even when they themselves were started by mpirun or srun.
LAUNCHERS = (
    LauncherVariables("torch", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"),
    LauncherVariables(
        "Open MPI",
        "OMPI_COMM_WORLD_RANK",
        "OMPI_COMM_WORLD_SIZE",
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "OMPI_COMM_WORLD_LOCAL_SIZE",
    ),
    LauncherVariables("MPICH", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
    LauncherVariables("SLURM", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE"),
)


def started_by() -> LauncherVariables | None:
    """The launcher whose variables this process carries, or None for a lone process."""
    return next((v for v in LAUNCHERS if v.rank in os.environ), None)


def launcher_rank() -> int:
    """This process's global rank as its launcher numbered it (0 for a lone process)."""
    found = started_by()
    return int(os.environ[found.rank]) if found else 0


def launcher_world_size() -> int:
    """How many processes the launcher started (1 for a lone process)."""
    found = started_by()
    return int(os.environ.get(found.size, "1")) if found else 1


def launcher_local_size() -> int:
    """How many processes of the job share this node (the deepspeed launcher says LOCAL_SIZE)."""
    found = started_by()
    if found is None:
        return 1
    return int(os.environ.get(found.local_size) or os.environ.get("LOCAL_SIZE") or launcher_world_size())


def is_rank_zero() -> bool:
    return launcher_rank() == 0


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now (for a rendezvous on this machine)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
