"""Starting several training processes on this machine through the deepspeed launcher."""

import os
import sys

import torch

from core.ranks import free_port


def deepspeed_local_command(
    num_procs: int, module: str, module_args: list[str], master_port: int | None = None
) -> list[str]:
    """The deepspeed launcher invocation for `num_procs` ranks on this machine.

    On a CPU machine the launcher counts NUMA nodes as devices, so the process count is explicit.
    The launcher is run as a module of this interpreter so the right environment is used.
    """
    return [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus",
        str(num_procs),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(master_port or free_port()),
        "--module",
        module,
        *module_args,
    ]


def torchrun_local_command(num_procs: int, script_args: list[str]) -> list[str]:
    """torchrun (this interpreter's) for `num_procs` ranks of a script on this machine."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return [*torchrun, f"--nproc_per_node={num_procs}", *script_args]


def local_environment(num_procs: int) -> dict[str, str]:
    """Environment for local ranks: share the cores, keep traffic on loopback, pick the accelerator."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // num_procs)))
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    return env
