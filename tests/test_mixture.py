"""Specification of weighted data mixtures (data.sources, lm.mixture): each global batch draws its
windows from the sources in proportion to the weights, as a pure function of (seed, step) that no
data-parallel layout changes; small sources repeat, and the run logs it; one tokenizer for all."""

import json

import numpy as np
import pytest
import torch

from conftest import (
    MIXTURE_TRAIN,
    assert_one_error_line,
    losses_from,
    metric_from,
    mixture_run_config,
    run_lm,
    write_config,
)
from core.errors import UserError
from data_prep.corpus import embedded_corpus, split_train_val
from data_prep.prep import prepare_shards
from lm.data import rank_rows
from lm.mixture import MixtureBatches

SEQ = 4


def source(index: int, windows: int) -> list[np.ndarray]:
    """One shard of `windows` windows whose tokens say where they come from (index * 10000 + position)."""
    return [np.arange(windows * SEQ + 1, dtype=np.int64) + 10000 * index]


def mixture(weights: dict[str, float], windows: dict[str, int], batch: int = 8, seed: int = 0) -> MixtureBatches:
    sources = [(name, w, source(i, windows[name])) for i, (name, w) in enumerate(weights.items())]
    return MixtureBatches(sources, SEQ, batch, seed)


def sources_of(batch: torch.Tensor) -> list[int]:
    """The source index of every row, from its first token."""
    return (batch[:, 0] // 10000).tolist()


def test_tokens_drawn_follow_the_weights_within_2_percent_after_50_steps():
    data = mixture({"big": 0.8, "small": 0.2}, {"big": 1000, "small": 30})
    rows = [s for k in range(50) for s in sources_of(data.global_batch(k))]
    assert abs(rows.count(1) / len(rows) - 0.2) <= 0.02
    assert data.tokens_drawn(50) == {"data/tokens/big": rows.count(0) * SEQ, "data/tokens/small": rows.count(1) * SEQ}
    # Closer than that: within one window of the weights after every step, not only on average.
    for steps in range(1, 51):
        drawn = data.windows_drawn(steps * 8)
        assert sum(drawn) == steps * 8 and abs(drawn[1] - 0.2 * steps * 8) < 1


def test_three_sources_keep_their_shares_and_the_counts_match_the_batches():
    data = mixture({"a": 5, "b": 3, "c": 1}, {"a": 500, "b": 500, "c": 500}, batch=6)
    counts = np.zeros(3)
    for k in range(40):
        counts += np.bincount(sources_of(data.global_batch(k)), minlength=3)
        assert counts.tolist() == data.windows_drawn((k + 1) * 6)
        assert np.all(np.abs(counts - np.array([5, 3, 1]) / 9 * (k + 1) * 6) < 2)  # within S - 1 windows


def test_a_mixture_batch_is_a_pure_function_of_seed_and_step():
    weights, windows = {"big": 0.8, "small": 0.2}, {"big": 300, "small": 7}
    in_order = [mixture(weights, windows).global_batch(k) for k in range(30)]
    fresh = mixture(weights, windows)
    for k in [29, 3, 17, 0, 17, 12]:  # jumping around, across the small source's epochs, as a resume would
        assert torch.equal(fresh.global_batch(k), in_order[k])
    other_seed = mixture(weights, windows, seed=1)
    assert not all(torch.equal(other_seed.global_batch(k), in_order[k]) for k in range(30))


def test_data_parallel_ranks_take_the_rows_of_the_same_global_batch():
    """No rank or DP size goes into the draw: DP 1 and DP 2 train on the same windows, in the same
    micro-step blocks (rank_rows' layout), step by step."""
    data = mixture({"big": 0.8, "small": 0.2}, {"big": 300, "small": 7})
    for k in range(20):
        batch = data.global_batch(k)
        one = [rank_rows(batch, 0, 1, 2, m) for m in range(4)]
        two = [torch.cat([rank_rows(batch, r, 2, 2, m) for r in range(2)]) for m in range(2)]
        assert torch.equal(torch.cat(one), torch.cat(two)) and torch.equal(torch.cat(one), batch)


def test_a_small_source_repeats_epoch_after_epoch_and_says_when():
    data = mixture({"big": 0.8, "small": 0.2}, {"big": 1000, "small": 5})
    small = [row[0].item() for k in range(40) for row in data.global_batch(k) if row[0] >= 10000]
    epochs = [small[i : i + 5] for i in range(0, 60, 5)]
    assert all(sorted(e) == list(range(10000, 10020, 4)) for e in epochs)  # every window once per epoch
    assert len({tuple(e) for e in epochs}) > 1  # each epoch shuffled afresh
    # new_epochs names the batch that draws each new epoch's first window: small window 5, 10, ...
    starts = {k: e for k in range(40) for _, e, _ in data.new_epochs(k)}
    drawn = [data.windows_drawn(k * 8)[1] for k in range(41)]
    expected = {k: e for k in range(40) for e in range(1, 20) if drawn[k] <= 5 * e < drawn[k + 1]}
    assert starts == expected and list(expected.values())[:3] == [1, 2, 3]


def test_a_source_without_one_window_is_named():
    with pytest.raises(UserError, match="data.sources small: .* gives only 0 windows"):
        MixtureBatches([("big", 1.0, source(0, 10)), ("small", 1.0, [np.arange(3)])], SEQ, 2, 0)


@pytest.fixture(scope="module")
def other_tokenizer_shards(tmp_path_factory):
    """Shards of a few documents with a tokenizer trained on them: of the same size, not the same."""
    train, val = split_train_val(embedded_corpus()[:24], val_fraction=0.2, seed=0)
    return prepare_shards(train[:8], val[:1], tmp_path_factory.mktemp("other-tokenizer"), vocab_size=384)


def test_a_source_of_another_tokenizer_is_refused_naming_both(
    mixture_shards, other_tokenizer_shards, tmp_path, lm_in_process
):
    sources = {"big": (mixture_shards["big"], 0.8), "other": (other_tokenizer_shards, 0.2)}
    config = write_config(tmp_path / "c.yaml", mixture_run_config(sources, tmp_path / "run"))
    result = lm_in_process("train", "--config", str(config))
    assert_one_error_line(result, "data.sources big and other were tokenized differently", "lm prep --tokenizer")
    assert not (tmp_path / "run").exists()


def test_a_missing_source_directory_is_named_with_its_source(mixture_shards, tmp_path, lm_in_process):
    sources = {"big": (mixture_shards["big"], 0.8), "gone": (tmp_path / "no-shards", 0.2)}
    config = write_config(tmp_path / "c.yaml", mixture_run_config(sources, tmp_path / "run"))
    assert_one_error_line(lm_in_process("train", "--config", str(config)), "data.sources gone: ", "no-shards")


def test_lm_plan_takes_a_mixture_config(mixture_shards, tmp_path, lm_in_process):
    """Commands that read a run config but no data (lm plan, lm launch, lm eval of a run) take data.sources."""
    sources = {"big": (mixture_shards["big"], 0.8), "small": (mixture_shards["small"], 0.2)}
    config = write_config(tmp_path / "c.yaml", mixture_run_config(sources, tmp_path / "run"))
    result = lm_in_process("plan", "--config", str(config), "--world", "1", "--json")
    assert result.returncode == 0 and json.loads(result.stdout)["per_rank_bytes"]["total"] > 0, result.stderr


# ---- a real run: 50 steps of 0.8 big / 0.2 small (conftest.mixture_runs) ---------------------


@pytest.mark.slow
def test_the_run_logs_tokens_per_source_within_2_percent_of_the_weights(mixture_runs):
    big, small = (metric_from(mixture_runs / "straight", f"data/tokens/{n}") for n in ("big", "small"))
    assert sorted(big) == sorted(small) == list(range(1, 51))  # every step, cumulative
    assert big[50] + small[50] == 50 * 8 * 32  # every target token of the run, drawn once
    assert abs(small[50] / (big[50] + small[50]) - 0.2) <= 0.02
    assert all(small[s] <= small[s + 1] for s in range(1, 50))


@pytest.mark.slow
def test_a_mixture_run_resumed_mid_run_continues_bitwise(mixture_runs):
    straight, resumed = mixture_runs / "straight", mixture_runs / "resumed"
    assert sorted(losses_from(resumed)) == list(range(21, 51))
    for key in ("train/loss", "train/lr", "data/tokens/big", "data/tokens/small", "val/loss", "val/loss/small"):
        after_20 = {step: value for step, value in metric_from(straight, key).items() if step > 20}
        assert metric_from(resumed, key) == after_20, key


@pytest.mark.slow
def test_two_data_parallel_ranks_train_on_the_windows_of_one(mixture_runs, mixture_shards, tmp_path):
    """10 steps of the mixture run under torchrun with 2 ranks: the same windows, so the same losses to
    fp32 rounding of the gradient all-reduce (test_training's 2e-6 for DP 2 against one process)."""
    sources = {"big": (mixture_shards["big"], 0.8), "small": (mixture_shards["small"], 0.2)}
    config = write_config(tmp_path / "dp2.yaml", mixture_run_config(sources, tmp_path / "dp2", MIXTURE_TRAIN))
    result = run_lm("lm.train", "--config", str(config), "--stop-at", "10", nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    straight, dp2 = mixture_runs / "straight", tmp_path / "dp2"
    first_10 = {step: loss for step, loss in losses_from(straight).items() if step <= 10}
    assert losses_from(dp2) == pytest.approx(first_10, rel=2e-6)
    for key in ("data/tokens/big", "data/tokens/small"):
        assert metric_from(dp2, key) == {step: n for step, n in metric_from(straight, key).items() if step <= 10}
    assert metric_from(dp2, "val/loss/small")[0] == pytest.approx(metric_from(straight, "val/loss/small")[0], rel=1e-6)


@pytest.mark.slow
def test_validation_scores_each_source_and_the_mixture_as_weighted(mixture_runs):
    lines = [json.loads(line) for line in (mixture_runs / "straight" / "metrics.jsonl").read_text().splitlines()]
    val = [m for m in lines if "val/loss" in m]
    assert [m["step"] for m in val] == [0, 25, 50]
    for m in val:
        assert m["val/loss/big"] != m["val/loss/small"]  # different texts
        assert m["val/loss"] == pytest.approx(0.8 * m["val/loss/big"] + 0.2 * m["val/loss/small"], rel=1e-12)


@pytest.mark.slow
def test_each_epoch_of_the_small_source_is_logged_once(mixture_runs):
    lines = [json.loads(line) for line in (mixture_runs / "straight" / "metrics.jsonl").read_text().splitlines()]
    events = [(m["step"], m["event"]) for m in lines if "event" in m]
    # 25 small windows, 1.6 per step: epochs 1, 2, 3 start at the 25th, 50th and 75th small window
    small = metric_from(mixture_runs / "straight", "data/tokens/small")
    steps = [next(s for s in range(1, 51) if small[s] // 32 > 25 * e) for e in (1, 2, 3)]
    line = "step {}: data source small starts epoch {}, its 25 windows again"
    assert events == [(s, line.format(s, e)) for e, s in zip((1, 2, 3), steps)]
