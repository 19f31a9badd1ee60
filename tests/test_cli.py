"""Specification of the `lm` command line: subcommands, help, and one-line errors."""

import pytest

from conftest import run_lm
from lm.cli import COMMANDS


def test_lm_lists_its_subcommands():
    result = run_lm("--help")
    assert result.returncode == 0
    for name in ("demo", "prep", "train", "eval", "convert", "generate"):
        assert name in result.stdout


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_subcommand_has_help(command):
    result = run_lm(command, "--help")
    assert result.returncode == 0, result.stderr
    assert f"lm {command}" in result.stdout


def test_an_unknown_subcommand_is_one_error_line():
    result = run_lm("trian")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and "unknown command 'trian'" in result.stderr


@pytest.mark.parametrize("command", ["eval", "generate", "convert"])
def test_a_missing_checkpoint_is_one_error_line(command, tmp_path):
    extra = {"eval": ["--text", __file__], "generate": ["--prompt", "x"], "convert": ["--out", str(tmp_path / "o")]}[command]
    result = run_lm(command, "--checkpoint", str(tmp_path / "nothing-here"), *extra)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: checkpoint path not found: {tmp_path / 'nothing-here'}"
