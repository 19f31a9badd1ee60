"""Checkpoint conversion.

    lm convert --checkpoint RUN --out DIR                          # DIR/model.safetensors (+ config, tokenizer)
    lm convert --checkpoint RUN --out DIR --to hf                  # a Hugging Face transformers model
    lm convert --checkpoint RUN --out NEWRUN --to checkpoint --tensor-parallel M

The source is any checkpoint `lm train` writes (every ZeRO stage, every TP size) or a converted
directory. `--to checkpoint` writes a new run directory whose weights-only checkpoint
`lm train --resume NEWRUN` continues under any TP layout: the weights, the step, the data position
and the learning-rate schedule carry over; the optimizer's moments do not (DeepSpeed keeps them
flattened and partitioned per TP and DP rank; re-splitting them is not implemented), so Adam
rebuilds them, which takes on the order of 1 / (1 - beta2) steps.
"""

import argparse
import shutil
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from core.errors import UserError, refuse_non_empty, run_command
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
        shutil.copyfile(tokenizer, out / "tokenizer.model")
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="lm convert",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n", 2)[2],
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        help="run directory (newest complete checkpoint), checkpoint or converted directory",
    )
    p.add_argument("--out", required=True, help="new directory for the converted files")
    p.add_argument("--to", choices=["safetensors", "hf", "checkpoint"], default="safetensors", help="output format")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="weights dtype (safetensors, hf)")
    p.add_argument("--tensor-parallel", type=int, default=None, help="with --to checkpoint: the new TP size")
    args = p.parse_args(argv)
    if args.tensor_parallel is not None and (args.to != "checkpoint" or args.tensor_parallel < 1):
        raise UserError("--tensor-parallel takes a positive size, with --to checkpoint")
    out = convert(
        args.checkpoint,
        Path(args.out),
        args.to,
        torch.float32 if args.dtype == "fp32" else torch.bfloat16,
        args.tensor_parallel,
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_command(main))
