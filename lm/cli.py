"""The `lm` command: one subcommand per job, each with its own --help.

lm demo      the whole pipeline on an embedded corpus (CPU, a few minutes)
lm prep      train a sentencepiece tokenizer and write token shards
lm train     train under DeepSpeed from a YAML run config
lm eval      perplexity of a checkpoint on a text or WikiText-103
lm harness   lm-evaluation-harness tasks on a checkpoint
lm analyze   the paper's analyses: over-smoothing, word-swap robustness, spectra
lm convert   checkpoint -> consolidated safetensors
lm generate  sample text from a checkpoint
lm launch    start training on one or many nodes
lm plan      per-rank memory of a run, before it starts
"""

import importlib
import sys

from core.errors import run_command

COMMANDS = {
    "demo": ("lm.demo", "run the whole pipeline on an embedded corpus"),
    "prep": ("data_prep.prep", "train a tokenizer and write token shards"),
    "train": ("lm.train", "train under DeepSpeed from a run config"),
    "eval": ("lm.evaluate", "perplexity of a checkpoint on a text or WikiText-103"),
    "harness": ("lm.harness", "lm-evaluation-harness tasks on a checkpoint (needs twicing-lm[eval])"),
    "analyze": ("lm.analyze", "over-smoothing, word-swap robustness and spectral curves of checkpoints"),
    "convert": ("lm.convert", "convert a checkpoint for inference"),
    "generate": ("lm.generate", "generate text from a checkpoint"),
    "launch": ("lm.launcher", "start training on one or many nodes (deepspeed launcher)"),
    "plan": ("lm.plan", "per-rank memory of a run: model states, buffers, activations"),
}


def usage() -> str:
    lines = ["usage: lm COMMAND [options]   (lm COMMAND --help for each)", "", "commands:"]
    lines += [f"  {name:<10} {summary}" for name, (_, summary) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] not in COMMANDS:
        print(f"error: unknown command {argv[0]!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[argv[0]][0])  # imported lazily: deepspeed is slow to import
    return run_command(module.main, argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
