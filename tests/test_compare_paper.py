"""Specification of scripts/compare_paper_lm.py: the paper's twicing/softmax pair, side by side."""

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
def test_toy_comparison_trains_both_and_writes_table_json_and_plot(tmp_path):
    out = tmp_path / "cmp"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out), "--set", "train.steps=30", "--windows", "8"],
        capture_output=True,
        text=True,
        env=cpu_env(),
        timeout=600,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    table = (out / "comparison.md").read_text()
    assert "| metric | twicing | softmax |" in table
    assert "word-swap 10% word PPL" in table and "cos sim layer 4" in table
    assert (out / "analysis" / "analysis.png").read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((out / "comparison.json").read_text())
    assert set(summary["runs"]) == {"twicing", "softmax"}
    for run in summary["runs"].values():
        assert run["train_loss_end"] < run["train_loss_start"]
    configs = {v: yaml.safe_load((out / "configs" / f"{v}.yaml").read_text()) for v in ("twicing", "softmax")}
    assert configs["twicing"]["model"]["twicing_layers"] == "last:2"
    assert configs["softmax"]["model"]["twicing_layers"] == "none"
    assert configs["twicing"]["train"]["seed"] == configs["softmax"]["train"]["seed"]
    models = summary["analysis"]["models"]
    assert [m["twicing_layers"] for m in models] == [[2, 3], []]
    assert all(len(m["cosine_similarity"]) == 5 for m in models)


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
