"""Process-group set-up for every way a run can start.

A run may be started by the deepspeed launcher or torchrun, which set RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT; by mpirun (Open MPI or MPICH), whose ranks carry the
MPI launcher's own variables instead; or as a plain `python` process, which has none. MPI ranks
get the torch variables from the launcher's, keeping a MASTER_ADDR / MASTER_PORT the user
exported (DeepSpeed's own MPI discovery would replace them with the first address of
`hostname -I`). Tasks started by `srun` read SLURM's variables, with rank 0 on the first node of
SLURM_JOB_NODELIST. A lone process gets an explicit single-rank loopback world. DeepSpeed's
shared-memory all-reduce, which training never uses, is kept out of /dev/shm (lm.shared_memory).
"""

import contextlib
import gc
import importlib
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from core.errors import UserError
from core.ranks import LAUNCHERS, free_port, launcher_local_size
from launch.hosts import expand_nodelist
from lm.shared_memory import release_own_segment, remove_stale_segments, without_shm_all_reduce

DIST_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
DEFAULT_MASTER_PORT = "29500"


@dataclass(frozen=True)
class World:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def select_accelerator() -> None:
    """Tell DeepSpeed to use the CPU when there is no GPU (must precede `import deepspeed`)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def mpi_master_address() -> str:
    """Rank 0's address, broadcast over MPI (needs mpi4py and an MPI library)."""
    try:
        from mpi4py import MPI
    except ImportError:
        raise UserError(
            "started by mpirun without MASTER_ADDR set: export MASTER_ADDR (mpirun -x MASTER_ADDR=...) "
            "or install mpi4py (pip install 'twicing-lm[mpi]')"
        ) from None
    comm = MPI.COMM_WORLD
    address = socket.gethostbyname(socket.gethostname()) if comm.Get_rank() == 0 else None
    return comm.bcast(address, root=0)


def prepare_environment() -> None:
    """Environment that must be set before deepspeed is imported."""
    select_accelerator()
    if all(v in os.environ for v in DIST_VARIABLES):
        return
    # torch's variables are incomplete: a job launcher (mpirun, srun) started this rank itself.
    found = next((v for v in LAUNCHERS if v.launcher != "torch" and v.rank in os.environ), None)
    if found is not None and found.launcher in ("Open MPI", "MPICH"):
        os.environ.update(
            RANK=os.environ[found.rank],
            WORLD_SIZE=os.environ[found.size],
            LOCAL_RANK=os.environ.get(found.local_rank, "0"),
            LOCAL_WORLD_SIZE=os.environ.get(found.local_size, os.environ[found.size]),
        )
        os.environ.setdefault("MASTER_PORT", DEFAULT_MASTER_PORT)
        if "MASTER_ADDR" not in os.environ:
            os.environ["MASTER_ADDR"] = mpi_master_address()
        return
    if found is not None and found.launcher == "SLURM" and found.size in os.environ:
        os.environ.update(
            RANK=os.environ[found.rank],
            WORLD_SIZE=os.environ[found.size],
            LOCAL_RANK=os.environ.get(found.local_rank, "0"),
        )
        if found.local_size in os.environ:
            os.environ.setdefault("LOCAL_WORLD_SIZE", os.environ[found.local_size])
        if "MASTER_ADDR" not in os.environ:
            os.environ["MASTER_ADDR"] = expand_nodelist(os.environ.get("SLURM_JOB_NODELIST", "localhost"))[0]
        # One port per job, so jobs sharing a node do not collide.
        os.environ.setdefault("MASTER_PORT", str(20000 + int(os.environ.get("SLURM_JOB_ID", "9500")) % 20000))
        return
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def check_master_port() -> None:
    """Rank 0 hosts the rendezvous on MASTER_PORT: say so clearly if this machine has it taken.

    (Under torchrun its agent already holds the port for the same purpose: nothing to check.)
    """
    address, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    if os.environ["RANK"] != "0" or "TORCHELASTIC_RUN_ID" in os.environ or address not in ("127.0.0.1", "localhost"):
        return
    with socket.socket() as s:
        try:
            s.bind((address, port))
        except OSError:
            raise UserError(
                f"MASTER_PORT {port} on {address} is already in use; "
                "choose another port (--master_port / --master-port)"
            ) from None


@contextlib.contextmanager
def without_shm_extension() -> Iterator[None]:
    """DeepSpeed's torch backend without its shared-memory all-reduce extension: not compiled or
    loaded; `inference_all_reduce` (DeepSpeed-Inference's, which we never call) falls back to torch's."""
    backend = importlib.import_module("deepspeed.comm.torch")  # `deepspeed.comm.torch` the attribute is torch

    build = backend.build_shm_op
    backend.build_shm_op = lambda: None
    try:
        yield
    finally:
        backend.build_shm_op = build


def init_distributed() -> World:
    """Join (or create) the process group with DeepSpeed's helper: gloo on CPU, NCCL on GPUs."""
    prepare_environment()
    if not torch.distributed.is_initialized():  # a process may start several runs in one group
        check_master_port()
        if os.environ.get("LOCAL_RANK", "0") == "0":  # before the rendezvous: no rank of ours has made one yet
            remove_stale_segments()
    import deepspeed

    cuda = torch.cuda.is_available()
    if cuda and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # before NCCL picks a device
    # Training never uses DeepSpeed's shared-memory all-reduce: no buffer (it would leak 69 MB per
    # rank, lm.shared_memory) and no build of its C++ extension (25 s on a 2-core machine, and a wait
    # on its lock for every process starting meanwhile).
    with without_shm_all_reduce(), without_shm_extension():
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", auto_mpi_discovery=False)
    rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    torch.distributed.barrier()  # every rank has mapped every rank's shm buffer, if DeepSpeed made them
    release_own_segment(rank)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        local_world = launcher_local_size()
        # Several CPU ranks on one machine must share the cores, or they thrash each other.
        threads = max(1, (os.cpu_count() or 1) // max(1, local_world))
        # Only a change of count: torch.set_num_threads also turns MKL's dynamic threading off
        # (mkl_set_dynamic(0)), and then every small GEMM runs on all threads; a lone rank that
        # set its own default count stepped 6-9% slower than a plain process (RESULTS.md).
        if "OMP_NUM_THREADS" not in os.environ and threads != torch.get_num_threads():
            torch.set_num_threads(threads)
    return World(rank, world_size, local_rank, device)


def close_distributed() -> None:
    """Leave the process group once every rank is done, at the end of a successful command.

    A process that exits with gloo's threads still running can abort while the interpreter tears
    them down ("terminate called without an active exception", a finished rank killed by SIGABRT).
    The barrier first: no rank closes its connections while another still talks over them.
    """
    if torch.distributed.is_initialized():
        gc.collect()  # DDP's reducer and DeepSpeed's engine sit in reference cycles that hold the groups
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
