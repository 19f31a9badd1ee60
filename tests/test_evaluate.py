"""Specification of sliding-window perplexity (lm.evaluate)."""

import math

import pytest
import torch
import torch.nn.functional as F

from lm.config import ModelConfig
from lm.evaluate import perplexity_report, sliding_window_nll
from lm.model import GPT

BOS = 0


def tiny_model(**overrides) -> GPT:
    torch.manual_seed(0)
    config = ModelConfig(**{**dict(vocab_size=50, block_size=8, n_layer=2, n_head=2, n_embd=16, twicing_layers="last:1"), **overrides})
    return GPT(config).double().eval()


def token_ids(n: int) -> list[int]:
    return torch.randint(1, 50, (n,), generator=torch.Generator().manual_seed(1)).tolist()


def test_a_model_with_uniform_output_has_token_perplexity_equal_to_the_vocabulary_size():
    model = tiny_model()
    with torch.no_grad():
        model.lm_head.weight.zero_()  # all logits 0: every token has probability 1/50
    nll, tokens = sliding_window_nll(model, token_ids(30), BOS, context=8, stride=4)
    assert tokens == 30
    assert math.exp(nll / tokens) == pytest.approx(50, rel=1e-12)


@pytest.mark.parametrize("stride", [1, 3, 8])
def test_every_token_is_scored_once_with_the_history_the_stride_promises(stride):
    """Brute force: target j is predicted from the window of `context` tokens that the windows give it."""
    model, ids, context = tiny_model(), token_ids(29), 8
    sequence = [BOS] + ids
    nll, tokens = sliding_window_nll(model, ids, BOS, context, stride)
    assert tokens == len(ids)
    expected, end = 0.0, 0
    while end < len(ids):
        first, end = end, min(len(ids), end + (context if end == 0 else stride))
        for j in range(first, end):  # target sequence[j + 1], seen from inputs up to sequence[j]
            start = max(0, end - context)
            assert j + 1 - start >= min(j + 1, context - stride)  # at least context - stride history
            inputs = torch.tensor([sequence[start:end]])
            logits, _ = model(inputs)
            expected += F.cross_entropy(logits[0, j - start], torch.tensor(sequence[j + 1])).item()
    assert nll == pytest.approx(expected, rel=1e-10)


def test_with_a_context_covering_the_text_the_stride_does_not_matter_and_equals_one_forward_pass():
    model, ids = tiny_model(block_size=64), token_ids(20)
    whole = torch.tensor([[BOS] + ids])
    logits, _ = model(whole[:, :-1])
    by_hand = F.cross_entropy(logits[0], whole[0, 1:], reduction="sum").item()
    for stride in (5, 64):
        nll, _ = sliding_window_nll(model, ids, BOS, context=64, stride=stride)
        assert nll == pytest.approx(by_hand, rel=1e-12)


def test_report_normalises_by_tokens_words_and_bytes():
    report = perplexity_report(nll=12.0, tokens=6, text="two wörds")
    assert report["tokens"] == 6 and report["words"] == 2 and report["bytes"] == 10
    assert report["token_ppl"] == pytest.approx(math.exp(2.0))
    assert report["word_ppl"] == pytest.approx(math.exp(6.0))
    assert report["bits_per_byte"] == pytest.approx(12.0 / (10 * math.log(2)))
