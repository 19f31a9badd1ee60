"""Specification of `lm convert --from-hf` (lm.hf_import) and the native Llama export.

A transformers GPT-2 or Llama directory becomes a converted directory whose model computes what
transformers computes; exported back with `--to hf` it is transformers' own LlamaForCausalLM
(or GPT2LMHeadModel) again, tensor for tensor. Every model here is small, random and made
locally; nothing is downloaded.
"""

import json
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, LlamaForCausalLM  # noqa: E402

from conftest import assert_one_error_line  # noqa: E402
from lm.inference import load_model  # noqa: E402

VOCAB = 1000
GPT2 = dict(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4, n_inner=48)
# grouped-query attention (8 query heads over 2 key/value heads), a RoPE base and eps of their own
LLAMA = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=2,
    max_position_embeddings=32,
    rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
)
LLAMA_KINDS = {
    "untied": dict(tie_word_embeddings=False),
    "tied": dict(tie_word_embeddings=True),
    "biases": dict(tie_word_embeddings=False, attention_bias=True, mlp_bias=True),
}


def perturbed(model):
    """Every parameter moved off its init, so that norm gains and biases are not a trivial 1 or 0."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def word_tokenizer(path, size: int) -> None:
    """A tokenizer.json of `size` ids (a word-level vocabulary), with a tokenizer_config.json beside it."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    Tokenizer(WordLevel({f"w{i}": i for i in range(size)}, unk_token="w0")).save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))


def save_hf(model, path):
    model.save_pretrained(path)
    word_tokenizer(path, VOCAB)
    return path


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """{kind: (transformers model, its directory)} for GPT-2 and each Llama kind, made once."""
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    models = {"gpt2": perturbed(transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2)))}
    untied_gpt2 = transformers.GPT2Config(**GPT2, tie_word_embeddings=False)
    models["gpt2-untied"] = perturbed(transformers.GPT2LMHeadModel(untied_gpt2))
    for kind, extra in LLAMA_KINDS.items():
        models[kind] = perturbed(LlamaForCausalLM(transformers.LlamaConfig(**LLAMA, **extra)))
    return {kind: (model, save_hf(model, root / kind)) for kind, model in models.items()}


def ids(t=24, seed=0, vocab=VOCAB):
    return torch.randint(0, vocab, (2, t), generator=torch.Generator().manual_seed(seed))


def ours(run, idx):
    model, _, _ = load_model(run)
    with torch.no_grad():
        return model(idx)[0]


def theirs(hf, idx):
    with torch.no_grad():
        return hf(input_ids=idx).logits


def imported(lm_in_process, hf_dir, out, *options):
    result = lm_in_process("convert", "--from-hf", str(hf_dir), "--out", str(out), *options)
    assert result.returncode == 0, result.stderr
    return out


def model_section(run) -> dict:
    return yaml.safe_load((run / "config.yaml").read_text())["model"]


# --------------------------------------------------------------------------- logits equal transformers'


def test_gpt2_import_gives_transformers_logits(hf_models, tmp_path, lm_in_process):
    hf, hf_dir = hf_models["gpt2"]
    run = imported(lm_in_process, hf_dir, tmp_path / "run")
    model = model_section(run)
    assert (model["arch"], model["block_size"], model["d_ff"], model["tie_embeddings"]) == ("gpt2", 32, 48, True)
    assert model["twicing_layers"] == "none"
    idx = ids()
    assert (ours(run, idx) - theirs(hf, idx)).abs().max() <= 1e-5
    for name in ("tokenizer.json", "tokenizer_config.json"):  # copied unchanged
        assert (run / name).read_bytes() == (hf_dir / name).read_bytes()


def test_gpt2_files_without_the_transformer_prefix_import_too(hf_models, tmp_path, lm_in_process):
    """The original GPT-2 files were saved from GPT2Model: `h.0.attn...`, `wte.weight`."""
    hf, hf_dir = hf_models["gpt2"]
    bare = tmp_path / "bare"
    shutil.copytree(hf_dir, bare)
    weights = load_file(bare / "model.safetensors")
    save_file({k.removeprefix("transformer."): v for k, v in weights.items()}, str(bare / "model.safetensors"))
    idx = ids()
    assert (ours(imported(lm_in_process, bare, tmp_path / "run"), idx) - theirs(hf, idx)).abs().max() <= 1e-5


@pytest.mark.parametrize("kind", sorted(LLAMA_KINDS))
def test_llama_import_gives_transformers_logits(hf_models, kind, tmp_path, lm_in_process):
    hf, hf_dir = hf_models[kind]
    run = imported(lm_in_process, hf_dir, tmp_path / "run")
    model = model_section(run)
    assert (model["arch"], model["position"], model["norm"], model["mlp"]) == ("llama", "rope", "rmsnorm", "swiglu")
    assert (model["n_head"], model["n_kv_head"], model["rope_theta"], model["layer_norm_epsilon"]) == (8, 2, 5e5, 1e-5)
    assert model["tie_embeddings"] is (kind == "tied") and model["bias"] is (kind == "biases")
    idx = ids()
    assert (ours(run, idx) - theirs(hf, idx)).abs().max() <= 1e-5


@pytest.mark.parametrize("files", ["sharded", "pytorch_model.bin"])
def test_other_weight_files_import_alike(hf_models, files, tmp_path, lm_in_process):
    hf, hf_dir = hf_models["tied"]
    copy = tmp_path / "hf"
    if files == "sharded":
        hf.save_pretrained(copy, max_shard_size="40KB")
        assert (copy / "model.safetensors.index.json").is_file()
    else:  # read with torch.load(weights_only=True)
        shutil.copytree(hf_dir, copy)
        (copy / "model.safetensors").unlink()
        torch.save(hf.state_dict(), copy / "pytorch_model.bin")
    idx = ids()
    assert (ours(imported(lm_in_process, copy, tmp_path / "run"), idx) - theirs(hf, idx)).abs().max() <= 1e-5


# --------------------------------------------------------------------------- native export back

TIED = {"gpt2", "tied"}


@pytest.mark.parametrize("kind", ["gpt2", "gpt2-untied", *sorted(LLAMA_KINDS)])
def test_import_exports_back_as_the_native_model(hf_models, kind, tmp_path, lm_in_process):
    """Llama (and GPT-2) out again with --to hf: transformers' own class, the same tensors, the same logits."""
    hf, hf_dir = hf_models[kind]
    run = imported(lm_in_process, hf_dir, tmp_path / "run")
    result = lm_in_process("convert", "--checkpoint", str(run), "--out", str(tmp_path / "hf2"), "--to", "hf")
    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "hf2" / "config.json").read_text())
    assert config["architectures"] == [type(hf).__name__] and config["model_type"] == hf.config.model_type
    assert "auto_map" not in config and not list((tmp_path / "hf2").glob("*.py"))
    back, info = AutoModelForCausalLM.from_pretrained(tmp_path / "hf2", output_loading_info=True)  # no remote code
    assert type(back) is type(hf)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert (back.get_output_embeddings().weight is back.get_input_embeddings().weight) is (kind in TIED)
    original, round_trip = hf.state_dict(), back.state_dict()
    assert original.keys() == round_trip.keys()
    assert all(torch.equal(original[k], round_trip[k]) for k in original)
    idx = ids()
    assert (theirs(back.eval(), idx) - theirs(hf, idx)).abs().max() <= 1e-5
    # The tokenizer goes back out as it came in: transformers' own files, byte for byte.
    assert (tmp_path / "hf2" / "tokenizer.json").read_bytes() == (hf_dir / "tokenizer.json").read_bytes()


# --------------------------------------------------------------------------- options


def test_twicing_layers_keep_the_weights_and_change_the_attention(hf_models, tmp_path, lm_in_process):
    _, hf_dir = hf_models["untied"]
    softmax = imported(lm_in_process, hf_dir, tmp_path / "softmax")
    twicing = imported(lm_in_process, hf_dir, tmp_path / "twicing", "--twicing-layers", "last:1")
    assert model_section(twicing)["twicing_layers"] == "last:1"
    model, _, _ = load_model(twicing)
    assert model.config.layer_kinds() == ["softmax", "twicing"]
    a, b = load_file(softmax / "model.safetensors"), load_file(twicing / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    idx = ids()
    assert not torch.allclose(ours(twicing, idx), ours(softmax, idx), atol=1e-3)
    by_index = imported(lm_in_process, hf_dir, tmp_path / "by-index", "--twicing-layers", "1")  # a list of layers
    assert model_section(by_index)["twicing_layers"] == [1]
    assert torch.equal(ours(by_index, idx), ours(twicing, idx))


@pytest.mark.parametrize("kind", ["gpt2", "untied"])
def test_vocab_multiple_pads_with_zero_rows(hf_models, kind, tmp_path, lm_in_process):
    hf, hf_dir = hf_models[kind]
    padded = imported(lm_in_process, hf_dir, tmp_path / "padded", "--vocab-multiple", "64")
    assert model_section(padded)["vocab_size"] == 1024
    idx = ids()
    logits = ours(padded, idx)
    assert logits.shape[-1] == 1024
    assert torch.equal(logits[..., VOCAB:], torch.zeros_like(logits[..., VOCAB:]))  # padded ids: logit 0
    unpadded = ours(imported(lm_in_process, hf_dir, tmp_path / "unpadded"), idx)
    assert torch.equal(logits[..., :VOCAB], unpadded)
    assert (logits[..., :VOCAB] - theirs(hf, idx)).abs().max() <= 1e-5


# --------------------------------------------------------------------------- bad inputs


def edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **changes}))


def edit_weights(path, change):
    weights = load_file(path / "model.safetensors")
    change(weights)
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})


def gpt_neox(path):
    config = transformers.GPTNeoXConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64
    )
    transformers.GPTNeoXForCausalLM(config).save_pretrained(path)


class Payload:
    """Stands for a pickle that would run code when loaded."""


def pickled_payload(path):
    (path / "model.safetensors").unlink()
    torch.save({"model.norm.weight": Payload()}, path / "pytorch_model.bin")


def index_outside(path):
    index = {"weight_map": {"model.norm.weight": "../model.safetensors"}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))


K_PROJ = "model.layers.1.self_attn.k_proj.weight"
BAD = {
    "not a transformers directory": (lambda p: (p / "config.json").unlink(), ["has no config.json"]),
    "unsupported architecture": (
        lambda p: (shutil.rmtree(p), gpt_neox(p)),
        ["unsupported architecture GPTNeoXForCausalLM", "GPT2LMHeadModel (gpt2)", "LlamaForCausalLM (llama)"],
    ),
    "missing tensor": (lambda p: edit_weights(p, lambda w: w.pop(K_PROJ)), [f"tensor {K_PROJ} is missing"]),
    "misshapen tensor": (
        lambda p: edit_weights(p, lambda w: w.update({K_PROJ: torch.zeros(64, 64)})),
        [f"tensor {K_PROJ} has shape (64, 64), config.json needs (16, 64)"],
    ),
    "kv heads that do not divide the heads": (
        lambda p: edit_config(p, num_key_value_heads=3),
        ["model.n_head (8) must be divisible by model.n_kv_head (3)"],
    ),
    "scaled rope": (
        lambda p: edit_config(p, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}),
        ["rope_type 'linear' is not default"],
    ),
    "another activation": (lambda p: edit_config(p, hidden_act="gelu"), ["hidden_act 'gelu' is not silu"]),
    "biases in attention only": (lambda p: edit_config(p, attention_bias=True), ["attention_bias (True)"]),
    "pickle that runs code": (pickled_payload, ["pytorch_model.bin: cannot be read as tensors only"]),
    "shard outside the directory": (index_outside, ["names shard '../model.safetensors'"]),
    "tokenizer larger than the vocabulary": (
        lambda p: word_tokenizer(p, VOCAB + 1),
        ["tokenizer.json has ids up to 1000", "vocab_size 1000"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_error_line_and_writes_nothing(case, hf_models, tmp_path, lm_in_process):
    break_it, fragments = BAD[case]
    hf_dir = tmp_path / "hf"
    shutil.copytree(hf_models["untied"][1], hf_dir)
    break_it(hf_dir)
    result = lm_in_process("convert", "--from-hf", str(hf_dir), "--out", str(tmp_path / "out"))
    assert_one_error_line(result, *fragments)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "options, fragment",
    [
        (["--to", "hf"], "--from-hf writes a converted directory"),
        (["--vocab-multiple", "0"], "--vocab-multiple must be a positive integer"),
        (["--twicing-layers", "last:9"], "model.twicing_layers must be"),
    ],
)
def test_bad_options_are_one_error_line(options, fragment, hf_models, tmp_path, lm_in_process):
    result = lm_in_process("convert", "--from-hf", str(hf_models["gpt2"][1]), "--out", str(tmp_path / "o"), *options)
    assert_one_error_line(result, fragment)
    assert not (tmp_path / "o").exists()


def test_import_options_need_from_hf(tmp_path, lm_in_process):
    result = lm_in_process(
        "convert", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "o"), "--vocab-multiple", "8"
    )
    assert_one_error_line(result, "go with --from-hf")
