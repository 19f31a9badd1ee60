"""Export a trained model (and its tokenizer) as a Hugging Face `transformers` directory.

    export_hf(weights, config, tokenizer_path, out_dir)

A softmax model of GPT-2's layout and parts (learned positions, LayerNorm, GELU, biases, full
multi-head attention) is GPT-2, so it is written as a native `GPT2LMHeadModel` (config.json of
model_type "gpt2", GPT-2 parameter names with the Conv1D matrices transposed, tied or untied
output layer) and loads with `AutoModelForCausalLM.from_pretrained(dir)`, no custom code. A softmax
model of the Llama layout with Llama's parts (rotary positions, RMSNorm, SwiGLU; biases in every
linear layer or in none) is a native `LlamaForCausalLM` (model_type "llama"), its tensors under our
names, which are Llama's; grouped-query attention and tied or untied embeddings included.

Any other model (twicing layers, or a mix of layout and parts neither class computes) is written
with the remote code in `lm/hf_twicing/` (config model_type "twicing_gpt", `TwicingGPTForCausalLM`,
which implements every option of `ModelConfig` in either layout), copied into the directory and
named in config.json's `auto_map`, so it loads with `AutoModelForCausalLM.from_pretrained(dir,
trust_remote_code=True)`. Its weights keep our names.

A tokenizer.json (from `lm prep --tokenizer`) is transformers' own format and is shipped as it is,
with its tokenizer_config.json; the special-token ids in config.json are those its config names.
The sentencepiece tokenizer is written as `tokenizer.model` plus `tokenizer.json`, loaded by
transformers' generic `TokenizersBackend`, which follows the sentencepiece model's own settings
(identity normalisation, whitespace kept, the dummy prefix sentencepiece adds, byte fallback).
It adds no BOS/EOS and spells special-token text such as "</s>" as characters, as sentencepiece
does, so `AutoTokenizer.from_pretrained(dir)` encodes text to the ids of `data_prep.tokenizer`;
decode with `skip_special_tokens=True` to drop the control tokens as sentencepiece does.
"""

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from core.errors import UserError, refuse_non_empty
from data_prep.hf_tokenizer import ids_needed, parse_tokenizer, read_config, token_text
from data_prep.tokenizer import Tokenizer, copy_tokenizer, tokenizer_kind
from lm.config import ModelConfig
from lm.model import GPT, embedding_names

REMOTE_CODE_DIR = Path(__file__).resolve().parent / "hf_twicing"
REMOTE_CODE_FILES = ("configuration_twicing_gpt.py", "modeling_twicing_gpt.py")
AUTO_MAP = {
    "AutoConfig": "configuration_twicing_gpt.TwicingGPTConfig",
    "AutoModel": "modeling_twicing_gpt.TwicingGPTModel",
    "AutoModelForCausalLM": "modeling_twicing_gpt.TwicingGPTForCausalLM",
}
# Our nn.Linear weights are (out, in); GPT-2 stores these as Conv1D weights, (in, out).
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
EXPORT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The ids of data_prep.tokenizer, used in config.json when no tokenizer is exported.
DEFAULT_SPECIAL_IDS = {"bos": 1, "eos": 2, "pad": 3}


def is_native_gpt2(config: ModelConfig) -> bool:
    """Whether transformers' own GPT-2 computes this model: softmax everywhere, GPT-2's parts, with biases."""
    gpt2_parts = (config.position, config.norm, config.mlp) == ("learned", "layernorm", "gelu")
    return (
        not config.twicing_layer_indices()
        and config.arch == "gpt2"
        and gpt2_parts
        and config.bias
        and (config.n_kv_head == config.n_head)
    )


def is_native_llama(config: ModelConfig) -> bool:
    """Whether transformers' own Llama computes this model: softmax everywhere, Llama's names and parts."""
    llama_parts = (config.position, config.norm, config.mlp) == ("rope", "rmsnorm", "swiglu")
    return not config.twicing_layer_indices() and config.arch == "llama" and llama_parts


def export_hf(
    weights: dict[str, torch.Tensor],
    config: ModelConfig,
    tokenizer_path: Path | None,
    out_dir: Path,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write a transformers model directory to `out_dir` (new or empty); return it.

    `weights` is the full state dict of `lm.model.GPT(config)`; a tied token embedding may be
    missing (then `lm_head.weight` is the embedding). All tensors are written in `dtype`.
    """
    out_dir = Path(out_dir)
    refuse_non_empty(out_dir)
    if dtype not in EXPORT_DTYPES:
        raise UserError(f"cannot export in {dtype}; choose one of {', '.join(map(str, EXPORT_DTYPES))}")
    try:
        import transformers  # noqa: F401  (only the export needs it)
    except ImportError:
        raise UserError("the Hugging Face export needs transformers: pip install 'transformers>=5'") from None
    state = checked_weights(weights, config)
    hf_tokenizer = tokenizer_path is not None and tokenizer_kind(Path(tokenizer_path)) == "hf-tokenizers"
    special = None
    if hf_tokenizer:
        ids = hf_tokenizer_ids(Path(tokenizer_path), config)
    else:
        special = tokenizer_special_tokens(tokenizer_path, config) if tokenizer_path is not None else None
        ids = {k: v[0] for k, v in special.items()} if special else DEFAULT_SPECIAL_IDS
    ids = {k: (i if i is not None and i < config.vocab_size else None) for k, i in ids.items()}

    out_dir.mkdir(parents=True, exist_ok=True)
    if hf_tokenizer:  # already transformers' own format: the file and its config as they are
        copy_tokenizer(tokenizer_path, out_dir)
    elif tokenizer_path is not None:
        write_tokenizer(Path(tokenizer_path), special, config.block_size, out_dir)
    if is_native_gpt2(config):
        state = {k: (v.t() if k.endswith(CONV1D_WEIGHTS) else v) for k, v in state.items()}
        hf_config = gpt2_config(config, ids, dtype)
    elif is_native_llama(config):
        hf_config = llama_config(config, ids, dtype)
    else:
        hf_config = twicing_config(config, ids, dtype)
        for name in REMOTE_CODE_FILES:
            shutil.copyfile(REMOTE_CODE_DIR / name, out_dir / name)
    hf_config.save_pretrained(out_dir)
    save_file(
        {k: v.to(dtype).contiguous() for k, v in state.items()},
        str(out_dir / "model.safetensors"),
        metadata={"format": "pt"},
    )
    return out_dir


def checked_weights(weights: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """The weights to write, under our names; a tied embedding once, as the token embedding.

    Refuses weights that are not those of `GPT(config)` (missing, unexpected or misshapen tensors).
    """
    token, head = embedding_names(config)
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in GPT(config).state_dict().items()}
    state = dict(weights)
    if config.tie_embeddings:  # one tensor under two names: keep the token embedding's, as transformers does
        del expected[head]
        tied = state.pop(head, None)
        if token not in state:
            if tied is None:
                raise UserError(f"the weights have neither {token} nor the tied {head}")
            state[token] = tied
        elif tied is not None and not torch.equal(tied, state[token]):
            raise UserError(f"{head} differs from {token}, but the model ties them")
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise UserError(
            f"the weights do not fit the model config ({what}; {len(missing)} missing, {len(unexpected)} unexpected)"
        )
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise UserError(f"weight {name} has shape {tuple(state[name].shape)}, the config needs {shape}")
    return {k: state[k].detach().cpu() for k in expected}


def gpt2_config(config: ModelConfig, ids: dict, dtype: torch.dtype):
    from transformers import GPT2Config

    hf = GPT2Config(
        vocab_size=config.vocab_size,
        n_positions=config.block_size,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        n_inner=config.ffn_dim,
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        summary_first_dropout=0.0,
        layer_norm_epsilon=config.layer_norm_epsilon,
        initializer_range=config.init_std,
        tie_word_embeddings=config.tie_embeddings,
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
        pad_token_id=ids["pad"],
    )
    hf.architectures = ["GPT2LMHeadModel"]
    hf.dtype = dtype
    return hf


def llama_config(config: ModelConfig, ids: dict, dtype: torch.dtype):
    from transformers import LlamaConfig

    hf = LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.n_embd,
        intermediate_size=config.ffn_dim,
        num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head,
        num_key_value_heads=config.n_kv_head,
        head_dim=config.head_dim,
        hidden_act="silu",
        max_position_embeddings=config.block_size,
        rms_norm_eps=config.layer_norm_epsilon,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        attention_bias=config.bias,
        mlp_bias=config.bias,
        attention_dropout=0.0,
        initializer_range=config.init_std,
        tie_word_embeddings=config.tie_embeddings,
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
        pad_token_id=ids["pad"],
    )
    hf.architectures = ["LlamaForCausalLM"]
    hf.dtype = dtype
    return hf


def twicing_config(config: ModelConfig, ids: dict, dtype: torch.dtype):
    from lm.hf_twicing.configuration_twicing_gpt import TwicingGPTConfig

    hf = TwicingGPTConfig(
        vocab_size=config.vocab_size,
        block_size=config.block_size,
        n_layer=config.n_layer,
        n_head=config.n_head,
        n_kv_head=config.n_kv_head,
        n_embd=config.n_embd,
        d_ff=config.ffn_dim,
        arch=config.arch,
        position=config.position,
        rope_theta=config.rope_theta,
        norm=config.norm,
        mlp=config.mlp,
        bias=config.bias,
        layer_norm_epsilon=config.layer_norm_epsilon,
        layer_attention=config.layer_kinds(),  # the math of each layer, not how it runs here
        tie_word_embeddings=config.tie_embeddings,
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
        pad_token_id=ids["pad"],
    )
    hf.architectures = ["TwicingGPTForCausalLM"]
    hf.auto_map = dict(AUTO_MAP)
    hf.dtype = dtype
    return hf


def hf_tokenizer_ids(path: Path, config: ModelConfig) -> dict[str, int | None]:
    """bos, eos and pad ids that a tokenizer.json's config names (None where it names none)."""
    tokenizer = parse_tokenizer(path.read_bytes(), path)  # no end-of-document lookup: export refuses none
    size = ids_needed(tokenizer)
    if size > config.vocab_size:
        raise UserError(f"tokenizer {path} has {size} ids, more than the model's vocab_size {config.vocab_size}")
    settings = read_config(path)
    names = {kind: token_text(settings.get(f"{kind}_token")) for kind in ("bos", "eos", "pad")}
    return {kind: tokenizer.token_to_id(name) if name else None for kind, name in names.items()}


def tokenizer_special_tokens(path: Path, config: ModelConfig) -> dict[str, tuple[int | None, str | None]]:
    """(id, piece) of the unk, bos, eos and pad tokens of a sentencepiece model (None where absent)."""

    sp = Tokenizer(path).sp
    if sp.get_piece_size() > config.vocab_size:
        raise UserError(
            f"tokenizer {path} has {sp.get_piece_size()} pieces, more than the model's vocab_size {config.vocab_size}"
        )
    found = {"unk": sp.unk_id(), "bos": sp.bos_id(), "eos": sp.eos_id(), "pad": sp.pad_id()}
    return {k: (i, sp.id_to_piece(i)) if i >= 0 else (None, None) for k, i in found.items()}


def write_tokenizer(path: Path, special: dict, block_size: int, out_dir: Path) -> None:
    """tokenizer.model, tokenizer_config.json, special_tokens_map.json and tokenizer.json."""
    from transformers import TokenizersBackend

    shutil.copyfile(path, out_dir / "tokenizer.model")
    tokens = {f"{k}_token": piece for k, (_, piece) in special.items() if piece is not None}
    tokenizer_config = {
        # transformers' generic tokenizer: built from the sentencepiece model's own settings
        "tokenizer_class": "TokenizersBackend",
        **tokens,
        "add_bos_token": False,
        "add_eos_token": False,
        # sentencepiece spells "<s>" or "</s>" in text as characters; so do we
        "split_special_tokens": True,
        "legacy": True,  # prefix "▁" like sentencepiece, also before text that starts with "▁"
        "clean_up_tokenization_spaces": False,
        "model_max_length": block_size,
        "padding_side": "left",  # for batched generation with a decoder-only model
    }
    write_json(out_dir / "tokenizer_config.json", tokenizer_config)
    write_json(out_dir / "special_tokens_map.json", tokens)
    # Convert once here and store the result, for loaders that read only tokenizer.json.
    TokenizersBackend.from_pretrained(out_dir).backend_tokenizer.save(str(out_dir / "tokenizer.json"))


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
