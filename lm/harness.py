"""Downstream evaluation with EleutherAI's lm-evaluation-harness, on our model directly.

    lm harness --checkpoint RUN --tasks hellaswag,lambada_openai [--num-fewshot K] [--limit N] [--json]
    lm harness --checkpoint RUN --tasks my_task --include-path my_tasks/ --json

The checkpoint is read as every command reads it (lm.inference: a run, any ZeRO stage and TP size,
a converted directory); no Hugging Face export is needed. lm.harness_lm.CheckpointLM answers the
tasks' requests (`loglikelihood`, `loglikelihood_rolling`, `generate_until`) in batches on the GPU
if there is one, else the CPU, and lm-eval's `simple_evaluate` runs the tasks, with its default
seeds. Sequences longer than the model's context are scored in windows of `--context` tokens
advancing by `--stride`, as `lm eval` scores a text, so a rolling-loglikelihood (perplexity) task
gives the total NLL `lm eval --context C --stride S` gives on the same text.

Tasks are lm-eval's by name, YAML files, or those of `--include-path DIR`. When every task named is
in DIR or a file, lm-eval's ~15k built-in task files are not indexed (seconds saved); otherwise they are.
Prints lm-eval's table; with --json, its results object (json-serialisable) instead.

lm-eval is an optional dependency: `pip install 'twicing-lm[eval]'`.
"""

import argparse
import difflib
import json
from pathlib import Path

import torch

from core.errors import UserError, run_command
from lm.evaluate import Parser
from lm.inference import load_for_inference, source_config

INSTALL = "lm harness needs lm-evaluation-harness, which is not installed: pip install 'twicing-lm[eval]'"


def require_lm_eval():
    """lm_eval, or one line saying how to install it."""
    try:
        import lm_eval
        import lm_eval.api.model  # noqa: F401  (the adapter's base class)
    except ImportError:
        raise UserError(INSTALL) from None
    return lm_eval


def is_task_file(name: str) -> bool:
    return name.endswith((".yaml", ".yml")) and Path(name).is_file()


def task_manager(names: list[str], include_path: str | None = None):
    """lm-eval's TaskManager that knows every task named, or one line naming the first unknown one."""
    from lm_eval.tasks import TaskManager

    if include_path is not None and not Path(include_path).is_dir():
        raise UserError(f"--include-path {include_path}: no such directory")
    local = TaskManager(include_path=include_path, include_defaults=False)
    if all(n in local.all_tasks or is_task_file(n) for n in names):
        return local
    manager = TaskManager(include_path=include_path)
    for name in names:
        if name not in manager.all_tasks and not is_task_file(name):
            close = difflib.get_close_matches(name, manager.all_tasks, n=3)
            hint = f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
            where = f"lm-eval's tasks or {include_path}" if include_path else "lm-eval's tasks (see `lm-eval ls tasks`)"
            raise UserError(f"unknown lm-eval task {name!r}{hint}: not among {where}")
    return manager


def evaluate_tasks(lm, names: list[str], manager, num_fewshot=None, limit=None, **options) -> dict:
    """lm-eval's results object of `lm` on the tasks; options go to simple_evaluate (log_samples, seeds)."""
    from lm_eval import simple_evaluate

    options = {"log_samples": False, **options}
    return simple_evaluate(model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit, task_manager=manager, **options)


def harness_model(checkpoint: str, context=None, stride=None, batch_size: int = 8, device=None):
    """CheckpointLM of a run, checkpoint or converted directory, on `device` (default: GPU if any)."""
    from lm.harness_lm import CheckpointLM

    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer, tag_dir = load_for_inference(checkpoint, device)
    return CheckpointLM(model, tokenizer, context, stride, batch_size, checkpoint=tag_dir)


def task_names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise UserError("--tasks names no task; give a comma-separated list, e.g. --tasks hellaswag,arc_easy")
    return names


def parse_args(argv=None) -> argparse.Namespace:
    p = Parser(
        prog="lm harness",
        description="lm-evaluation-harness tasks on a checkpoint (no Hugging Face export needed).",
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="run directory, checkpoint or converted directory")
    p.add_argument("--tasks", required=True, type=task_names, help="comma-separated lm-eval task names")
    p.add_argument("--include-path", help="a directory of task YAML files, searched beside lm-eval's own")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples per prompt (default: the task's)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N examples of each task")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--context", type=int, default=None, help="window length in tokens (default: the model's context)")
    p.add_argument("--stride", type=int, default=None, help="new tokens scored per later window (default: context/2)")
    p.add_argument("--json", action="store_true", help="print lm-eval's results object as JSON")
    args = p.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be positive (examples per task), got {args.limit}")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise UserError(f"--num-fewshot must be 0 or more, got {args.num_fewshot}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    require_lm_eval()
    source_config(args.checkpoint)  # a missing or incomplete checkpoint fails before lm-eval's task index
    manager = task_manager(args.tasks, args.include_path)
    lm = harness_model(args.checkpoint, args.context, args.stride, args.batch_size)
    from datasets.exceptions import DatasetNotFoundError

    try:
        results = evaluate_tasks(lm, args.tasks, manager, args.num_fewshot, args.limit)
    except (ConnectionError, DatasetNotFoundError) as exc:  # a hub dataset, offline or misspelt
        raise UserError(f"a task's dataset could not be loaded: {str(exc).splitlines()[0]}") from None
    from lm_eval.utils import handle_non_serializable, make_table

    if args.json:
        print(json.dumps(results, default=handle_non_serializable), flush=True)
    else:
        print(make_table(results))
        if results.get("groups"):
            print(make_table(results, "groups"))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_command(main))
