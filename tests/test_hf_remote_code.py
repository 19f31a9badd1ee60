"""Specification of the remote code in lm/hf_twicing for every layout and option of our model.

A model of either parameter layout (GPT-2's or Llama's names), with rotary positions, RMSNorm,
SwiGLU, grouped-query attention, untied embeddings and twicing in some layers, exports with
lm.hf_export and loads with `trust_remote_code=True` under our parameter names, computing our
logits and generating our tokens. Directories exported before these options existed still load.
"""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoModel  # noqa: E402

from conftest import REPO  # noqa: E402
from core.errors import UserError  # noqa: E402
from hf_support import hf_logits, load, logits_of, make_model, tokens  # noqa: E402
from lm.generate import generate  # noqa: E402
from lm.hf_export import AUTO_MAP, REMOTE_CODE_FILES, export_hf  # noqa: E402
from lm.hf_twicing.configuration_twicing_gpt import TwicingGPTConfig  # noqa: E402

pytestmark = pytest.mark.usefixtures("private_modules_cache")  # fresh remote-code modules per test

# Layouts no native transformers class of ours covers, each with twicing in some layers but the last.
LLAMA_GQA = dict(arch="llama", n_head=8, n_kv_head=2, twicing_layers=[0, 1])  # rope, rmsnorm, swiglu, untied
GPT2_ROPE_GQA = dict(position="rope", norm="rmsnorm", mlp="swiglu", n_head=8, n_kv_head=2, twicing_layers=[1])
LLAMA_GPT2_OPTIONS = dict(  # Llama's names with GPT-2's options: learned positions, biases, tied
    arch="llama", position="learned", norm="layernorm", mlp="gelu", bias=True, tie_embeddings=True, twicing_layers="all"
)
SOFTMAX_MQA_UNTIED = dict(n_kv_head=1, tie_embeddings=False, rope_theta=500.0, position="rope")  # softmax only
LAYOUTS = {
    "llama-gqa-untied": LLAMA_GQA,
    "gpt2-rope-gqa-tied": GPT2_ROPE_GQA,
    "llama-learned-tied": LLAMA_GPT2_OPTIONS,
    "gpt2-softmax-mqa-untied": SOFTMAX_MQA_UNTIED,
}
NEW_FIELDS = ("arch", "position", "rope_theta", "norm", "mlp", "n_kv_head", "tie_word_embeddings")


def exported(tmp_path, **overrides):
    model = make_model(**overrides)
    return model, export_hf(model.state_dict(), model.config, None, tmp_path / "hf")


@pytest.mark.parametrize("overrides", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_every_layout_loads_under_our_names_and_gives_our_logits(tmp_path, overrides):
    model, out = exported(tmp_path, **overrides)
    c = model.config
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "twicing_gpt" and config["layer_attention"] == c.layer_kinds()
    assert {k: config[k] for k in NEW_FIELDS} == {
        "arch": c.arch,
        "position": c.position,
        "rope_theta": c.rope_theta,
        "norm": c.norm,
        "mlp": c.mlp,
        "n_kv_head": c.n_kv_head,
        "tie_word_embeddings": c.tie_embeddings,
    }
    hf = load(out, trust_remote_code=True)
    assert type(hf).__name__ == "TwicingGPTForCausalLM"
    assert (hf.lm_head.weight is hf.get_input_embeddings().weight) == c.tie_embeddings
    theirs, ours = hf.state_dict(), model.state_dict()
    assert set(theirs) == set(ours)
    assert all(torch.equal(theirs[name], ours[name]) for name in ours)
    idx = tokens()
    torch.testing.assert_close(hf_logits(hf, idx), logits_of(model, idx), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("overrides", [LLAMA_GQA, GPT2_ROPE_GQA], ids=["llama", "gpt2"])
def test_greedy_generate_matches_ours_past_the_context(tmp_path, overrides):
    """25 new tokens after 5 slide the 16-token window: both recompute it with positions from 0."""
    model, out = exported(tmp_path, **overrides)
    hf = load(out, trust_remote_code=True)
    hf.generation_config.eos_token_id = None  # do not stop early on a random model
    prompt = tokens(batch=1, t=5, seed=3)[0].tolist()
    ours = generate(model, prompt, max_new_tokens=25, temperature=0)
    with torch.no_grad():
        theirs = hf.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),  # the pad id may be in the prompt
            max_new_tokens=25,
            do_sample=False,
        )
    assert theirs[0].tolist() == prompt + ours


def test_left_padding_with_rotary_positions_and_gqa(tmp_path):
    model, out = exported(tmp_path, **LLAMA_GQA)
    hf = load(out, trust_remote_code=True)
    idx = tokens(batch=1, t=10)
    padded = torch.cat([torch.full((1, 6), 3), idx], dim=1)
    mask = torch.cat([torch.zeros(1, 6, dtype=torch.long), torch.ones(1, 10, dtype=torch.long)], dim=1)
    theirs = hf_logits(hf, padded, attention_mask=mask)[:, 6:]
    torch.testing.assert_close(theirs, logits_of(model, idx), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("overrides", [LLAMA_GQA, GPT2_ROPE_GQA], ids=["llama", "gpt2"])
def test_auto_model_loads_the_body_of_either_layout(tmp_path, overrides):
    """AutoModel strips the layout's body prefix (`model.` or `transformer.`) from our names."""
    model, out = exported(tmp_path, **overrides)
    body, info = AutoModel.from_pretrained(out, trust_remote_code=True, output_loading_info=True)
    assert type(body).__name__ == "TwicingGPTModel"
    assert not info["missing_keys"] and not info["mismatched_keys"]
    assert info["unexpected_keys"] <= {"lm_head.weight"}  # an untied output layer is not the body's
    idx = tokens()
    with torch.no_grad():
        logits = model.lm_head(body.eval()(idx).last_hidden_state)
    torch.testing.assert_close(logits, logits_of(model, idx), rtol=1e-5, atol=1e-5)


def test_a_directory_exported_before_the_options_loads_as_gpt2(tmp_path):
    """Without the new fields, config.json means what it meant: GPT-2's layout and options."""
    model, out = exported(tmp_path, twicing_layers="last:1")
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k not in NEW_FIELDS}))
    hf = load(out, trust_remote_code=True)
    c = hf.config
    assert (c.arch, c.position, c.norm, c.mlp) == ("gpt2", "learned", "layernorm", "gelu")
    assert c.n_kv_head == c.n_head and c.tie_word_embeddings
    idx = tokens()
    torch.testing.assert_close(hf_logits(hf, idx), logits_of(model, idx), rtol=1e-5, atol=1e-5)


def test_the_export_ships_every_remote_code_file():
    shipped = {p.name for p in (REPO / "lm" / "hf_twicing").glob("*.py")} - {"__init__.py"}
    assert set(REMOTE_CODE_FILES) == shipped
    assert {f"{target.split('.')[0]}.py" for target in AUTO_MAP.values()} <= shipped


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(arch="bert"), "unknown arch 'bert'"),
        (dict(norm="batchnorm"), "unknown norm"),
        (dict(n_head=4, n_kv_head=3), r"n_head \(4\) must be divisible by n_kv_head \(3\)"),
        (dict(n_embd=36, n_head=4, position="rope"), r"the head size \(9\) must be even"),
    ],
)
def test_the_config_refuses_what_the_model_cannot_compute(fields, message):
    with pytest.raises(ValueError, match=message):
        TwicingGPTConfig(**{"n_layer": 2, "n_embd": 32, "n_head": 4, **fields})


def test_an_untied_export_needs_its_output_layer(tmp_path):
    model = make_model(**LLAMA_GQA)
    weights = model.state_dict()
    del weights["lm_head.weight"]
    with pytest.raises(UserError, match="missing lm_head.weight"):
        export_hf(weights, model.config, None, tmp_path / "hf")
