"""Specification of the `lm` command line: subcommands, help, and one-line errors.

`lm --help` and an unknown command run as real processes (the console entry); the subcommands'
help and errors are called in this process through the same lm.cli.main.
"""

import pytest

from conftest import run_lm
from lm.cli import COMMANDS


def test_lm_lists_its_subcommands():
    result = run_lm("--help")
    assert result.returncode == 0
    for name in ("demo", "prep", "train", "eval", "convert", "generate"):
        assert name in result.stdout


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_subcommand_has_help(command, lm_in_process):
    result = lm_in_process(command, "--help")
    assert result.returncode == 0, result.stderr
    assert f"lm {command}" in result.stdout


def test_an_unknown_subcommand_is_one_error_line():
    result = run_lm("trian")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and "unknown command 'trian'" in result.stderr


@pytest.mark.parametrize("command", ["eval", "generate", "convert"])
def test_a_missing_checkpoint_is_one_error_line(command, tmp_path, lm_in_process):
    extra = {"eval": ["--text", __file__], "generate": ["--prompt", "x"], "convert": ["--out", str(tmp_path / "o")]}[
        command
    ]
    result = lm_in_process(command, "--checkpoint", str(tmp_path / "nothing-here"), *extra)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: checkpoint path not found: {tmp_path / 'nothing-here'}"
