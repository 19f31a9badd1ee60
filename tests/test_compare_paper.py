"""Specification of scripts/compare_paper_lm.py: the paper's twicing/softmax pair, side by side."""

import importlib.util
import json
import subprocess
import sys

import pytest
import yaml

from conftest import REPO, cpu_env
from lm.config import load_config

SCRIPT = REPO / "scripts" / "compare_paper_lm.py"


def test_the_paper_configs_have_the_paper_shape_and_differ_only_in_attention():
    twicing, softmax = (load_config(REPO / "configs" / f"paper-lm-{v}.yaml") for v in ("twicing", "softmax"))
    m = twicing.model
    assert (m.n_layer, m.n_embd, m.n_head, m.ffn_dim, m.block_size) == (16, 128, 8, 2048, 256)
    assert twicing.model.twicing_layer_indices() == [14, 15] and softmax.model.twicing_layer_indices() == []
    a, b = twicing.to_dict(), softmax.to_dict()
    a["model"].pop("twicing_layers"), b["model"].pop("twicing_layers")
    a["train"].pop("out_dir"), b["train"].pop("out_dir")
    assert a == b  # same data, seed, schedule


@pytest.mark.slow
def test_toy_comparison_trains_both_with_two_seeds_and_writes_error_bars_json_and_plot(tmp_path):
    out = tmp_path / "cmp"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out), "--seeds", "2", "--set", "train.steps=15"]
        + ["--windows", "8", "--rates", "0,0.1"],
        capture_output=True,
        text=True,
        env=cpu_env(),
        timeout=600,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    table = (out / "comparison.md").read_text()
    assert "| metric | twicing | softmax | twicing − softmax | significant |" in table
    assert "Welch's t-test" in table and "Seeds: 1337, 1338" in table
    assert "| clean word PPL |" in table and "| word-swap 10% word PPL |" in table and "cos sim layer 4" in table
    assert (out / "analysis" / "analysis.png").read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((out / "comparison.json").read_text())
    assert summary["seeds"] == [1337, 1338] and set(summary["runs"]) == {"twicing", "softmax"}
    for variant, runs in summary["runs"].items():
        assert [r["seed"] for r in runs] == [1337, 1338]
        for run in runs:
            assert run["train_loss_end"] < run["train_loss_start"]
            config = yaml.safe_load((out / "configs" / f"{variant}-seed{run['seed']}.yaml").read_text())
            assert config["train"]["seed"] == run["seed"]
            assert config["model"]["twicing_layers"] == ("last:2" if variant == "twicing" else "none")
    models = summary["analysis"]["models"]
    assert [m["label"] for m in models] == [
        "twicing-seed1337",
        "twicing-seed1338",
        "softmax-seed1337",
        "softmax-seed1338",
    ]
    assert [m["twicing_layers"] for m in models] == [[2, 3], [2, 3], [], []]
    assert all(len(m["cosine_similarity"]) == 5 for m in models)
    clean = next(row for row in summary["statistics"] if row["metric"] == "clean word PPL")
    assert clean["twicing"]["values"] == [m["clean"]["word_ppl"] for m in models[:2]]
    assert clean["twicing"]["sd"] > 0 and clean["p"] is not None and isinstance(clean["significant"], bool)


@pytest.fixture(scope="module")
def compare():
    """The script as a module, for its statistics."""
    spec = importlib.util.spec_from_file_location("compare_paper_lm", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def analysed(word_ppls: list[float], cosines: list[list[float]]) -> list[dict]:
    """Models as lm.analyze reports them, with only the compared numbers (one rate: clean)."""
    return [{"clean": {"word_ppl": w}, "word_swap": [{}], "cosine_similarity": c} for w, c in zip(word_ppls, cosines)]


def test_a_difference_is_significant_only_where_it_exceeds_the_spread_of_the_seeds(compare):
    models = {
        "twicing": analysed([100.0, 101.0, 99.0], [[0.5, 0.90], [0.5, 0.80], [0.5, 0.70]]),
        "softmax": analysed([120.0, 121.0, 119.0], [[0.5, 0.85], [0.5, 0.75], [0.5, 0.95]]),
    }
    name, test = compare.significance_test()
    assert name.startswith("Welch's t-test")
    rows = {row["metric"]: row for row in compare.seed_statistics(models, [0.0], test)}
    ppl, cosine = rows["clean word PPL"], rows["cos sim layer 1 (block 1)"]
    assert ppl["twicing"]["mean"] == 100.0 and ppl["twicing"]["sd"] == 1.0 and ppl["difference"] == -20.0
    assert ppl["significant"] and ppl["p"] < 0.001  # Welch: t = -24.5 on 4 degrees of freedom
    assert not cosine["significant"] and cosine["p"] > 0.5  # 0.05 apart, with a spread of 0.1 each
    table = compare.statistics_table(list(rows.values()))
    assert "| clean word PPL | 100.00 ± 1.00 | 120.00 ± 1.00 | -20.00 | yes (p = 0.000) |" in table


def test_without_scipy_the_rule_is_two_standard_errors_of_the_difference(compare, monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy.stats", None)
    name, test = compare.significance_test()
    assert "2 sqrt(s1²/N + s2²/N)" in name and "scipy not installed" in name
    # each sample's variance is 2, so the standard error of the difference is sqrt(2/2 + 2/2) = 1.414
    assert test([10.0, 12.0], [12.8, 14.8]) == (False, None)  # 2.8 apart: within 2 SE (2.83)
    assert test([10.0, 12.0], [12.9, 14.9]) == (True, None)


def test_one_seed_reports_values_without_a_verdict(compare):
    models = {"twicing": analysed([100.0], [[0.5]]), "softmax": analysed([120.0], [[0.6]])}
    row = compare.seed_statistics(models, [0.0], compare.significance_test()[1])[0]
    assert row["twicing"]["sd"] is None and row["significant"] is None
    assert "| clean word PPL | 100.00 | 120.00 | -20.00 | n/a (one seed) |" in compare.statistics_table([row])


def test_comparison_refuses_a_non_empty_out_dir(tmp_path):
    (tmp_path / "x").write_text("x")
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=cpu_env(),
        timeout=120,
        cwd=REPO,
    )
    expected = f"error: output directory {tmp_path} is not empty; choose another --out"
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [expected]
