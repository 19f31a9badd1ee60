"""Start training on one or many nodes: the arguments of `lm launch`, the hostfile, the ranks'
environment and the deepspeed launcher's command line.

    lm launch --config CFG --nodes 'node[1-4]' --slots 8               # deepspeed launcher over ssh (pdsh)
    lm launch --config CFG --hostfile hosts --launcher openmpi
    lm launch --config CFG --slurm                                     # inside sbatch / salloc: srun
    lm launch --config CFG --mpi                                       # a PBS / Open MPI node file: mpirun
    lm launch --config CFG --nodes a,b --slots 8 --no-ssh --node-rank 0 --master-addr a   # run on every node

Before anything starts, lm.launcher validates the run config against the allocation: the world
size must split into TP groups, and train.batch_size into micro batches x accumulation x
data-parallel ranks. The hostfile and the environment every rank needs (`.deepspeed_env`: threads, sockets, accelerator,
master address) are written to TRAIN_OUT_DIR/launch/, then the deepspeed launcher runs
`lm.train`. --dry-run prints the files and the exact command and starts nothing. SIGINT, SIGTERM
and SIGUSR1 go to this node's ranks, and `lm launch` returns once none of them is left
(launch.processes): a SIGTERM ends the run with a checkpoint and status 0.
"""

import argparse
import os
import shlex
import sys
from pathlib import Path

from core.errors import UserError
from launch.hosts import Allocation, from_hostfile, from_mpi, from_nodes, from_slurm
from launch.processes import run_owned

LAUNCHERS = ("pdsh", "openmpi", "mpich", "slurm")
LOCAL_HOSTS = {"localhost", "127.0.0.1", os.uname().nodename}
# Variables every rank needs as the launching shell has them (prefixes end with "_").
FORWARDED = (
    "OMP_NUM_THREADS",
    "GLOO_SOCKET_IFNAME",
    "DS_ACCELERATOR",
    "TORCH_EXTENSIONS_DIR",
    "PYTHONPATH",
    "NCCL_",
    "CUDA_VISIBLE_DEVICES",
    "HF_HOME",
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="lm launch",
        description="Start training on one or many nodes (the deepspeed launcher).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n", 3)[3],
    )
    p.add_argument("--config", required=True, help="YAML run config")
    p.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="config override, passed on to lm.train"
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--nodes", help="node list, SLURM syntax allowed: 'gpu[01-04],cpu12'")
    source.add_argument("--hostfile", help="DeepSpeed hostfile: one 'host slots=N' line per node")
    source.add_argument("--slurm", action="store_true", help="the nodes of the current SLURM allocation")
    source.add_argument(
        "--mpi", action="store_true", help="the node file of the current MPI allocation (PBS_NODEFILE, ...)"
    )
    p.add_argument(
        "--slots", type=int, default=None, help="processes per node (GPUs per node); default 1, or SLURM's tasks"
    )
    p.add_argument(
        "--launcher",
        choices=LAUNCHERS,
        default=None,
        help="multi-node backend (default: slurm for --slurm, openmpi for --mpi, else pdsh)",
    )
    p.add_argument("--launcher-args", default="", help="extra arguments for the backend (mpirun, srun, pdsh)")
    p.add_argument(
        "--no-ssh", action="store_true", help="start this node's ranks only; run the same command on every node"
    )
    p.add_argument("--node-rank", type=int, default=None, help="with --no-ssh: this node's index in the node list")
    p.add_argument("--master-addr", default=None, help="address of rank 0 (default: the first node)")
    p.add_argument("--master-port", type=int, default=29500)
    p.add_argument("--resume", default=None, help="passed on to lm.train (auto, none or a path)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra environment for every rank")
    p.add_argument("--dry-run", action="store_true", help="print what would run, start nothing")
    args = p.parse_args(argv)
    if args.slots is not None and args.slots < 1:
        raise UserError(f"--slots must be positive, got {args.slots}")
    if args.no_ssh and args.node_rank is None:
        raise UserError("--no-ssh needs --node-rank (this node's index in the node list)")
    if args.node_rank is not None and not args.no_ssh:
        raise UserError("--node-rank only makes sense with --no-ssh")
    return args


def resolve_allocation(args) -> Allocation:
    if args.nodes:
        return from_nodes(args.nodes, args.slots or 1)
    if args.hostfile:
        return from_hostfile(args.hostfile)
    if args.slurm:
        return from_slurm(slots=args.slots)
    return from_mpi()


def rank_environment(args, master_addr: str) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if any(k == f or (f.endswith("_") and k.startswith(f)) for f in FORWARDED)
    }
    env.update(MASTER_ADDR=master_addr, MASTER_PORT=str(args.master_port))
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--env {item!r} is not of the form KEY=VALUE")
        env[key] = value
    return env


def build_command(args, allocation: Allocation, hostfile: Path, master_addr: str) -> list[str]:
    command = [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        "--hostfile",
        str(hostfile),
        "--master_addr",
        master_addr,
        "--master_port",
        str(args.master_port),
    ]
    if args.no_ssh:
        if not 0 <= args.node_rank < len(allocation.hosts):
            raise UserError(f"--node-rank {args.node_rank} is not in 0..{len(allocation.hosts) - 1}")
        command += ["--no_ssh", "--node_rank", str(args.node_rank)]
    else:
        command += ["--launcher", args.launcher or ("slurm" if args.slurm else "openmpi" if args.mpi else "pdsh")]
        if set(allocation.hosts) <= LOCAL_HOSTS:
            command.append("--no_ssh_check")  # nothing to reach over ssh
    if args.launcher_args:
        command += ["--launcher_args", args.launcher_args]
    command += ["--module", "lm.train", "--config", str(Path(args.config).resolve())]
    for item in args.set:
        command += ["--set", item]
    if args.resume:
        command += ["--resume", args.resume]
    return command


def start(args, allocation: Allocation, launch_dir: Path, summary: str) -> int:
    """Write the hostfile and `.deepspeed_env` into `launch_dir` and run the launcher (or, with
    --dry-run, print them and the command and start nothing)."""
    master_addr = args.master_addr or allocation.hosts[0]
    hostfile, env_file = launch_dir / "hostfile", launch_dir / ".deepspeed_env"
    env = rank_environment(args, master_addr)
    command = build_command(args, allocation, hostfile, master_addr)
    env_text = "".join(f"{k}={v}\n" for k, v in sorted(env.items()))
    summary = f"{summary}, master {master_addr}:{args.master_port}"
    if args.dry_run:
        print(
            f"# {summary}\n# {hostfile}\n{allocation.hostfile_text()}# {env_file}\n{env_text}"
            f"DS_ENV_FILE={shlex.quote(str(env_file))} {shlex.join(command)}"
        )
        return 0
    launch_dir.mkdir(parents=True, exist_ok=True)
    hostfile.write_text(allocation.hostfile_text())
    env_file.write_text(env_text)
    print(f"lm launch: {summary}", flush=True)
    # The launcher exports .deepspeed_env to remote ranks; local ones inherit it directly.
    return run_owned(command, {**os.environ, **env, "DS_ENV_FILE": str(env_file)}, label="lm launch").status
