"""A model and its tokenizer, ready for inference, from a run, a checkpoint or a converted directory.

Accepted everywhere a command takes `--checkpoint`: a run directory (its newest complete
checkpoint), a checkpoint of any ZeRO stage and TP size, a weights-only checkpoint, or a
directory written by `lm convert --to safetensors`. Weights are read from safetensors or without
running code from the files (lm.consolidate).
"""

from pathlib import Path

import torch
import yaml

from core.errors import UserError
from data_prep.hf_tokenizer import HFTokenizer
from data_prep.tokenizer import Tokenizer, load_tokenizer
from lm import checkpoint as ckpt
from lm.config import RunConfig
from lm.consolidate import load_model_weights, with_tied_names
from lm.model import GPT
from lm.safe_load import load_safetensors


def source_config(checkpoint: str | Path) -> tuple[RunConfig, Path]:
    """(run config, source dir) of a run, checkpoint or converted directory, reading no weights."""
    path = Path(checkpoint)
    if ckpt.is_converted_dir(path):
        config_file = path / "config.yaml"
        return RunConfig.from_dict(yaml.safe_load(config_file.read_text()), source=str(config_file)), path
    source = ckpt.resolve_checkpoint(path)
    return RunConfig.from_dict(ckpt.read_marker(source)["config"], source=str(source / ckpt.COMPLETE_MARKER)), source


def load_weights(checkpoint: str | Path) -> tuple[dict[str, torch.Tensor], RunConfig, Path]:
    """(full fp32 state dict, run config, source dir) of a run, checkpoint or converted directory."""
    config, source = source_config(checkpoint)
    if ckpt.is_converted_dir(source):
        return with_tied_names(load_safetensors(source / ckpt.WEIGHTS_FILE), config.model), config, source
    return load_model_weights(source), config, source


def load_model(checkpoint: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, RunConfig, Path]:
    """(model in eval mode, run config, source dir) from a run, checkpoint or converted directory."""
    weights, config, source = load_weights(checkpoint)
    model = GPT(config.model)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise UserError(f"{source}: the weights do not fit the model of its config ({(missing or unexpected)[0]})")
    return model.to(device).eval(), config, source


def load_for_inference(
    checkpoint: str | Path, device: str | torch.device = "cpu"
) -> tuple[GPT, Tokenizer | HFTokenizer, Path]:
    """(model, tokenizer, checkpoint dir): the model and the tokenizer its run was trained with
    (sentencepiece or a tokenizer.json, data_prep.tokenizer.load_tokenizer)."""
    model, _, tag_dir = load_model(checkpoint, device)
    tokenizer_path = ckpt.tokenizer_path_for(tag_dir)
    if not tokenizer_path.is_file():
        raise UserError(
            f"{tokenizer_path} is missing: the run directory has no tokenizer ({' or '.join(ckpt.TOKENIZER_FILES)})"
        )
    tokenizer = load_tokenizer(tokenizer_path)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise UserError(
            f"tokenizer/model vocabulary mismatch: {tokenizer_path} has {tokenizer.vocab_size} ids, "
            f"the model only {model.config.vocab_size}"
        )
    return model, tokenizer, tag_dir
