"""Specification of lm.hf_export: exported directories load with Hugging Face transformers and
compute what our model computes.

Softmax models become transformers' own GPT2LMHeadModel (no remote code); twicing models, and
models without biases, load through the remote code in lm/hf_twicing with trust_remote_code=True.
The exported tokenizer encodes and decodes like data_prep.tokenizer.Tokenizer.
"""

import json

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
from transformers import AutoConfig, AutoTokenizer, GPT2LMHeadModel  # noqa: E402

from core.errors import UserError  # noqa: E402
from data_prep.tokenizer import Tokenizer, train_sentencepiece  # noqa: E402
from hf_support import SMALL, hf_logits, load, logits_of, make_model, tokens  # noqa: E402
from lm.config import ModelConfig  # noqa: E402
from lm.generate import generate  # noqa: E402
from lm.hf_export import export_hf  # noqa: E402

pytestmark = pytest.mark.usefixtures("private_modules_cache")  # fresh remote-code modules per test
REMOTE_CODE = {"configuration_twicing_gpt.py", "modeling_twicing_gpt.py"}
DOCS = [
    "the cat sat on the mat. the dog sat on the log.",
    "a quick brown fox jumps over a lazy dog, then sleeps.",
    "twice the smoothing, half the noise: that is twicing.\nnew lines are kept.",
]
TEXTS = [
    "the cat sat on the mat.",
    "unseen words: zebra, quixotic, jazz!",
    "  leading spaces, two  inner spaces and a trailing one ",
    "line one\nline two\n\n",
    "tabs\tand unicode: naïve café, 東京, 🙂",
    "special text <s> and </s> and <pad> stays text",
    "▁already escaped",
    "",
]


@pytest.fixture(scope="module")
def tokenizer_model(tmp_path_factory):
    return train_sentencepiece(DOCS, tmp_path_factory.mktemp("tok") / "tok", vocab_size=300)


# --------------------------------------------------------------------------- native GPT-2


def test_softmax_model_exports_to_native_gpt2_without_remote_code(tmp_path, private_modules_cache):
    model = make_model()
    out = export_hf(model.state_dict(), model.config, None, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gpt2" and "auto_map" not in config
    assert config["n_inner"] == 48 and config["n_positions"] == 16 and config["activation_function"] == "gelu_new"
    assert config["resid_pdrop"] == config["embd_pdrop"] == config["attn_pdrop"] == 0.0
    assert config["tie_word_embeddings"] is True
    assert not list(out.glob("*.py"))
    hf = load(out)  # no trust_remote_code
    assert type(hf) is GPT2LMHeadModel
    assert hf.lm_head.weight is hf.transformer.wte.weight
    assert not private_modules_cache.exists()  # no remote code was copied or imported
    idx = tokens()
    torch.testing.assert_close(hf_logits(hf, idx), logits_of(model, idx), rtol=1e-5, atol=1e-5)


def test_export_refuses_a_non_empty_directory(tmp_path):
    model = make_model()
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        export_hf(model.state_dict(), model.config, None, tmp_path / "hf")
    assert [p.name for p in (tmp_path / "hf").iterdir()] == ["keep.txt"]


def test_export_refuses_weights_of_another_config(tmp_path):
    model = make_model()
    with pytest.raises(UserError, match="missing transformer.h.2"):
        export_hf(make_model(n_layer=2).state_dict(), model.config, None, tmp_path / "a")
    with pytest.raises(UserError, match=r"mlp.c_fc.weight has shape \(48, 32\), the config needs \(64, 32\)"):
        export_hf(model.state_dict(), ModelConfig(**{**SMALL, "d_ff": 64}), None, tmp_path / "b")


# --------------------------------------------------------------------------- remote code


@pytest.mark.parametrize(
    "overrides, attention",
    [
        (dict(twicing_layers="all"), ["twicing"] * 3),
        (dict(twicing_layers="last:1"), ["softmax", "softmax", "twicing"]),
        (dict(twicing_layers="last:1", attention_impl="reference"), ["softmax", "softmax", "twicing"]),
        (dict(bias=False), ["softmax"] * 3),
    ],
)
@pytest.mark.parametrize("without_wte", [False, True])
def test_custom_model_loads_with_remote_code_and_gives_our_logits(tmp_path, overrides, attention, without_wte):
    model = make_model(**overrides)
    weights = model.state_dict()
    if without_wte:  # the tied embedding may come only as lm_head.weight
        del weights["transformer.wte.weight"]
    out = export_hf(weights, model.config, None, tmp_path / "hf")
    assert REMOTE_CODE <= {p.name for p in out.iterdir()}
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "twicing_gpt" and config["layer_attention"] == attention
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_twicing_gpt.TwicingGPTForCausalLM"
    hf = load(out, trust_remote_code=True)
    assert type(hf).__name__ == "TwicingGPTForCausalLM"
    assert type(hf).__module__.startswith("transformers_modules.")
    assert hf.lm_head.weight is hf.transformer.wte.weight
    idx = tokens()
    torch.testing.assert_close(hf_logits(hf, idx), logits_of(model, idx), rtol=1e-5, atol=1e-5)
    # labels are shifted inside, as in transformers
    loss = hf(input_ids=idx, labels=idx).loss
    expected = F.cross_entropy(logits_of(model, idx)[:, :-1].flatten(0, 1), idx[:, 1:].flatten())
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_twicing_export_is_not_plain_gpt2(tmp_path):
    """The remote code really twices: loading its weights into GPT-2 gives other logits."""
    model = make_model(twicing_layers="last:1")
    out = export_hf(model.state_dict(), model.config, None, tmp_path / "hf")
    hf = load(out, trust_remote_code=True)
    gpt2 = make_model()
    gpt2.load_state_dict(model.state_dict())
    idx = tokens()
    assert not torch.allclose(hf_logits(hf, idx), logits_of(gpt2, idx), rtol=1e-3, atol=1e-3)


def test_left_padding_does_not_change_the_logits_of_real_tokens(tmp_path):
    model = make_model(twicing_layers="all")
    hf = load(export_hf(model.state_dict(), model.config, None, tmp_path / "hf"), trust_remote_code=True)
    idx = tokens(batch=1, t=10)
    padded = torch.cat([torch.full((1, 6), 3), idx], dim=1)
    mask = torch.cat([torch.zeros(1, 6, dtype=torch.long), torch.ones(1, 10, dtype=torch.long)], dim=1)
    theirs = hf_logits(hf, padded, attention_mask=mask)[:, 6:]
    torch.testing.assert_close(theirs, logits_of(model, idx), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("twicing_layers", ["none", "last:1"])
def test_greedy_generate_matches_our_generate(tmp_path, twicing_layers):
    """GPT-2 generates within its context; the remote code slides the window past it, as we do."""
    model = make_model(twicing_layers=twicing_layers)
    hf = load(export_hf(model.state_dict(), model.config, None, tmp_path / "hf"), trust_remote_code=True)
    hf.generation_config.eos_token_id = None  # do not stop early on a random model
    prompt = tokens(batch=1, t=5, seed=3)[0].tolist()
    new = 11 if twicing_layers == "none" else 25
    ours = generate(model, prompt, max_new_tokens=new, temperature=0)
    with torch.no_grad():
        # (the prompt holds the pad id 3: without a mask, transformers would mask it out)
        theirs = hf.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=new,
            do_sample=False,
        )
    assert theirs[0].tolist() == prompt + ours


def test_export_in_bfloat16(tmp_path):
    model = make_model(twicing_layers="last:1")
    out = export_hf(model.state_dict(), model.config, None, tmp_path / "hf", dtype=torch.bfloat16)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    hf = load(out, trust_remote_code=True, dtype=torch.bfloat16)
    assert {p.dtype for p in hf.parameters()} == {torch.bfloat16}
    expected = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    for name, p in hf.state_dict().items():
        assert torch.equal(p, expected[name]), name


# --------------------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("twicing_layers", ["none", "last:1"])
def test_tokenizer_encodes_and_decodes_like_ours(tmp_path, tokenizer_model, twicing_layers):
    ours = Tokenizer(tokenizer_model)
    model = make_model(vocab_size=320, twicing_layers=twicing_layers)
    out = export_hf(model.state_dict(), model.config, tokenizer_model, tmp_path / "hf")
    assert {"tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= {
        p.name for p in out.iterdir()
    }
    tok = AutoTokenizer.from_pretrained(out, trust_remote_code=twicing_layers != "none")
    assert type(tok).__name__ == "TokenizersBackend"
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 3)
    assert len(tok) == ours.vocab_size
    for text in TEXTS:
        ids = ours.encode(text)
        assert tok(text)["input_ids"] == ids, text  # no BOS, no EOS, same pieces
        assert tok.decode(ids, skip_special_tokens=True) == ours.decode(ids)  # == text, but "▁" reads " "
    document_ids = [1] + ours.encode(TEXTS[0]) + [2] + ours.encode(TEXTS[1]) + [2]
    assert tok.decode(document_ids, skip_special_tokens=True) == ours.decode(document_ids)
    config = AutoConfig.from_pretrained(out, trust_remote_code=True)
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 3)


def test_tokenizer_json_alone_encodes_like_ours(tmp_path, tokenizer_model):
    from tokenizers import Tokenizer as RustTokenizer

    ours = Tokenizer(tokenizer_model)
    model = make_model(vocab_size=300)
    out = export_hf(model.state_dict(), model.config, tokenizer_model, tmp_path / "hf")
    rust = RustTokenizer.from_file(str(out / "tokenizer.json"))
    for text in (t for t in TEXTS if "<" not in t):  # the raw file matches "<s>" etc. as special tokens
        assert rust.encode(text, add_special_tokens=False).ids == ours.encode(text), text


def test_export_refuses_a_tokenizer_larger_than_the_vocabulary(tmp_path, tokenizer_model):
    model = make_model()  # 96 < 300 pieces
    with pytest.raises(UserError, match="300 pieces, more than the model's vocab_size 96"):
        export_hf(model.state_dict(), model.config, tokenizer_model, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
