"""`lm prep` on the command line: every bad input is one `error: ...` line and exit 2."""

import subprocess
import sys
from pathlib import Path

import pytest

from core.errors import UserError
from data_prep.prep import build_parser, main

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture()
def corpus(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text("\n = A = \n".join(["some text about things"] * 4))
    return path


def error_of(argv: list[str]) -> str:
    with pytest.raises(UserError) as err:
        main(argv)
    message = str(err.value)
    assert "\n" not in message, message
    return message


def test_help_documents_sources_tokenizer_parallelism_and_resume():
    text = build_parser().format_help()
    for option in (
        "--input",
        "--dataset",
        "--wikitext-dir",
        "--hf-dataset",
        "--text-field",
        "--jsonl-field",
        "--model-type",
        "--character-coverage",
        "--max-sentences",
        "--workers",
        "--tokens-per-shard",
        "--docs-per-unit",
        "--resume",
        "--overwrite",
        "mpirun",
        "wikitext-103-raw",
    ):
        assert option in text, option


def test_each_bad_input_is_one_line_naming_the_problem(tmp_path, corpus):
    out = ["--out", str(tmp_path / "out")]
    assert "input file" in error_of(["--input", str(tmp_path / "nope.txt"), *out])
    assert "nope.txt does not exist" in error_of(["--input", str(tmp_path / "nope.txt"), *out])
    (tmp_path / "blank.txt").write_text("  \n\n")
    assert "contain no text" in error_of(["--input", str(tmp_path / "blank.txt"), *out])
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    assert "latin1.txt is not valid UTF-8 (bad byte 0xe9 at byte offset 3)" in error_of(
        ["--input", str(tmp_path / "latin1.txt"), *out]
    )
    (tmp_path / "d.jsonl").write_text('{"body": "x"}\n')
    assert "d.jsonl line 1 has no field 'text' (fields: body)" in error_of(["--input", str(tmp_path / "d.jsonl"), *out])
    assert "Vocabulary size too high" in error_of(["--input", str(corpus), "--vocab-size", "50000", *out])
    assert "--workers: must be at least 1, got 0" in error_of(["--input", str(corpus), "--workers", "0", *out])
    assert "unrecognized arguments: --bogus" in error_of(["--input", str(corpus), "--bogus", *out])
    assert "give exactly one source" in error_of(out)
    assert "got --input, --wikitext-dir" in error_of(["--input", str(corpus), "--wikitext-dir", str(tmp_path), *out])
    assert "--val-fraction must be between 0 and 1" in error_of(["--input", str(corpus), "--val-fraction", "1.5", *out])
    assert "max sentences must be above 100" in error_of(["--input", str(corpus), "--max-sentences", "10", *out])
    assert "unknown WikiText dataset 'wikitext-9'" in error_of(["--dataset", "wikitext-9", *out])
    (tmp_path / "file").write_text("x")
    assert "exists and is not a directory" in error_of(["--input", str(corpus), "--out", str(tmp_path / "file")])


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--input", "missing.txt"], "error: input file missing.txt does not exist"),
        (["--input", "x.txt", "--model-type", "wordpiece"], "error: argument --model-type: invalid"),
    ],
)
def test_lm_prep_prints_one_error_line_and_exits_2(tmp_path, args, expected):
    run = subprocess.run(
        [sys.executable, "-m", "lm.cli", "prep", *args, "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert run.returncode == 2
    assert run.stderr.startswith(expected) and run.stderr.count("\n") == 1, run.stderr


def test_jsonl_and_text_inputs_together_with_a_chosen_field(tmp_path, corpus):
    (tmp_path / "more.jsonl").write_text('{"body": "jsonl document one"}\n{"body": "jsonl document two"}\n')
    out = tmp_path / "out"
    assert (
        main(
            [
                "--input",
                str(corpus),
                str(tmp_path / "more.jsonl"),
                "--jsonl-field",
                "body",
                "--out",
                str(out),
                "--vocab-size",
                "300",
                "--val-fraction",
                "0.2",
            ]
        )
        == 0
    )
    from data_prep.shards import ShardSet

    shards = ShardSet.open(out)
    assert shards.num_documents("train") + shards.num_documents("val") == 6
