"""Process-group set-up for every way a run can start.

A run may be started by the deepspeed launcher, torchrun, mpirun, or as a plain `python` process.
The first three set (or let DeepSpeed discover) RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT. A plain process sets none of them, and DeepSpeed would then try MPI discovery and pick
a non-loopback address; so a lone process gets an explicit single-rank loopback world instead.
"""

import os
import socket
from dataclasses import dataclass

import torch

DIST_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
MPI_RANK_VARIABLES = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")


@dataclass(frozen=True)
class World:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def select_accelerator() -> None:
    """Tell DeepSpeed to use the CPU when there is no GPU (must precede `import deepspeed`)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def prepare_environment() -> None:
    """Environment that must be set before deepspeed is imported."""
    select_accelerator()
    started_by_mpi = any(v in os.environ for v in MPI_RANK_VARIABLES)
    if not started_by_mpi and not all(v in os.environ for v in DIST_VARIABLES):
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))


def init_distributed() -> World:
    """Join (or create) the process group with DeepSpeed's helper: gloo on CPU, NCCL on GPUs."""
    prepare_environment()
    import deepspeed

    cuda = torch.cuda.is_available()
    if cuda and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # before NCCL picks a device
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", auto_mpi_discovery=True)
    rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        # Several CPU ranks on one machine must share the cores, or they thrash each other.
        if "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))
    return World(rank, world_size, local_rank, device)


def quiet_deepspeed() -> None:
    """DeepSpeed logs every step's bookkeeping at INFO; keep warnings only."""
    import logging
    import warnings

    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)
    # DeepSpeed's ZeRO calls a collective that torch has deprecated; not ours to fix.
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)
