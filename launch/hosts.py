"""Which nodes a job runs on, and how many processes each: from a list, a hostfile, SLURM or MPI.

An `Allocation` is an ordered list of (host, slots). It is read from
- an explicit list: `--nodes a,b` with `--slots N` processes each;
- a hostfile in DeepSpeed's format, one `host slots=N` line per node (`#` starts a comment);
- SLURM: SLURM_JOB_NODELIST (bracket ranges such as `gpu[01-04,07]`, expanded with
  python-hostlist) and SLURM_TASKS_PER_NODE (`2(x3),1`), or `--slots` per node;
- an MPI allocation: the node file of PBS / Open MPI (one line per slot, or `host slots=N`).
"""

import os
from dataclasses import dataclass
from pathlib import Path

import hostlist

from core.errors import UserError


@dataclass(frozen=True)
class Allocation:
    hosts: tuple[str, ...]
    slots: tuple[int, ...]

    def __post_init__(self):
        if not self.hosts:
            raise UserError("the node list is empty")
        if len(set(self.hosts)) != len(self.hosts):
            raise UserError(f"a node is listed twice: {', '.join(self.hosts)}")
        if any(s < 1 for s in self.slots):
            raise UserError(f"every node needs at least one slot, got {list(self.slots)}")

    @property
    def world_size(self) -> int:
        return sum(self.slots)

    def hostfile_text(self) -> str:
        return "".join(f"{host} slots={slots}\n" for host, slots in zip(self.hosts, self.slots))


def expand_nodelist(nodelist: str) -> list[str]:
    """`gpu[01-04,07],cpu12` -> gpu01, gpu02, gpu03, gpu04, gpu07, cpu12 (SLURM's syntax)."""
    try:
        hosts = hostlist.expand_hostlist(nodelist)
    except hostlist.BadHostlist as exc:
        raise UserError(f"bad node list {nodelist!r}: {exc}") from None
    if not hosts or any(not h for h in hosts):
        raise UserError(f"bad node list {nodelist!r}: it names no node")
    return hosts


def from_nodes(nodes: str, slots: int) -> Allocation:
    hosts = expand_nodelist(nodes)
    return Allocation(tuple(hosts), (slots,) * len(hosts))


def parse_hostfile(text: str, source: str) -> Allocation:
    """DeepSpeed's `host slots=N` lines, or one line per slot (a PBS / MPI node file)."""
    counts: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        host, slots = fields[0], 1
        if len(fields) == 2 and fields[1].startswith("slots=") and fields[1][6:].isdigit():
            slots = int(fields[1][6:])
        elif len(fields) != 1:
            raise UserError(f"{source} line {number}: expected 'host slots=N', got {raw.strip()!r}")
        counts[host] = counts.get(host, 0) + slots
    if not counts:
        raise UserError(f"{source} lists no hosts")
    return Allocation(tuple(counts), tuple(counts.values()))


def from_hostfile(path: str | Path) -> Allocation:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"hostfile not found: {path}")
    return parse_hostfile(path.read_text(), str(path))


def from_slurm(env: dict | None = None, slots: int | None = None) -> Allocation:
    env = os.environ if env is None else env
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise UserError("--slurm: SLURM_JOB_NODELIST is not set (run inside an allocation: sbatch or salloc)")
    hosts = expand_nodelist(nodelist)
    if slots is not None:
        return Allocation(tuple(hosts), (slots,) * len(hosts))
    tasks = env.get("SLURM_TASKS_PER_NODE") or env.get("SLURM_NTASKS_PER_NODE")
    if not tasks:
        raise UserError("--slurm: SLURM_TASKS_PER_NODE is not set; pass --slots")
    try:
        per_node = hostlist.parse_slurm_tasks_per_node(tasks)
    except Exception:  # python-hostlist raises plain errors for malformed strings
        raise UserError(f"bad SLURM_TASKS_PER_NODE {tasks!r}") from None
    if len(per_node) != len(hosts):
        raise UserError(f"SLURM_TASKS_PER_NODE {tasks!r} gives {len(per_node)} counts for {len(hosts)} nodes")
    return Allocation(tuple(hosts), tuple(per_node))


def from_mpi(env: dict | None = None) -> Allocation:
    """The node file an MPI allocation provides (PBS / Torque, or Open MPI's default hostfile)."""
    env = os.environ if env is None else env
    for variable in ("PBS_NODEFILE", "OMPI_MCA_orte_default_hostfile", "OMPI_MCA_rmaps_default_hostfile"):
        if env.get(variable):
            return from_hostfile(env[variable])
    raise UserError(
        "--mpi: no MPI node file in the environment (PBS_NODEFILE, OMPI_MCA_orte_default_hostfile); "
        "use --hostfile or --nodes"
    )
