"""`lm launch`: a run config on an allocation, checked before anything starts.

The allocation, the hostfile and the launcher's command line come from `launch.job`; this module
adds what only the run config knows: that the world size splits into tensor-parallel groups, and
train.batch_size into micro batches x accumulation x data-parallel ranks.
"""

from pathlib import Path

from core.errors import UserError, run_command
from launch.hosts import Allocation
from launch.job import parse_args, resolve_allocation, start
from lm.config import RunConfig, load_config
from lm.config_layout import layout_summary, model_parallel_groups


def check_fits(config: RunConfig, allocation: Allocation) -> int:
    """The data-parallel size; refuses a layout the allocation cannot hold, naming the numbers."""
    world, tp, cp = allocation.world_size, config.train.tensor_parallel, config.train.context_parallel
    if world % (tp * cp):
        groups = model_parallel_groups(config.train)
        raise UserError(f"{allocation.world_size} processes ({len(allocation.hosts)} nodes) do not split into {groups}")
    config.train.grad_accum_steps(world // (tp * cp))  # raises with the batch numbers
    return world // (tp * cp)


def main(argv=None) -> int:
    args = parse_args(argv)
    config = load_config(args.config, args.set)
    allocation = resolve_allocation(args)
    dp = check_fits(config, allocation)
    summary = f"{len(allocation.hosts)} node(s), {allocation.world_size} processes: {layout_summary(config.train, dp)}"
    return start(args, allocation, Path(config.train.out_dir).resolve() / "launch", summary)


if __name__ == "__main__":
    raise SystemExit(run_command(main))
