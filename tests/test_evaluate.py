"""Specification of sliding-window perplexity (lm.evaluate)."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import (
    BOS,
    TINY_MODEL,
    TRAINED_STEPS,
    assert_one_error_line,
    converted_dir,
    run_lm,
    tiny_model,
    token_ids,
    val_text,
)
from core.errors import run_command
from lm.convert import convert
from lm.evaluate import document_ids, evaluate_text, perplexity_report, sliding_window_nll, window_plan
from lm.evaluate import main as eval_main
from lm.inference import load_for_inference, load_model


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


# ---- lm eval end to end: checkpoints, texts, normalisation, parallel layouts --------------------

KNOWN_TEXT = "Die Straße  is\tnaïve.\n\nA second paragraph, with 7 words.\n"  # 10 words, multi-byte letters


def eval_json(capsys, *argv: str) -> dict:
    assert eval_main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def hand_nll(model, sequence: list[int], context: int) -> float:
    """Sum over targets j of -log p(sequence[j] | the `context` tokens before it), one forward each."""
    total = 0.0
    with torch.no_grad():
        for j in range(1, len(sequence)):
            inputs = torch.tensor([sequence[max(0, j - context) : j]])
            total -= torch.log_softmax(model(inputs)[0][0, -1].double(), dim=-1)[sequence[j]].item()
    return total


def test_window_plan_scores_each_target_once_and_batches_equal_lengths():
    plan = window_plan(10, context=4, stride=3)
    assert plan == [(0, 4, 4), (3, 7, 3), (6, 10, 3)]
    assert sum(keep for _, _, keep in plan) == 10
    assert window_plan(3, context=4, stride=1) == [(0, 3, 3)]  # shorter than the context: one window


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_batched_windows_sum_to_the_one_window_at_a_time_result(batch_size):
    model, ids = tiny_model(), token_ids(41)
    one_by_one, _ = sliding_window_nll(model, ids, BOS, context=8, stride=3, batch_size=1)
    batched, _ = sliding_window_nll(model, ids, BOS, context=8, stride=3, batch_size=batch_size)
    assert batched == pytest.approx(one_by_one, rel=1e-12)


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_the_shares_of_three_ranks_sum_to_the_one_window_at_a_time_result(batch_size):
    model, ids = tiny_model(), token_ids(41)
    one_by_one, tokens = sliding_window_nll(model, ids, BOS, context=8, stride=3, batch_size=1)
    shares = [sliding_window_nll(model, ids, BOS, 8, 3, batch_size, rank=r, world_size=3) for r in range(3)]
    assert sum(s[0] for s in shares) == pytest.approx(one_by_one, rel=1e-12) and sum(s[1] for s in shares) == tokens


def test_lm_eval_equals_a_hand_computed_nll_with_word_and_byte_normalisation(tiny_shards, tmp_path, capsys):
    ckpt = converted_dir(tmp_path / "model", tiny_shards)
    (tmp_path / "known.txt").write_text(KNOWN_TEXT * 3, encoding="utf-8")
    model, tokenizer, _ = load_for_inference(ckpt)
    sequence = [tokenizer.eod_id] + tokenizer.encode(KNOWN_TEXT * 3)
    assert len(sequence) > 40  # longer than the context below: several windows
    # stride 1: every target sees exactly the `context` tokens before it
    report = eval_json(
        capsys, "--checkpoint", str(ckpt), "--text", str(tmp_path / "known.txt"), "--context", "16", "--stride", "1"
    )
    nll = hand_nll(model, sequence, context=16)
    assert report["nll"] == pytest.approx(nll, rel=1e-5)
    words, nbytes = 30, len((KNOWN_TEXT * 3).encode("utf-8"))
    assert (report["tokens"], report["words"], report["bytes"]) == (len(sequence) - 1, words, nbytes)
    assert nbytes == 3 * (len(KNOWN_TEXT) + 2)  # "ß" and "ï" take two bytes each
    assert report["token_ppl"] == pytest.approx(math.exp(nll / (len(sequence) - 1)), rel=1e-5)
    assert report["word_ppl"] == pytest.approx(math.exp(nll / words), rel=1e-5)
    assert report["bits_per_byte"] == pytest.approx(nll / (nbytes * math.log(2)), rel=1e-5)


def test_stride_does_not_matter_for_a_text_shorter_than_the_context(tiny_shards, tmp_path):
    model, tokenizer, _ = load_for_inference(converted_dir(tmp_path / "model", tiny_shards))
    text = "A short text."
    n = len(tokenizer.encode(text))
    assert n < 32
    reports = [evaluate_text(model, tokenizer, text, context=32, stride=s) for s in (1, 7, 32)]
    assert all(r["nll"] == pytest.approx(reports[0]["nll"], rel=1e-6) for r in reports)
    by_hand = hand_nll(model, [tokenizer.eod_id] + tokenizer.encode(text), 32)
    assert reports[0]["nll"] == pytest.approx(by_hand, rel=1e-5)


def write_wikitext(root: Path) -> dict[str, list[str]]:
    """A two-article WikiText copy (wiki.{train,valid,test}.raw); returns the articles per split."""
    articles = {
        "train": [" = Alpha = \n\n Alpha is a letter .\n", " = Beta = \n\n Beta follows alpha .\n"],
        "valid": [" = Gamma = \n\n Gamma rays are energetic .\n"],
        "test": [
            " = Delta = \n\n = = History = = \n\n Delta is a river mouth .\n",
            " = Epsilon = \n\n Small , positive .\n",
        ],
    }
    root.mkdir()
    for split, docs in articles.items():
        (root / f"wiki.{split}.raw").write_text("".join(docs), encoding="utf-8")
    return {s: [d.strip() for d in docs] for s, docs in articles.items()}


def test_wikitext_split_is_its_articles_joined_by_eod_and_counted_as_text(tiny_shards, tmp_path, capsys):
    ckpt = converted_dir(tmp_path / "model", tiny_shards)
    articles = write_wikitext(tmp_path / "wt")["test"]
    report = eval_json(
        capsys,
        "--checkpoint",
        str(ckpt),
        "--dataset",
        "wikitext-103-raw",
        "--wikitext-dir",
        str(tmp_path / "wt"),
        "--split",
        "test",
        "--stride",
        "1",
    )
    model, tokenizer, _ = load_for_inference(ckpt)
    sequence = [tokenizer.eod_id] + tokenizer.encode(articles[0]) + [tokenizer.eod_id] + tokenizer.encode(articles[1])
    assert document_ids(tokenizer, articles) == sequence[1:]
    assert report["documents"] == 2 and report["tokens"] == len(sequence) - 1
    text = "\n".join(articles)
    assert report["words"] == len(text.split()) == 21 and report["bytes"] == len(text.encode("utf-8"))
    assert report["nll"] == pytest.approx(hand_nll(model, sequence, 32), rel=1e-5)


@pytest.mark.parametrize(
    "argv,fragment",
    [
        (["--text", "NO_SUCH_FILE.txt"], "text file not found"),
        (["--dataset", "wikitext-103-raw", "--wikitext-dir", "WT", "--split", "dev"], "invalid choice: 'dev'"),
        (["--dataset", "wikitext-9"], "invalid choice: 'wikitext-9'"),
        (["--wikitext-dir", "NO_SUCH_DIR"], "does not exist"),
        (["--text", "KNOWN", "--stride", "0"], "stride must be in 1..context"),
        (["--text", "KNOWN", "--stride", "40", "--context", "32"], "stride must be in 1..context (32)"),
        (["--text", "KNOWN", "--context", "64"], "exceeds the model's context of 32"),
        (["--text", "KNOWN", "--dataset", "wikitext-103"], "not both"),
        ([], "nothing to evaluate"),
    ],
)
def test_every_bad_input_is_one_error_line(tiny_shards, tmp_path, capsys, argv, fragment):
    ckpt = converted_dir(tmp_path / "model", tiny_shards)
    write_wikitext(tmp_path / "WT")
    (tmp_path / "KNOWN").write_text(KNOWN_TEXT)
    argv = [str(tmp_path / a) if a in ("KNOWN", "WT", "NO_SUCH_DIR") else a for a in argv]
    assert run_command(eval_main, ["--checkpoint", str(ckpt), *argv]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], lines


def test_a_missing_checkpoint_is_one_error_line_through_the_command_line(tmp_path):
    (tmp_path / "t.txt").write_text(KNOWN_TEXT)
    result = run_lm("eval", "--checkpoint", str(tmp_path / "nope"), "--text", str(tmp_path / "t.txt"))
    assert_one_error_line(result, "checkpoint path not found")


@pytest.mark.slow
def test_a_smaller_stride_is_never_worse_on_a_trained_model(trained_tiny_run):
    model, tokenizer, _ = load_for_inference(trained_tiny_run)
    text = val_text()
    reports = {s: evaluate_text(model, tokenizer, text, context=32, stride=s) for s in (32, 16, 8)}
    nll = {s: r["nll"] for s, r in reports.items()}
    # Deterministic (seeded single-process fp32 training). Measured with the per-parameter initial
    # weights: 32 -> 59022, 16 -> 58992, 8 -> 59070 nats (at 200 steps 56939, 56895, 56907). At least
    # 16 tokens of history always help; this small model gains nothing measurable beyond 16, so there
    # the check allows the noise between strides 16 and 8 (0.13% measured), not a real loss.
    assert nll[16] < nll[32], nll
    assert nll[8] <= 1.002 * min(nll[16], nll[32]), nll
    assert len({r["tokens"] for r in reports.values()}) == 1  # the same tokens, scored with more history
    uniform = math.log(TINY_MODEL["vocab_size"]) * reports[32]["tokens"]
    assert nll[32] < 0.8 * uniform  # it did learn


@pytest.mark.slow
def test_data_parallel_eval_under_torchrun_equals_one_process(trained_tiny_run, tmp_path, capsys):
    (tmp_path / "val.txt").write_text(val_text(), encoding="utf-8")
    args = [
        "--checkpoint",
        str(trained_tiny_run),
        "--text",
        str(tmp_path / "val.txt"),
        "--context",
        "32",
        "--stride",
        "8",
        "--json",
    ]
    single = eval_json(capsys, *args[:-1])
    result = run_lm("lm.evaluate", *args, nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1  # rank 0 prints
    parallel = json.loads(lines[0])
    assert parallel["ranks"] == 2 and parallel["tokens"] == single["tokens"] > 1000
    assert parallel["nll"] == pytest.approx(single["nll"], rel=1e-6)
    for key in ("token_ppl", "word_ppl", "bits_per_byte"):
        assert parallel[key] == pytest.approx(single[key], rel=1e-6)


@pytest.mark.slow
def test_eval_of_a_deepspeed_tp2_checkpoint_equals_the_tp1_model_it_was_sliced_from(trained_tiny_run, tmp_path, capsys):
    source = trained_tiny_run  # read-only: the TP=2 run is written next to it, in tmp_path
    sliced = tmp_path / "tp2"
    convert(str(source), sliced, to="checkpoint", tensor_parallel=2)  # a weights-only TP=2 run directory
    # One TP=2 DeepSpeed step from the sliced weights at lr 1e-30: AdamW moves no fp32 weight by
    # even one ulp, so the TP=2 DeepSpeed checkpoint holds exactly the TP=1 weights, split in two.
    result = run_lm(
        "lm.train",
        "--config",
        str(sliced / "config.yaml"),
        "--resume",
        str(sliced),
        "--set",
        f"train.steps={TRAINED_STEPS + 1}",
        "--set",
        "train.lr=1e-30",
        "--set",
        "train.min_lr=1e-30",
        "--set",
        "train.eval_windows=0",
        nproc=2,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    tag = sliced / "checkpoints" / f"step{TRAINED_STEPS + 1:08d}"
    marker = json.loads((tag / "complete.json").read_text())
    assert marker["config"]["train"]["tensor_parallel"] == 2 and marker["world_size"] == 2
    assert not (tag / "model.safetensors").exists()  # DeepSpeed's own per-rank files
    merged, original = load_model(tag)[0].state_dict(), load_model(source)[0].state_dict()
    assert all(torch.allclose(merged[k], original[k], rtol=0, atol=1e-20) for k in original)
    (tmp_path / "val.txt").write_text(val_text(), encoding="utf-8")
    text_args = ["--text", str(tmp_path / "val.txt"), "--context", "32", "--stride", "8"]
    tp2 = eval_json(capsys, "--checkpoint", str(tag), *text_args)
    tp1 = eval_json(capsys, "--checkpoint", str(source), *text_args)
    assert tp2["nll"] == pytest.approx(tp1["nll"], rel=1e-6) and tp2["tokens"] == tp1["tokens"]
