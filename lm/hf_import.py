"""Import a Hugging Face transformers checkpoint: GPT-2 or Llama weights as our model's.

    lm convert --from-hf HF_DIR --out RUN [--twicing-layers SEL] [--vocab-multiple N]

HF_DIR is a local directory as `save_pretrained` writes it: `config.json` and the weights in
`model.safetensors` (or shards named by `model.safetensors.index.json`; `pytorch_model.bin` files
are read with `torch.load(weights_only=True)`). Nothing is downloaded and no code from the
directory runs: config.json is read as JSON, not through transformers' remote code.

Two architectures are supported, `GPT2LMHeadModel` (model_type gpt2) and `LlamaForCausalLM`
(model_type llama). Their config maps onto `ModelConfig` (model.arch gpt2 or llama), and their
tensor names are ours (lm.model): GPT-2's Conv1D matrices are transposed into our Linear weights,
Llama's tensors are taken as they are. Anything the model would compute differently is refused in
one line naming it: another activation, scaled RoPE, a head_dim of its own, quantized weights.
`twicing_layers` turns chosen layers to twicing attention over the same weights (a new model, to
fine-tune); the default "none" computes exactly what transformers computes.

`vocab_multiple` pads the vocabulary to a multiple of N (so tensor parallelism can split it) with
zero rows in the token embedding and the output layer: real tokens' logits are unchanged, and the
padded ids get logit 0. They are never real tokens (the tokenizer has no such ids), but they do
take part in a softmax over the whole vocabulary.

The tokenizer (`tokenizer.json`, with `tokenizer_config.json` and `special_tokens_map.json` when
present) is copied unchanged, after checking that its ids fit the model's vocabulary.
"""

import json
import re
import warnings
from pathlib import Path
from typing import NamedTuple

import torch

from core.errors import UserError
from core.json_files import read_json_object
from data_prep.hf_tokenizer import ids_needed, parse_tokenizer
from lm.config import ModelConfig, RunConfig
from lm.consolidate import with_tied_names
from lm.hf_export import CONV1D_WEIGHTS
from lm.model import GPT, embedding_names
from lm.safe_load import load_safetensors

# model_type -> the one transformers class whose weights we read
SUPPORTED = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# Buffers older transformers saved beside the weights: GPT-2's causal mask, Llama's RoPE frequencies.
BUFFERS = re.compile(r"\.attn\.(bias|masked_bias)$|\.rotary_emb\.inv_freq$")


class HFImport(NamedTuple):
    weights: dict[str, torch.Tensor]  # the full state dict of GPT(config.model), fp32
    config: RunConfig  # model from config.json; data and train sections at their defaults
    tokenizer_files: list[Path]  # to copy into the converted directory


def import_hf(hf_dir: str | Path, twicing_layers: str | list[int] = "none", vocab_multiple: int = 1) -> HFImport:
    """Read and check a transformers directory; nothing is written."""
    hf_dir = Path(hf_dir)
    if vocab_multiple < 1:
        raise UserError(f"--vocab-multiple must be a positive integer, got {vocab_multiple}")
    hf = read_hf_config(hf_dir)
    try:
        model = gpt2_model(hf) if hf["model_type"] == "gpt2" else llama_model(hf)
    except UserError as exc:
        raise UserError(f"{hf_dir / 'config.json'}: {exc}") from None
    model["twicing_layers"] = twicing_layers
    config = RunConfig.from_dict({"model": model}, source=str(hf_dir / "config.json"))
    weights = our_weights(read_hf_weights(hf_dir), config.model, hf_dir)
    tokenizer = tokenizer_files(hf_dir, config.model.vocab_size)
    if vocab_multiple > 1:
        weights, config = padded_vocabulary(weights, config, vocab_multiple)
    return HFImport(weights, config, tokenizer)


def read_hf_config(hf_dir: Path) -> dict:
    path = hf_dir / "config.json"
    if not path.is_file():
        what = "is not a directory" if not hf_dir.is_dir() else "has no config.json"
        raise UserError(f"{hf_dir} {what}: --from-hf takes a local transformers model directory")
    hf = read_json_object(path)
    model_type, architectures = hf.get("model_type"), hf.get("architectures") or []
    supported = ", ".join(f"{cls} ({kind})" for kind, cls in SUPPORTED.items())
    if model_type not in SUPPORTED or any(a != SUPPORTED[model_type] for a in architectures):
        name = ", ".join(map(str, architectures)) or "no architectures"
        raise UserError(f"{path}: unsupported architecture {name} (model_type {model_type}); supported: {supported}")
    if hf.get("quantization_config"):
        raise UserError(f"{path}: quantized weights are not supported; import the unquantized model")
    return hf


def need(hf: dict, key: str):
    if key not in hf:
        raise UserError(f"no {key!r}, which a {hf['model_type']} model needs")
    return hf[key]


def refuse(hf: dict, what: str) -> None:
    raise UserError(f"{what}; {SUPPORTED[hf['model_type']]} of that kind cannot be imported")


def gpt2_model(hf: dict) -> dict:
    """The model section of a GPT-2 config.json."""
    if hf.get("activation_function", "gelu_new") != "gelu_new":
        refuse(hf, f"activation_function {hf['activation_function']!r} is not gelu_new")
    if not hf.get("scale_attn_weights", True) or hf.get("scale_attn_by_inverse_layer_idx", False):
        refuse(hf, "attention scores are not scaled by 1/sqrt(head size)")
    if hf.get("add_cross_attention", False):
        refuse(hf, "it has cross-attention")
    return dict(
        arch="gpt2",
        vocab_size=need(hf, "vocab_size"),
        block_size=need(hf, "n_positions"),
        n_layer=need(hf, "n_layer"),
        n_head=need(hf, "n_head"),
        n_embd=need(hf, "n_embd"),
        d_ff=hf.get("n_inner"),  # None: 4 * n_embd, in transformers and here
        layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
        init_std=hf.get("initializer_range", 0.02),
        tie_embeddings=hf.get("tie_word_embeddings", True),
    )


def llama_model(hf: dict) -> dict:
    """The model section of a Llama config.json (transformers 4's and 5's ways of writing RoPE)."""
    if hf.get("hidden_act", "silu") != "silu":
        refuse(hf, f"hidden_act {hf['hidden_act']!r} is not silu")
    hidden, heads = need(hf, "hidden_size"), need(hf, "num_attention_heads")
    head_dim = hf.get("head_dim")
    if head_dim is not None and isinstance(hidden, int) and isinstance(heads, int) and head_dim * heads != hidden:
        refuse(hf, f"head_dim {head_dim} is not hidden_size / num_attention_heads ({hidden} / {heads})")
    attention_bias, mlp_bias = hf.get("attention_bias", False), hf.get("mlp_bias", False)
    if attention_bias != mlp_bias:
        refuse(hf, f"attention_bias ({attention_bias}) and mlp_bias ({mlp_bias}) differ")
    # transformers 5: rope_parameters; 4: rope_theta beside rope_scaling (null, or a scaled type)
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if not isinstance(rope, dict) or any(isinstance(v, dict) for v in rope.values()):
        refuse(hf, "its rope parameters differ by layer type")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default" or rope.get("partial_rotary_factor", 1.0) != 1.0:
        refuse(hf, f"rope_type {rope_type!r} is not default (unscaled) rotary positions over the whole head")
    return dict(
        arch="llama",
        vocab_size=need(hf, "vocab_size"),
        block_size=need(hf, "max_position_embeddings"),
        n_layer=need(hf, "num_hidden_layers"),
        n_head=heads,
        n_embd=hidden,
        n_kv_head=hf.get("num_key_value_heads") or heads,
        d_ff=need(hf, "intermediate_size"),
        rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
        layer_norm_epsilon=hf.get("rms_norm_eps", 1e-6),
        init_std=hf.get("initializer_range", 0.02),
        bias=attention_bias,
        tie_embeddings=hf.get("tie_word_embeddings", False),
    )


def read_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the directory's weight files, by its name there."""
    for index_name, single in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        if (hf_dir / index_name).is_file():
            files = shard_files(hf_dir / index_name, hf_dir)
        elif (hf_dir / single).is_file():
            files = [hf_dir / single]
        else:
            continue
        weights = {}
        for path in files:
            weights.update(load_safetensors(path) if path.suffix == ".safetensors" else read_bin(path))
        return weights
    raise UserError(f"{hf_dir} has no weights (model.safetensors, its index, or pytorch_model.bin)")


def shard_files(index: Path, hf_dir: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise UserError(f"{index}: not a weight index (a JSON object with a weight_map)") from None
    for name in names:  # shards are files of this directory, nowhere else
        if not isinstance(name, str) or Path(name).name != name or not (hf_dir / name).is_file():
            raise UserError(f"{index} names shard {name!r}, which is not a file of {hf_dir}")
    return [hf_dir / name for name in names]


def read_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)  # runs no code from the file
    except Exception as exc:
        raise UserError(f"{path}: cannot be read as tensors only ({str(exc).splitlines()[0][:100]})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: expected a state dict of tensors")
    return state


def our_weights(hf_weights: dict[str, torch.Tensor], config: ModelConfig, hf_dir: Path) -> dict[str, torch.Tensor]:
    """The state dict of GPT(config) from transformers' tensors, checked name by name and shape by shape."""
    gpt2 = config.arch == "gpt2"
    state = {}
    for name, tensor in hf_weights.items():
        if BUFFERS.search(name):
            continue
        if gpt2 and not name.startswith(("transformer.", "lm_head.")):
            name = "transformer." + name  # saved from GPT2Model, as the original GPT-2 files are
        state[name] = tensor
    token, head = embedding_names(config)
    if config.tie_embeddings and token in state and head in state and not torch.equal(state[token], state[head]):
        raise UserError(f"{hf_dir}: {head} differs from {token}, but config.json ties them")
    state = with_tied_names(state, config)  # files keep one name of a tied pair, or both
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in GPT(config).state_dict().items()}
    unexpected = sorted(set(state) - set(expected))
    missing = sorted(set(expected) - set(state))
    if missing:
        raise UserError(f"{hf_dir}: tensor {missing[0]} is missing ({len(missing)} missing in all)")
    if unexpected:
        raise UserError(f"{hf_dir}: unexpected tensor {unexpected[0]}, not part of the model config.json describes")
    weights = {}
    for name, shape in expected.items():
        conv1d = gpt2 and name.endswith(CONV1D_WEIGHTS)
        needed = shape[::-1] if conv1d else shape  # reported as transformers stores it
        if tuple(state[name].shape) != needed:
            raise UserError(f"{hf_dir}: tensor {name} has shape {tuple(state[name].shape)}, config.json needs {needed}")
        tensor = state[name].t() if conv1d else state[name]
        weights[name] = tensor.to(torch.float32).contiguous()
    if config.tie_embeddings:
        weights[token] = weights[head]  # one tensor, as in the model
    return weights


def tokenizer_files(hf_dir: Path, vocab_size: int) -> list[Path]:
    """The tokenizer files to copy, once tokenizer.json's ids are checked against the vocabulary."""
    path = hf_dir / "tokenizer.json"
    if not path.is_file():
        return []
    size = ids_needed(parse_tokenizer(path.read_bytes(), path))
    if size > vocab_size:
        raise UserError(f"{path} has ids up to {size - 1}, beyond the model's vocab_size {vocab_size}")
    return [hf_dir / name for name in TOKENIZER_FILES if (hf_dir / name).is_file()]


def padded_vocabulary(
    weights: dict[str, torch.Tensor], config: RunConfig, multiple: int
) -> tuple[dict[str, torch.Tensor], RunConfig]:
    """Zero rows appended to the embedding and the output layer, up to a vocabulary of a multiple of `multiple`."""
    model = config.model
    size = -(-model.vocab_size // multiple) * multiple
    raw = config.to_dict()
    raw["model"]["vocab_size"] = size
    token, head = embedding_names(model)
    padded = {}
    for name in (head,) if model.tie_embeddings else (token, head):
        rows = weights[name]
        padded[name] = torch.cat([rows, rows.new_zeros(size - rows.shape[0], rows.shape[1])])
    if model.tie_embeddings:
        padded[token] = padded[head]
    return {**weights, **padded}, RunConfig.from_dict(raw, source="--vocab-multiple")
