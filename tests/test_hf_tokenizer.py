"""Hugging Face tokenizers (tokenizer.json) wherever a sentencepiece tokenizer.model goes: loading,
the end-of-document token, `lm prep --tokenizer`, and the run and converted directories of eval,
generate and analyze. The tokenizer is conftest's hf_tokenizer_file (byte-level BPE, eod id 383).
"""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import HF_EOD, REPO, TINY_MODEL, assert_one_error_line, converted_dir, mpirun_command, tree_digest
from core.errors import UserError
from data_prep import units
from data_prep.corpus import embedded_corpus
from data_prep.hf_tokenizer import HFTokenizer
from data_prep.prep import main
from data_prep.shards import ShardSet
from data_prep.tokenizer import Tokenizer, copy_tokenizer, load_tokenizer, train_sentencepiece
from lm import checkpoint as ckpt

EOD_ID = TINY_MODEL["vocab_size"] - 1
# Paragraphs of the embedded corpus as documents, and one that spells the eod token as text.
DOCS = [p for d in embedded_corpus()[:6] for p in d.split("\n\n") if p.strip()][:60]
DOCS.append(f"A document that mentions {HF_EOD} in its text. Café — 東京 😀")


def write_jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def prep_argv(corpus: Path, out: Path, tokenizer: Path | str, *extra: str) -> list[str]:
    return ["--input", str(corpus), "--out", str(out), "--tokenizer", str(tokenizer), "--docs-per-unit", "4", *extra]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("hf-corpus") / "docs.jsonl", DOCS)


@pytest.fixture(scope="module")
def hf_shards(corpus, hf_tokenizer_file, tmp_path_factory) -> Path:
    """`lm prep --tokenizer tokenizer.json` with one worker. Read-only."""
    out = tmp_path_factory.mktemp("hf-shards") / "out"
    assert main(prep_argv(corpus, out, hf_tokenizer_file)) == 0
    return out


def files(out: Path) -> dict[str, bytes]:
    """Every file of a shard dir, hidden ones included."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def documents_of(shards: ShardSet, split: str) -> list[np.ndarray]:
    """Each document's tokens, its eod included."""
    return [
        tokens[a:b]
        for tokens, offsets in zip(shards.tokens(split), shards.document_offsets(split))
        for a, b in zip(offsets[:-1], offsets[1:])
    ]


def test_tokenizer_json_loads_with_the_tokenizer_interface(hf_tokenizer_file):
    tok = load_tokenizer(hf_tokenizer_file)
    assert isinstance(tok, HFTokenizer) and tok.kind == "hf-tokenizers"
    assert (tok.vocab_size, tok.eod_id, tok.pad_id, tok.eod_token) == (TINY_MODEL["vocab_size"], EOD_ID, EOD_ID, HF_EOD)
    assert load_tokenizer(hf_tokenizer_file.parent).path == hf_tokenizer_file  # a directory works too
    text = DOCS[-1] + "\n\n  tabs\tand spaces  "
    ids = tok.encode(text)
    # Plain text: nothing added, the eod spelled in a document stays text, decoding is exact.
    assert EOD_ID not in ids and all(0 <= i < EOD_ID for i in ids)
    assert tok.decode(ids) == text and tok.decode(np.array(ids + [EOD_ID], dtype=np.uint16)) == text
    assert tok.encode_batch(DOCS[:3]) == [tok.encode(d) for d in DOCS[:3]]


def test_end_of_document_token_from_config_else_known_added_token_else_asked(hf_tokenizer_file, tmp_path):
    bare = tmp_path / "bare.json"  # no tokenizer_config.json beside it
    shutil.copyfile(hf_tokenizer_file, bare)
    assert load_tokenizer(bare).eod_id == EOD_ID  # <|endoftext|> is an added token
    # The config's eos_token wins, also in its AddedToken form; the asked-for token wins over both.
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "Ġthe", "special": False}}))
    the = load_tokenizer(bare).hf.token_to_id("Ġthe")
    assert the is not None and load_tokenizer(bare).eod_id == the
    assert load_tokenizer(bare, eod_token=HF_EOD).eod_id == EOD_ID


def test_a_saved_truncation_or_padding_does_not_cut_documents(hf_tokenizer_file, tmp_path):
    from tokenizers import Tokenizer as RawTokenizer

    raw = RawTokenizer.from_file(str(hf_tokenizer_file))
    raw.enable_truncation(8)
    raw.enable_padding(length=16)
    raw.save(str(tmp_path / "tokenizer.json"))
    text = "\n\n".join(DOCS[:8])
    assert len(RawTokenizer.from_file(str(tmp_path / "tokenizer.json")).encode(text).ids) == 16  # cut to 8, padded
    whole = load_tokenizer(hf_tokenizer_file).encode(text)
    assert load_tokenizer(tmp_path / "tokenizer.json").encode(text) == whole and len(whole) > 16
    assert load_tokenizer(tmp_path / "tokenizer.json").encode("a") == load_tokenizer(hf_tokenizer_file).encode("a")


def test_sentencepiece_loading_is_unchanged(tmp_path):
    model = train_sentencepiece(embedded_corpus()[:4], tmp_path / "sp", 400)
    tok = load_tokenizer(model)
    assert type(tok) is Tokenizer and (tok.eod_id, tok.pad_id, tok.vocab_size) == (2, 3, 400)
    assert tok.encode_batch(DOCS[:3]) == [tok.sp.encode(d, out_type=int) for d in DOCS[:3]]


def test_lm_prep_with_a_tokenizer_json_writes_shards_that_decode_to_the_documents(hf_shards, hf_tokenizer_file):
    shards = ShardSet.open(hf_shards)
    assert shards.tokenizer_path == hf_shards / "tokenizer.json" and shards.tokenizer_kind == "hf-tokenizers"
    assert not (hf_shards / "tokenizer.model").exists()
    assert (hf_shards / "tokenizer.json").read_bytes() == hf_tokenizer_file.read_bytes()
    assert json.loads((hf_shards / "tokenizer_config.json").read_text())["eos_token"] == HF_EOD
    tokenizer = shards.manifest["tokenizer"]
    assert (tokenizer["path"], tokenizer["kind"]) == ("tokenizer.json", "hf-tokenizers")
    assert (shards.vocab_size, shards.eod_id, shards.manifest["dtype"]) == (TINY_MODEL["vocab_size"], EOD_ID, "uint16")
    tok = load_tokenizer(shards.tokenizer_path)
    decoded = []
    for split in ("train", "val"):
        for doc in documents_of(shards, split):
            assert doc[-1] == EOD_ID and EOD_ID not in doc[:-1]  # eod between documents, nowhere else
            decoded.append(tok.decode(doc[:-1]))
    assert sorted(decoded) == sorted(DOCS)


def test_manifests_without_a_tokenizer_kind_read_as_sentencepiece(hf_shards, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(hf_shards, old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["tokenizer"]["kind"]  # as written before Hugging Face tokenizers
    (old / "manifest.json").write_text(json.dumps(manifest))
    assert ShardSet.open(old).tokenizer_kind == "sentencepiece"
    manifest["tokenizer"]["kind"] = "wordpiece"
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="tokenizer kind 'wordpiece' is not one of"):
        ShardSet.open(old)


def test_hf_shards_are_identical_from_one_and_two_workers(hf_shards, corpus, hf_tokenizer_file, tmp_path):
    out = tmp_path / "two"
    assert main(prep_argv(corpus, out, hf_tokenizer_file, "--workers", "2")) == 0
    assert files(out) == files(hf_shards)


def test_interrupted_hf_prep_resumes_to_the_same_bytes(hf_shards, corpus, hf_tokenizer_file, tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setenv(units.FAIL_AFTER_ENV, "3")
    monkeypatch.setattr(units, "_units_done_here", 0)
    with pytest.raises(RuntimeError, match="simulated failure"):
        main(prep_argv(corpus, out, hf_tokenizer_file))
    monkeypatch.delenv(units.FAIL_AFTER_ENV)
    assert main(prep_argv(corpus, out, hf_tokenizer_file, "--resume")) == 0
    assert files(out) == files(hf_shards)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("mpirun") is None, reason="no mpirun (Open MPI) installed")
def test_hf_shards_are_identical_under_mpirun_with_two_ranks_of_two_workers(
    hf_shards, corpus, hf_tokenizer_file, tmp_path
):
    pytest.importorskip("mpi4py")
    out = tmp_path / "mpi"
    argv = prep_argv(corpus, out, hf_tokenizer_file, "--workers", "2")
    run = subprocess.run(
        mpirun_command(2, sys.executable, "-m", "data_prep.prep", *argv),
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert files(out) == files(hf_shards)


def test_eod_token_option_is_recorded_in_the_copied_config(corpus, hf_tokenizer_file, tmp_path):
    bare = tmp_path / "given" / "tok.json"  # no config: the option alone names the eod
    bare.parent.mkdir()
    shutil.copyfile(hf_tokenizer_file, bare)
    out = tmp_path / "out"
    assert main(prep_argv(corpus, out, bare, "--eod-token", "Ġthe")) == 0
    shards = ShardSet.open(out)
    the = load_tokenizer(bare).hf.token_to_id("Ġthe")
    assert shards.eod_id == the and load_tokenizer(shards.tokenizer_path).eod_id == the
    assert json.loads((out / "tokenizer_config.json").read_text()) == {"eos_token": "Ġthe"}
    assert shards.manifest["prep"]["settings"]["eod_token"] == "Ġthe"


def test_overwriting_sentencepiece_shards_with_hf_ones_leaves_one_tokenizer(corpus, hf_tokenizer_file, tmp_path):
    out = tmp_path / "out"
    assert main(["--input", str(corpus), "--out", str(out), "--vocab-size", "400"]) == 0
    assert (out / "tokenizer.model").is_file()
    assert main(prep_argv(corpus, out, hf_tokenizer_file, "--overwrite")) == 0
    assert not (out / "tokenizer.model").exists()  # directory lookups would prefer it
    assert ShardSet.open(out).eod_id == EOD_ID


def broken_json(tmp_path: Path, hf: Path) -> str:
    (tmp_path / "broken.json").write_text('{"version": "1.0", "model": ')
    return str(tmp_path / "broken.json")


def garbage_file(tmp_path: Path, hf: Path) -> str:
    (tmp_path / "tok.bin").write_bytes(b"\x00\x01 not a tokenizer")
    return str(tmp_path / "tok.bin")


def without_eod(tmp_path: Path, hf: Path) -> str:
    """The same BPE with no added tokens and no config beside it."""
    data = json.loads(hf.read_text())
    data["added_tokens"] = []
    (tmp_path / "noeod.json").write_text(json.dumps(data))
    return str(tmp_path / "noeod.json")


def empty_dir(tmp_path: Path, hf: Path) -> str:
    (tmp_path / "empty").mkdir()
    return str(tmp_path / "empty")


# case: (make(tmp_path, hf_tokenizer_file) -> --tokenizer, extra arguments, fragments of the error line)
BAD_TOKENIZERS = {
    "invalid tokenizer.json": (broken_json, (), ["broken.json is not a valid Hugging Face tokenizer file"]),
    "neither kind": (garbage_file, (), ["tok.bin is neither a sentencepiece model nor a Hugging Face tokenizer.json"]),
    "no end-of-document token": (without_eod, (), ["noeod.json names no end-of-document token", "--eod-token TOKEN"]),
    "eod token not in the vocabulary": (
        lambda t, hf: str(hf),
        ("--eod-token", "<nope>"),
        ["end-of-document token '<nope>' (--eod-token) is not in its vocabulary"],
    ),
    "directory without a tokenizer": (empty_dir, (), ["holds no tokenizer.model or tokenizer.json"]),
}


@pytest.mark.parametrize("case", BAD_TOKENIZERS)
def test_bad_tokenizer_is_one_error_line_and_overwrites_nothing(
    case, corpus, hf_shards, hf_tokenizer_file, tmp_path, lm_in_process
):
    make, extra, fragments = BAD_TOKENIZERS[case]
    tokenizer = make(tmp_path, hf_tokenizer_file)
    new_out = tmp_path / "new"
    assert_one_error_line(lm_in_process("prep", *prep_argv(corpus, new_out, tokenizer, *extra)), *fragments)
    assert not new_out.exists()
    earlier = tmp_path / "earlier"  # a finished prep, which --overwrite with the bad tokenizer must keep
    shutil.copytree(hf_shards, earlier)
    before = tree_digest(earlier)
    argv = prep_argv(corpus, earlier, tokenizer, *extra, "--overwrite")
    assert_one_error_line(lm_in_process("prep", *argv), *fragments)
    assert tree_digest(earlier) == before and not (earlier / ".prep").exists()


def test_eod_token_without_a_given_tokenizer_is_refused(corpus, tmp_path):
    with pytest.raises(UserError, match="--eod-token needs --tokenizer"):
        main(["--input", str(corpus), "--out", str(tmp_path / "out"), "--eod-token", HF_EOD])
    assert not (tmp_path / "out").exists()


def test_model_smaller_than_the_hf_vocabulary_is_refused(hf_shards, tmp_path):
    from conftest import tiny_run_config
    from lm.config import RunConfig
    from lm.mixture import open_run_data, open_shards

    config = RunConfig.from_dict(tiny_run_config(hf_shards, tmp_path / "run"))
    assert open_shards(str(hf_shards), config, verify=True).vocab_size == 384
    small = RunConfig.from_dict(tiny_run_config(hf_shards, tmp_path / "run", model={"vocab_size": 256}))
    with pytest.raises(UserError, match="vocabulary mismatch.*use 384 ids but model.vocab_size is 256"):
        open_run_data(small)  # as lm.train opens its data


def test_run_and_converted_directories_find_tokenizer_model_else_tokenizer_json(hf_shards, tmp_path):
    run = tmp_path / "run"
    tag = run / "checkpoints" / "step00000002"
    tag.mkdir(parents=True)
    assert ckpt.tokenizer_path_for(tag) == run / "tokenizer.model"  # neither: the missing default
    # What lm train does at start (lm.resume.prepare_run_dir): the shards' tokenizer and its config.
    assert copy_tokenizer(ShardSet.open(hf_shards).tokenizer_path, run) == run / "tokenizer.json"
    assert (run / "tokenizer_config.json").read_bytes() == (hf_shards / "tokenizer_config.json").read_bytes()
    assert ckpt.tokenizer_path_for(tag) == run / "tokenizer.json"
    assert load_tokenizer(ckpt.tokenizer_path_for(tag)).eod_id == EOD_ID
    (run / "tokenizer.model").write_bytes(b"")
    assert ckpt.tokenizer_path_for(tag) == run / "tokenizer.model"  # sentencepiece first


def test_eval_and_generate_load_an_hf_tokenizer_from_a_converted_directory(hf_shards, tmp_path):
    from lm.evaluate import evaluate_text
    from lm.generate import continuation_text, generate
    from lm.inference import load_for_inference

    source = converted_dir(tmp_path / "converted", hf_shards)
    assert (source / "tokenizer.json").is_file() and not (source / "tokenizer.model").exists()
    model, tok, _ = load_for_inference(source)
    assert isinstance(tok, HFTokenizer) and tok.eod_id == EOD_ID
    text = "\n\n".join(DOCS[:3])
    report = evaluate_text(model, tok, text)
    # Words and bytes count the text itself, whatever the tokenizer: word ppl and bits/byte compare.
    assert (report["tokens"], report["words"], report["bytes"]) == (
        len(tok.encode(text)),
        len(text.split()),
        len(text.encode("utf-8")),
    )
    assert math.isclose(report["bits_per_byte"], report["nll"] / (report["bytes"] * math.log(2)))
    prompt = tok.encode("The import statement")
    new = generate(model, prompt, 5, temperature=0.0)
    assert len(new) == 5 and all(0 <= i < TINY_MODEL["vocab_size"] for i in new)
    assert tok.decode(prompt + new) == "The import statement" + continuation_text(tok, prompt, new)
