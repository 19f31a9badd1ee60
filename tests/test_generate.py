"""Specification of generation: cached decoding equals recomputation; batching, sampling, limits."""

import pytest
import torch

from core.errors import UserError
from lm.config import ModelConfig
from lm.generate import filter_logits, generate, generate_batch
from lm.model import GPT

# Llama's layout: rotary positions, RMSNorm, SwiGLU, and grouped-query attention (2 kv heads for 4).
LLAMA_GQA = dict(arch="llama", n_head=4, n_kv_head=2)


def tiny_model(twicing_layers: str, block_size: int = 24, **options) -> GPT:
    torch.manual_seed(0)
    sizes = dict(vocab_size=50, block_size=block_size, n_layer=3, n_head=2, n_embd=16)
    config = ModelConfig(**{**sizes, **options}, twicing_layers=twicing_layers)
    return GPT(config).double().eval()


@pytest.mark.parametrize(
    "twicing_layers,options",
    [("none", {}), ("all", {}), ("last:1", {}), ("none", LLAMA_GQA), ("all", LLAMA_GQA), ("last:1", LLAMA_GQA)],
    ids=["softmax", "twicing", "last:1", "llama-gqa-softmax", "llama-gqa-twicing", "llama-gqa-last:1"],
)
def test_cached_logits_equal_full_recomputation_token_by_token(twicing_layers, options):
    model = tiny_model(twicing_layers, **options)
    ids = torch.randint(0, 50, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full, _ = model(ids)
        cache = model.new_cache()
        steps = [model(ids[:, :7], cache=cache)[0]] + [model(ids[:, i : i + 1], cache=cache)[0] for i in range(7, 20)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-12, atol=1e-12)
    if twicing_layers != "none":  # the U cache is kept where twicing runs, a row per query head
        assert cache[-1].u.shape == cache[-1].v.shape[:1] + (model.config.n_head,) + cache[-1].v.shape[2:]


@pytest.mark.parametrize("twicing_layers,options", [("none", {}), ("all", {}), ("all", LLAMA_GQA)])
def test_cached_generation_equals_generation_without_cache(twicing_layers, options):
    model = tiny_model(twicing_layers, **options)
    prompt = [3, 14, 15, 9, 2]
    assert generate(model, prompt, 15, temperature=0) == generate(model, prompt, 15, temperature=0, use_cache=False)
    sampled = [
        generate(model, prompt, 15, 0.9, top_k=10, generator=torch.Generator().manual_seed(4), use_cache=c)
        for c in (True, False)
    ]
    assert sampled[0] == sampled[1]


def test_generation_past_the_context_slides_its_window():
    model = tiny_model("all", block_size=12)
    new = generate(model, [1, 2, 3, 4, 5], 30, temperature=0)
    assert len(new) == 30 and new == generate(model, [1, 2, 3, 4, 5], 30, temperature=0, use_cache=False)


def test_batched_prompts_of_any_lengths_equal_one_by_one():
    model = tiny_model("last:1")
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8], [9]]
    batched = generate_batch(model, prompts, 8, temperature=0)
    assert batched == [generate(model, p, 8, temperature=0) for p in prompts]


def test_sampling_is_reproducible_from_the_seed_and_top_k_1_is_greedy():
    model = tiny_model("all")
    draw = lambda seed: generate(model, [1, 2], 12, 1.0, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    assert draw(0) == draw(0) and draw(0) != draw(1)
    assert generate(model, [1, 2], 12, 1.0, top_k=1) == generate(model, [1, 2], 12, temperature=0)


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = filter_logits(logits, None, 0.8).isfinite()
    assert kept.tolist() == [[True, True, False, False]]
    assert filter_logits(logits, 2, None).isfinite().tolist() == [[True, True, False, False]]


def test_a_prompt_longer_than_the_context_is_refused():
    with pytest.raises(UserError, match="25 tokens, longer than the model's context of 24"):
        generate(tiny_model("none"), list(range(25)), 3)


def test_ids_past_the_tokenizers_vocabulary_are_never_drawn():
    """A padded vocabulary (rows no token uses) stays out of the draw, even where it scores highest."""
    model = tiny_model("all")
    with torch.no_grad():
        model.lm_head.weight[40:] = 0.0
        model.lm_head.weight[45, 0] = 1e4  # would win every greedy step and most draws
    prompt = [3, 14, 15]
    assert 45 in generate(model, prompt, 5, temperature=0)
    for temperature in (0, 1.0):
        new = generate_batch(
            model, [prompt], 10, temperature, generator=torch.Generator().manual_seed(0), vocab_size=40
        )
        assert max(new[0]) < 40
