"""Checkpoint conversion for inference.

    lm convert --checkpoint RUN_DIR --out DIR [--dtype fp32|bf16]

Writes DIR/model.safetensors (the consolidated weights of a DeepSpeed checkpoint of any ZeRO
stage), DIR/config.yaml and DIR/tokenizer.model. The Hugging Face export and tensor-parallel
merging are planned on top of this (see the issues).
"""

import argparse
import shutil
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from lm.errors import UserError, run_command


def convert_to_safetensors(checkpoint: str, out: Path, dtype: torch.dtype = torch.float32) -> Path:
    from lm.checkpoint import load_model_weights, read_marker, resolve_checkpoint, run_dir_of

    tag_dir = resolve_checkpoint(checkpoint)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"output directory {out} is not empty; choose another --out")
    weights = load_model_weights(tag_dir)
    weights.pop("transformer.wte.weight", None)  # tied to lm_head.weight; safetensors stores it once
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(dtype).contiguous() for k, v in weights.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt", "source": str(tag_dir)})
    (out / "config.yaml").write_text(yaml.safe_dump(read_marker(tag_dir)["config"], sort_keys=False))
    tokenizer = run_dir_of(tag_dir) / "tokenizer.model"
    if tokenizer.is_file():
        shutil.copyfile(tokenizer, out / "tokenizer.model")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="lm convert", description="Convert a training checkpoint for inference.")
    p.add_argument("--checkpoint", required=True, help="run directory (newest complete checkpoint) or checkpoint directory")
    p.add_argument("--out", required=True, help="new directory for the converted files")
    p.add_argument("--to", choices=["safetensors"], default="safetensors", help="output format")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    args = p.parse_args(argv)
    out = convert_to_safetensors(args.checkpoint, Path(args.out), torch.float32 if args.dtype == "fp32" else torch.bfloat16)
    print(f"wrote {out / 'model.safetensors'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_command(main))
