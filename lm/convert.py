"""Checkpoint conversion.

    lm convert --checkpoint RUN --out DIR                          # DIR/model.safetensors (+ config, tokenizer)
    lm convert --checkpoint RUN --out DIR --to hf                  # a Hugging Face transformers model
    lm convert --checkpoint RUN --out NEWRUN --to checkpoint --tensor-parallel M
    lm convert --from-hf HF_DIR --out DIR [--twicing-layers SEL] [--vocab-multiple N]

The source is any checkpoint `lm train` writes (every ZeRO stage, every TP size) or a converted
directory. `--to hf` writes a softmax GPT-2 model as transformers' GPT2LMHeadModel, a softmax
Llama-layout model as its LlamaForCausalLM, anything else with remote code (lm.hf_export).
`--to checkpoint` writes a new run directory whose weights-only checkpoint
`lm train --resume NEWRUN` continues under any TP layout: the weights, the step, the data position
and the learning-rate schedule carry over; the optimizer's moments do not (DeepSpeed keeps them
flattened and partitioned per TP and DP rank; re-splitting them is not implemented), so Adam
rebuilds them, which takes on the order of 1 / (1 - beta2) steps.

`--from-hf` reads a local transformers GPT-2 or Llama directory instead (lm.hf_import) and writes a
converted directory (model.safetensors, config.yaml, the tokenizer.json it came with) that
`lm eval`, `lm generate`, `lm convert --checkpoint` and `lm train --init-from` read.
`--twicing-layers` turns chosen layers to twicing attention over the same weights;
`--vocab-multiple N` pads the vocabulary with zero rows to a multiple of N for tensor parallelism.
"""

import argparse
import shutil
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from core.errors import UserError, refuse_non_empty, run_command
from data_prep.tokenizer import copy_tokenizer
from lm import checkpoint as ckpt
from lm.config import ModelConfig, RunConfig
from lm.inference import load_model
from lm.model import embedding_names


def save_weights(
    weights: dict[str, torch.Tensor], config: ModelConfig, path: Path, dtype: torch.dtype, source: str
) -> None:
    """safetensors of the weights, a tied embedding once (as lm_head.weight)."""
    if config.tie_embeddings:
        weights = {k: v for k, v in weights.items() if k != embedding_names(config)[0]}
    save_file(
        {k: v.to(dtype).contiguous() for k, v in weights.items()},
        str(path),
        metadata={"format": "pt", "source": source},
    )


def convert(
    checkpoint: str,
    out: Path,
    to: str = "safetensors",
    dtype: torch.dtype = torch.float32,
    tensor_parallel: int | None = None,
) -> Path:
    refuse_non_empty(out)  # before the (slow) loading
    model, config, source = load_model(checkpoint)
    weights = model.state_dict()
    tokenizer = ckpt.tokenizer_path_for(source)
    if to == "hf":
        from lm.hf_export import export_hf

        return export_hf(weights, config.model, tokenizer if tokenizer.is_file() else None, out, dtype=dtype)
    if to == "checkpoint":  # the new layout's config, checked before anything is written
        raw = config.to_dict()
        raw["train"]["tensor_parallel"] = tensor_parallel or config.train.tensor_parallel
        raw["train"]["out_dir"] = str(out)
        config = RunConfig.from_dict(raw, source="--tensor-parallel")
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer.is_file():
        copy_tokenizer(tokenizer, out)  # tokenizer.model, or tokenizer.json with its config
    if to == "safetensors":
        save_weights(weights, config.model, out / ckpt.WEIGHTS_FILE, dtype, str(source))
        (out / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        return out
    # A run directory holding one weights-only checkpoint for the new layout.
    step = ckpt.read_marker(source)["step"] if (source / ckpt.COMPLETE_MARKER).is_file() else 0
    tag_dir = ckpt.checkpoint_root(out) / ckpt.tag_for_step(step)
    tag_dir.mkdir(parents=True)
    save_weights(weights, config.model, tag_dir / ckpt.WEIGHTS_FILE, torch.float32, str(source))
    (out / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    ckpt.write_marker(
        tag_dir,
        {"step": step, "batches_consumed": step, "world_size": None, "weights_only": True, "config": config.to_dict()},
    )
    return out


def convert_from_hf(
    hf_dir: str | Path,
    out: Path,
    twicing_layers: str | list[int] = "none",
    vocab_multiple: int = 1,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """A converted directory from a transformers GPT-2 or Llama directory; every check before anything is written."""
    from lm.hf_import import import_hf

    refuse_non_empty(out)
    weights, config, tokenizer_files = import_hf(hf_dir, twicing_layers, vocab_multiple)
    out.mkdir(parents=True, exist_ok=True)
    for path in tokenizer_files:
        shutil.copyfile(path, out / path.name)
    save_weights(weights, config.model, out / ckpt.WEIGHTS_FILE, dtype, str(hf_dir))
    (out / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    return out


def layer_selector(text: str) -> str | list[int]:
    """--twicing-layers: none, all, last:K, or layer indices such as 0,3 (or [0, 3])."""
    parts = text.strip().strip("[]").split(",")
    if all(part.strip().isascii() and part.strip().isdigit() for part in parts):
        return [int(part) for part in parts]
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="lm convert",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n", 2)[2],
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--checkpoint",
        help="run directory (newest complete checkpoint), checkpoint or converted directory",
    )
    source.add_argument("--from-hf", metavar="HF_DIR", help="a local transformers GPT-2 or Llama model directory")
    p.add_argument("--out", required=True, help="new directory for the converted files")
    p.add_argument("--to", choices=["safetensors", "hf", "checkpoint"], default="safetensors", help="output format")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="weights dtype (safetensors, hf)")
    p.add_argument("--tensor-parallel", type=int, default=None, help="with --to checkpoint: the new TP size")
    p.add_argument(
        "--twicing-layers",
        type=layer_selector,
        default=None,
        help="with --from-hf: layers to twice, none (default), all, last:K or indices 0,3",
    )
    p.add_argument(
        "--vocab-multiple",
        type=int,
        default=None,
        help="with --from-hf: pad the vocabulary with zero rows to a multiple of N (default 1)",
    )
    args = p.parse_args(argv)
    if args.tensor_parallel is not None and (args.to != "checkpoint" or args.tensor_parallel < 1):
        raise UserError("--tensor-parallel takes a positive size, with --to checkpoint")
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    if args.from_hf is None and (args.twicing_layers is not None or args.vocab_multiple is not None):
        raise UserError("--twicing-layers and --vocab-multiple go with --from-hf")
    if args.from_hf is not None:
        if args.to != "safetensors":
            raise UserError(f"--from-hf writes a converted directory; --to {args.to} takes it as --checkpoint")
        twicing = "none" if args.twicing_layers is None else args.twicing_layers
        multiple = 1 if args.vocab_multiple is None else args.vocab_multiple
        out = convert_from_hf(args.from_hf, Path(args.out), twicing, multiple, dtype)
        print(f"wrote {out}")
        if not (out / "tokenizer.json").is_file():
            print(f"note: {args.from_hf} has no tokenizer.json, so {out} has no tokenizer")
        return 0
    out = convert(
        args.checkpoint,
        Path(args.out),
        args.to,
        dtype,
        args.tensor_parallel,
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_command(main))
