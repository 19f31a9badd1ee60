"""Everything the project asks of DeepSpeed, in one package: a DeepSpeed upgrade is an audit of it.

DeepSpeed's engine partitions the model and its optimizer state by ZeRO stage, reduces gradients
over the data-parallel group, applies the update at the last micro step of a global batch, and
saves and loads its own checkpoint files. Around it, we:
- build it from our model, optimizer and LR schedule, with the JSON of lm.ds_config and our
  tensor-parallel groups as its Megatron `mpu`;
- run ZeRO-1/2 as ZeRO-0 on one data-parallel rank (lm.ds_config.engine_stage), and switch off
  ZeRO-0's gradient all-reduce there (a group of one);
- clip gradients with torch's foreach clip_grad_norm_ where each rank holds them whole (ZeRO-0,
  no TP: lm.ds_config.clips_itself), instead of DeepSpeed's loop over parameters;
- on one such rank with no data parallelism, step as the plain loop does (Engine.direct): the
  engine there has nothing to reduce, partition or scale, and its wrappers' Python (hooks,
  timers, profiler checks, zero_grad over named_parameters) cost 1-2% of a small model's step;
  its counters are kept, so its checkpoints are the same;
- let ZeRO-1/2's fp32 master partition be the fp32 weights' own (share_master_weights);
- gather ZeRO-1/2's updated weights over gloo by broadcasts, twice as fast as its all-gather, all
  flat groups' at once;
- compute ZeRO-1/2's gradient norm with one all-reduce for all flat groups and torch's foreach
  norm (norm_in_one_reduction), the same value as DeepSpeed's per-parameter loop with an
  all-reduce per group;
- on gloo, start each full ZeRO-1/2 gradient bucket's all-reduce and let backward go on, waiting
  for them all where its epilogue reduces the last one (reduce_buckets_async; DeepSpeed waits in
  the hook, as overlap_comm's side stream does not exist on the CPU);
- skip an update that lm.numerics found non-finite (SkippableAdamW), and advance the LR schedule
  where DeepSpeed discards a step itself, which it does not do;
- read its checkpoint files without running code from them (lm.safe_load, allowing the few plain
  DeepSpeed classes they contain), for resuming and for lm.consolidate, refusing a file of another
  save than its checkpoint's (lm.checkpoint.check_stamp);
- write its checkpoint files through lm.checkpoint.write_tensors, stamped with the save, and
  record a failed write (a full disk) instead of raising it, so that every rank still meets
  DeepSpeed's collectives inside its save and lm.saving can end the run on all ranks alike;
- partition ZeRO-3 parameters one at a time as they are first drawn (sharded initialisation);
- reach each rank's share of a ZeRO-3 parameter (`ds_tensor`);
- place Adam's state re-split for this layout (resuming on another layout, lm.resume) into
  whatever holds it under each stage, and read it back whole;
- keep its logger to warnings.
Process-group set-up (`deepspeed.init_distributed`) is lm.distributed's.

Modules: engine (Engine, the calls training makes), zero (what we change in ZeRO's partitioning and
step), files (its checkpoint files, read and written).
"""

from lm.engine.engine import Engine, quiet_deepspeed
from lm.engine.files import check_checkpoint_files, read_checkpoint_file
from lm.engine.zero import partition_zero3

__all__ = ["Engine", "check_checkpoint_files", "partition_zero3", "quiet_deepspeed", "read_checkpoint_file"]
