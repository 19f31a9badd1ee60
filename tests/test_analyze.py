"""Specification of `lm analyze`: over-smoothing, word-swap robustness, spectral curves (lm.analyze)."""

import json
import math

import numpy as np
import pytest
import torch

from conftest import BOS, converted_dir, tiny_model, token_ids, val_text
from core.errors import run_command
from lm.analyze import (
    analysis_windows,
    cosine_similarity_per_layer,
    layer_outputs,
    mean_pairwise_cosine,
    spectral_curves,
    word_swap,
)
from lm.analyze import main as analyze_main


def test_mean_pairwise_cosine_equals_the_average_over_pairs_i_ne_j():
    h = torch.randn(2, 7, 5, generator=torch.Generator().manual_seed(0))
    for b in range(2):
        u = torch.nn.functional.normalize(h[b].double(), dim=-1)
        pairs = [(u[i] @ u[j]).item() for i in range(7) for j in range(7) if i != j]
        assert mean_pairwise_cosine(h)[b].item() == pytest.approx(sum(pairs) / len(pairs), rel=1e-12)
    same = torch.ones(4, 3)
    assert mean_pairwise_cosine(same).item() == pytest.approx(1.0)  # collapsed tokens
    assert mean_pairwise_cosine(torch.tensor([[1.0, 0.0], [-1.0, 0.0]])).item() == pytest.approx(-1.0)


def test_layer_outputs_are_the_embedding_and_every_block_output():
    model = tiny_model()
    idx = torch.tensor([token_ids(8)])
    outputs = layer_outputs(model, idx)
    assert len(outputs) == model.config.n_layer + 1
    x = model.transformer.wte(idx) + model.transformer.wpe(torch.arange(8))
    assert torch.allclose(outputs[0], x)
    for block, out in zip(model.transformer.h, outputs[1:]):
        x = block(x)
        assert torch.allclose(out, x)
    assert not model.transformer.drop._forward_hooks  # the hooks are removed again


def test_cosine_windows_are_non_overlapping_context_windows_evenly_spread():
    assert analysis_windows(100, 10, 64) == [(i * 10, i * 10 + 10) for i in range(10)]
    assert analysis_windows(100, 10, 3) == [(0, 10), (40, 50), (90, 100)]
    assert analysis_windows(7, 10, 3) == [(0, 7)]  # shorter than one context: one window


def test_cosine_similarity_per_layer_averages_each_windows_mean_pairwise_cosine():
    model = tiny_model()
    per_layer = cosine_similarity_per_layer(model, token_ids(40), BOS, context=8, max_windows=2)
    by_hand = [0.0] * 3
    sequence = torch.tensor([[BOS] + token_ids(40)])
    for s, e in [(0, 8), (32, 40)]:
        for layer, h in enumerate(layer_outputs(model, sequence[:, s:e])):
            by_hand[layer] += mean_pairwise_cosine(h)[0].item() / 2
    assert per_layer == pytest.approx(by_hand, rel=1e-10)


def test_word_swap_replaces_the_seeded_fraction_of_words_by_other_words_of_the_text():
    docs = ["the cat sat on the mat\nand  the dog sat too", "a b c d e f g h i j"]
    words = " ".join(docs).split()
    for rate in (0.0, 0.1, 0.25, 0.5, 1.0):
        swapped = word_swap(docs, rate, seed=3)
        new = " ".join(swapped).split()
        changed = sum(a != b for a, b in zip(words, new))
        assert len(new) == len(words) and changed == round(rate * len(words))
        assert set(new) <= set(words)  # drawn from the text's own vocabulary
        assert [len(d.splitlines()) for d in swapped] == [2, 1] and "and  " in swapped[0] or rate > 0
    assert word_swap(docs, 0.25, seed=3) == word_swap(docs, 0.25, seed=3)  # seeded
    assert word_swap(docs, 0.25, seed=3) != word_swap(docs, 0.25, seed=4)
    low, high = (" ".join(word_swap(docs, r, seed=3)).split() for r in (0.25, 0.5))
    assert all(h == lo for w, lo, h in zip(words, low, high) if lo != w)  # nested: 25% swaps stay at 50%


def test_spectral_curves_twicing_keeps_eigenvalues_near_one():
    curves = spectral_curves(powers=(1, 2, 8), points=5)
    x = np.array(curves["x"])
    assert curves["x"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert curves["softmax"]["2"][2] == pytest.approx(0.25) and curves["twicing"]["2"][2] == pytest.approx(0.75**2)
    assert curves["twicing"]["1"] == pytest.approx((2 * x - x**2).tolist())
    for n in ("1", "2", "8"):
        assert all(t >= s for t, s in zip(curves["twicing"][n], curves["softmax"][n]))
        assert curves["softmax"][n][-1] == curves["twicing"][n][-1] == 1.0
    assert curves["softmax"]["8"][3] == pytest.approx(0.75**8) and curves["twicing"]["8"][3] == pytest.approx(0.9375**8)


def test_analyze_writes_json_and_png_with_the_expected_keys(tiny_shards, tmp_path, capsys):
    a = converted_dir(tmp_path / "a", tiny_shards)
    b = converted_dir(tmp_path / "b", tiny_shards, model={"twicing_layers": "none"})
    (tmp_path / "t.txt").write_text(val_text(chars=3000), encoding="utf-8")
    out = tmp_path / "out"
    assert (
        analyze_main(
            [
                "--checkpoint",
                str(a),
                "--checkpoint",
                str(b),
                "--label",
                "twicing",
                "--label",
                "softmax",
                "--text",
                str(tmp_path / "t.txt"),
                "--out",
                str(out),
                "--rates",
                "0,0.1,0.3",
                "--windows",
                "4",
            ]
        )
        == 0
    )
    analysis = json.loads((out / "analysis.json").read_text())
    assert (out / "analysis.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {"text", "settings", "cosine_pairs", "models", "spectral"} <= set(analysis)
    assert [m["label"] for m in analysis["models"]] == ["twicing", "softmax"]
    assert [m["twicing_layers"] for m in analysis["models"]] == [[1], []]
    for m in analysis["models"]:
        assert len(m["cosine_similarity"]) == 3 and all(-1 <= c <= 1 for c in m["cosine_similarity"])
        assert [s["rate"] for s in m["word_swap"]] == [0.0, 0.1, 0.3]
        assert m["clean"]["token_ppl"] == m["word_swap"][0]["token_ppl"]
        assert {"token_ppl", "word_ppl", "bits_per_byte", "tokens", "words", "bytes"} <= set(m["clean"])
        assert len({s["words"] for s in m["word_swap"]}) == 1  # swapping keeps the word count
    assert "| metric | twicing | softmax |" in capsys.readouterr().out


@pytest.mark.slow
def test_word_swap_perplexity_rises_with_the_rate_on_a_trained_model(trained_tiny_run, tmp_path):
    (tmp_path / "val.txt").write_text(val_text(), encoding="utf-8")
    out = tmp_path / "out"
    assert (
        analyze_main(
            [
                "--checkpoint",
                str(trained_tiny_run),
                "--text",
                str(tmp_path / "val.txt"),
                "--out",
                str(out),
                "--rates",
                "0,0.1,0.2,0.4",
                "--windows",
                "16",
            ]
        )
        == 0
    )
    model = json.loads((out / "analysis.json").read_text())["models"][0]
    ppl = [s["word_ppl"] for s in model["word_swap"]]
    assert ppl == sorted(ppl) and ppl[-1] > 1.5 * ppl[0], ppl
    cosines = model["cosine_similarity"]
    assert all(-1 <= c <= 1 for c in cosines) and not any(math.isnan(c) for c in cosines)


@pytest.mark.parametrize(
    "extra,fragment",
    [
        (["--out", "NONEMPTY"], "is not empty"),
        (["--out", "OUT", "--rates", "0,1.5"], "rates must be in [0, 1]"),
        (["--out", "OUT", "--text", "NO_SUCH_FILE"], "text file not found"),
        (["--out", "OUT", "--split", "dev"], "invalid choice: 'dev'"),
        (["--out", "OUT", "--stride", "0"], "stride must be in 1..context"),
    ],
)
def test_every_bad_analyze_input_is_one_error_line(tiny_shards, tmp_path, capsys, extra, fragment):
    ckpt = converted_dir(tmp_path / "a", tiny_shards)
    (tmp_path / "NONEMPTY").mkdir()
    (tmp_path / "NONEMPTY" / "x").write_text("x")
    (tmp_path / "t.txt").write_text("some words to analyse here and there")
    argv = ["--checkpoint", str(ckpt)] + (["--text", str(tmp_path / "t.txt")] if "--text" not in extra else [])
    argv += [str(tmp_path / a) if a in ("NONEMPTY", "OUT", "NO_SUCH_FILE") else a for a in extra]
    assert run_command(analyze_main, argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], lines
    assert not (tmp_path / "OUT").exists()
