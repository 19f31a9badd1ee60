"""Shared helpers of the Hugging Face export tests (test_hf_export, test_hf_remote_code): perturbed
SMALL models, their logits and transformers' view of an exported directory. Its fixture
`private_modules_cache` is made visible to every test module by conftest."""

import sys

import pytest
import torch

from lm.config import ModelConfig
from lm.model import GPT

SMALL = dict(vocab_size=96, block_size=16, n_layer=3, n_head=4, n_embd=32, d_ff=48)  # of the exported models


@pytest.fixture
def private_modules_cache(tmp_path, monkeypatch):
    """transformers copies remote code into HF_MODULES_CACHE and imports it as `transformers_modules.*`;
    give a test a fresh cache and module namespace, and restore the caller's afterwards."""
    import transformers.dynamic_module_utils as dynamic

    cache = tmp_path / "hf_modules"
    monkeypatch.setenv("HF_MODULES_CACHE", str(cache))
    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(cache))
    monkeypatch.setattr(sys, "path", list(sys.path))

    def is_remote(name):
        return name.split(".")[0] == "transformers_modules"

    saved = {name: module for name, module in sys.modules.items() if is_remote(name)}
    for name in saved:
        del sys.modules[name]
    yield cache
    for name in [name for name in sys.modules if is_remote(name)]:
        del sys.modules[name]
    sys.modules.update(saved)


def make_model(seed=0, **overrides) -> GPT:
    """A float32 SMALL model in eval mode with every parameter perturbed, so that norm gains and biases
    are not their trivial 1 and 0 and a mix-up of any of them would show."""
    torch.manual_seed(seed)
    model = GPT(ModelConfig(**{**SMALL, **overrides})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def tokens(batch=2, t=16, seed=0, vocab=SMALL["vocab_size"]) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, t), generator=torch.Generator().manual_seed(seed))


def logits_of(model, idx) -> torch.Tensor:
    with torch.no_grad():
        return model(idx)[0]


def hf_logits(hf, idx, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return hf(input_ids=idx, **kwargs).logits


def load(out, **kwargs):
    """An exported directory as a transformers causal LM in eval mode, every weight matched by name."""
    from transformers import AutoModelForCausalLM

    hf, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True, **kwargs)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    return hf.eval()
