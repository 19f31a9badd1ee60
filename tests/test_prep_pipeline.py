"""The parallel prep pipeline: bytes independent of workers and ranks, resuming, --out rules.

Multi-process runs are marked slow (CI runs them too). A WikiText-style corpus is written by
each test from the embedded corpus; small work units make every run span many units.
"""

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, mpirun_command
from core.errors import UserError
from data_prep import units
from data_prep.corpus import embedded_corpus
from data_prep.prep import main
from data_prep.shards import ShardSet
from data_prep.tokenizer import Tokenizer, train_sentencepiece

VOCAB = "400"
SMALL = ["--vocab-size", VOCAB, "--docs-per-unit", "3", "--tokens-per-shard", "20000"]


@pytest.fixture(scope="module")
def wiki(tmp_path_factory) -> Path:
    """wiki.{train,valid,test}.tokens: articles of a few sections each."""
    root = tmp_path_factory.mktemp("wikitext")
    docs = embedded_corpus()

    def article(i: int, doc: str) -> str:
        sections = doc.split("\n\n")[:5]
        return f" = Article {i} = \n \n" + "\n = = Part = = \n".join(sections) + "\n"

    for name, part in (("train", docs[:48]), ("valid", docs[48:54]), ("test", docs[54:60])):
        (root / f"wiki.{name}.tokens").write_text("".join(article(i, d) for i, d in enumerate(part)))
    return root


def prep(wiki: Path, out: Path, *extra: str) -> Path:
    assert main(["--wikitext-dir", str(wiki), "--out", str(out), *SMALL, *extra]) == 0
    return out


def files(out: Path) -> dict[str, bytes]:
    """Every file of a shard dir (hidden ones included: none may be left behind)."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


@pytest.fixture(scope="module")
def reference(wiki, tmp_path_factory) -> dict[str, bytes]:
    """The bytes of an uninterrupted one-worker run."""
    return files(prep(wiki, tmp_path_factory.mktemp("ref") / "out"))


def test_reference_run_writes_all_three_wikitext_splits(reference):
    assert {
        "manifest.json",
        "tokenizer.model",
        "train-00000.bin",
        "train-00001.bin",
        "val-00000.bin",
        "test-00000.idx",
    } <= set(reference)
    assert not [n for n in reference if n.startswith(".")], "no work files may remain"


@pytest.mark.slow
def test_shard_bytes_are_identical_for_1_2_and_3_workers(wiki, reference, tmp_path):
    for workers in ("2", "3"):
        assert files(prep(wiki, tmp_path / workers, "--workers", workers)) == reference


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("mpirun") is None, reason="no mpirun (Open MPI) installed")
def test_shard_bytes_are_identical_under_mpirun_with_two_ranks(wiki, reference, tmp_path):
    pytest.importorskip("mpi4py")
    out = tmp_path / "mpi"
    command = mpirun_command(
        2, sys.executable, "-m", "data_prep.prep", "--wikitext-dir", str(wiki), "--out", str(out), *SMALL
    )
    run = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("wrote ") == 1, "only rank 0 reports"
    assert files(out) == reference


def test_interrupted_run_resumes_to_the_same_bytes(wiki, reference, tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setenv(units.FAIL_AFTER_ENV, "4")
    monkeypatch.setattr(units, "_units_done_here", 0)
    with pytest.raises(RuntimeError, match="simulated failure"):
        prep(wiki, out)
    parts = out / ".prep" / "parts"
    assert len(list(parts.glob("*.json"))) == 4 and list(parts.glob(".*.tmp-*"))
    assert not (out / "manifest.json").exists()
    monkeypatch.delenv(units.FAIL_AFTER_ENV)
    with pytest.raises(UserError, match="unfinished prep; pass --resume"):
        prep(wiki, out)
    # A part that lost its checksum file or was damaged is redone, not trusted.
    part, meta = units.part_paths(parts, "train", 1)
    meta.unlink()
    damaged = bytearray(units.part_paths(parts, "train", 2)[0].read_bytes())
    damaged[-1] ^= 0xFF
    units.part_paths(parts, "train", 2)[0].write_bytes(bytes(damaged))
    assert files(prep(wiki, out, "--resume")) == reference
    # Resuming a finished prep with the same settings is a no-op, with other ones an error.
    assert files(prep(wiki, out, "--resume")) == reference
    with pytest.raises(UserError, match="finished token shards made with other settings"):
        prep(wiki, out, "--resume", "--seed", "1")


@pytest.mark.slow
def test_sigkilled_run_with_two_workers_resumes_to_the_same_bytes(wiki, reference, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "data_prep.prep", "--wikitext-dir", str(wiki), "--out", str(out), *SMALL]
    env = {**os.environ, units.FAIL_AFTER_ENV: "3", units.FAIL_MODE_ENV: "kill"}
    killed = subprocess.run(command, env=env, cwd=REPO, capture_output=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL
    assert (out / ".prep" / "parts" / "train-000002.json").exists()
    done = subprocess.run(
        command + ["--resume", "--workers", "2"], cwd=REPO, timeout=300, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "3 finished unit(s) skipped" in done.stdout
    assert files(out) == reference


def test_resume_with_other_settings_is_refused(wiki, tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setenv(units.FAIL_AFTER_ENV, "1")
    monkeypatch.setattr(units, "_units_done_here", 0)
    with pytest.raises(RuntimeError):
        prep(wiki, out)
    monkeypatch.delenv(units.FAIL_AFTER_ENV)
    with pytest.raises(UserError, match=r"cannot resume .*other settings \(vocab_size: 400 -> 500"):
        prep(wiki, out, "--resume", "--vocab-size", "500")


def test_non_empty_out_dir_is_refused_and_left_alone(wiki, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="is not empty; choose an empty directory"):
        prep(wiki, out)
    with pytest.raises(UserError, match="no unfinished prep to resume"):
        prep(wiki, out, "--resume")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    prep(wiki, out, "--overwrite")  # writes beside the user's file, never removes it
    assert (out / "notes.txt").read_text() == "mine"
    assert ShardSet.open(out).num_documents("test") == 6


def test_text_with_accents_cjk_emoji_and_controls_round_trips_through_shards(tmp_path):
    texts = [
        "Café naïve façade — Ørsted, Ångström",
        "東京タワーと富士山 日本語の文章",
        "emoji 😀🚀👩‍👩‍👧 flags 🇫🇷",
        "controls\ttab\x07bell\x00nul\x1b[0m\r\nend",
        "  leading and trailing spaces  ",
        "mixed: добрый день, مرحبا, שלום",
    ]
    lines = "".join(f'{{"text": {__import__("json").dumps(t)}}}\n' for t in texts * 3)
    (tmp_path / "docs.jsonl").write_text(lines)
    out = tmp_path / "out"
    assert (
        main(
            [
                "--input",
                str(tmp_path / "docs.jsonl"),
                "--out",
                str(out),
                "--vocab-size",
                "500",
                "--val-fraction",
                "0.2",
                "--docs-per-unit",
                "2",
            ]
        )
        == 0
    )
    shards = ShardSet.open(out)
    tok = Tokenizer(shards.tokenizer_path)
    got = []
    for split in ("train", "val"):
        for tokens, offsets in zip(shards.tokens(split), shards.document_offsets(split)):
            got += [tok.decode(tokens[a : b - 1]) for a, b in zip(offsets[:-1], offsets[1:])]
    assert sorted(got) == sorted(texts * 3)
    assert tok.sp.unk_id() not in np.concatenate(shards.tokens("train")).tolist()


def test_unigram_model_reused_tokenizer_and_manifest_record(wiki, tmp_path):
    out = prep(wiki, tmp_path / "uni", "--model-type", "unigram", "--character-coverage", "1")
    manifest = ShardSet.open(out).manifest
    assert manifest["prep"]["settings"]["model_type"] == "unigram"
    assert manifest["prep"]["settings"]["corpus"]["source"] == "wikitext-dir"
    again = prep(wiki, tmp_path / "reuse", "--tokenizer", str(out / "tokenizer.model"))
    assert (again / "tokenizer.model").read_bytes() == (out / "tokenizer.model").read_bytes()
    assert (again / "train-00000.bin").read_bytes() == (out / "train-00000.bin").read_bytes()


def test_sampled_tokenizer_training_is_deterministic(tmp_path):
    docs = embedded_corpus()[:20]
    a = train_sentencepiece(docs, tmp_path / "a", 400, max_sentences=150, seed=5)
    b = train_sentencepiece(docs, tmp_path / "b", 400, max_sentences=150, seed=5)
    full = train_sentencepiece(docs, tmp_path / "full", 400)
    assert a.read_bytes() == b.read_bytes() != full.read_bytes()


def test_failed_overwrite_leaves_the_earlier_prep_whole(wiki, reference, tmp_path):
    out = prep(wiki, tmp_path / "out")
    with pytest.raises(UserError, match="Vocabulary size too high"):
        prep(wiki, out, "--overwrite", "--vocab-size", "60000")
    assert files(out) == reference
    ShardSet.open(out)
