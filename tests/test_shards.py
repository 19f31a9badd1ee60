"""The token-shard format: what ShardWriter writes, ShardSet reads back and refuses."""

import json

import numpy as np
import pytest

from core.errors import UserError
from data_prep.shards import ShardSet, ShardWriter, dtype_for_vocab, write_manifest

EOD = 2
DOCS = [[5, 6, 7], [8], [], [9, 10, 11, 12, 13], [14, 15]]


def make_shards(root, docs=DOCS, tokens_per_shard=6, vocab_size=100, val_docs=([20, 21],)):
    """A small shard dir: train shards of ~tokens_per_shard tokens, one val shard."""
    tok = root / "tokenizer.model"
    tok.write_bytes(b"not really a model, but it has a checksum")
    dtype = dtype_for_vocab(vocab_size)
    splits = {}
    for split, ds in (("train", docs), ("val", val_docs)):
        with ShardWriter(root, split, dtype, tokens_per_shard, EOD) as w:
            for d in ds:
                w.add_document(d)
        splits[split] = w.close()
    write_manifest(root, vocab_size=vocab_size, eod_id=EOD, pad_id=3, tokenizer_path=tok, splits=splits)
    return root


def test_dtype_is_uint16_up_to_65536_ids_and_uint32_beyond():
    assert dtype_for_vocab(65536) == np.dtype("<u2")
    assert dtype_for_vocab(65537) == np.dtype("<u4")


def test_round_trip_gives_back_every_document_followed_by_eod(tmp_path):
    shards = ShardSet.open(make_shards(tmp_path))
    got = []
    for tokens, offsets in zip(shards.tokens("train"), shards.document_offsets("train")):
        assert offsets[0] == 0 and offsets[-1] == len(tokens)
        for start, end in zip(offsets[:-1], offsets[1:]):
            doc = np.asarray(tokens[start:end])
            assert doc[-1] == EOD
            got.append(doc[:-1].tolist())
    assert got == DOCS
    assert shards.num_tokens("train") == sum(len(d) + 1 for d in DOCS)
    assert shards.splits() == ["train", "val"]
    assert shards.vocab_size == 100 and shards.eod_id == EOD and shards.pad_id == 3
    assert shards.tokenizer_path == (tmp_path / "tokenizer.model").resolve()


def test_documents_are_never_split_and_shards_close_once_full(tmp_path):
    shards = ShardSet.open(make_shards(tmp_path, tokens_per_shard=6))
    # [5 6 7 E][8 E] reaches 6 -> close; [E][9..13 E] reaches 7 -> close; [14 15 E] last.
    assert [len(t) for t in shards.tokens("train")] == [6, 7, 3]
    assert [e["documents"] for e in shards.manifest["splits"]["train"]] == [2, 2, 1]


def test_files_are_little_endian_and_named_by_split_and_number(tmp_path):
    make_shards(tmp_path, vocab_size=70000)
    assert sorted(p.name for p in tmp_path.glob("train-*")) == [
        "train-00000.bin",
        "train-00000.idx",
        "train-00001.bin",
        "train-00001.idx",
        "train-00002.bin",
        "train-00002.idx",
    ]
    assert np.fromfile(tmp_path / "train-00000.bin", dtype="<u4").tolist() == [5, 6, 7, 2, 8, 2]
    assert np.fromfile(tmp_path / "train-00000.idx", dtype="<u8").tolist() == [0, 4, 6]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["dtype"] == "uint32" and manifest["tokenizer"]["path"] == "tokenizer.model"
    assert not list(tmp_path.glob(".*tmp*")), "temp files must be renamed into place"


def test_token_memmaps_are_read_only(tmp_path):
    tokens = ShardSet.open(make_shards(tmp_path)).tokens("train")[0]
    assert isinstance(tokens, np.memmap)
    with pytest.raises(ValueError):
        tokens[0] = 1


def test_unknown_split_error_lists_the_available_ones(tmp_path):
    shards = ShardSet.open(make_shards(tmp_path))
    with pytest.raises(UserError, match="'test'.*available: train, val"):
        shards.tokens("test")


def test_truncated_token_file_is_refused_naming_the_file(tmp_path):
    make_shards(tmp_path)
    path = tmp_path / "train-00001.bin"
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(UserError, match="train-00001.bin.*truncated"):
        ShardSet.open(tmp_path, verify=False)


def test_flipped_byte_fails_the_checksum_naming_the_file(tmp_path):
    make_shards(tmp_path)
    path = tmp_path / "train-00002.bin"
    data = bytearray(path.read_bytes())
    data[0] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match="train-00002.bin.*sha256"):
        ShardSet.open(tmp_path)
    ShardSet.open(tmp_path, verify=False)  # without verify the size still matches


def test_missing_manifest_is_refused(tmp_path):
    make_shards(tmp_path)
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(UserError, match="no manifest.json"):
        ShardSet.open(tmp_path)


def test_missing_directory_is_refused(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        ShardSet.open(tmp_path / "nowhere")


def test_invalid_or_foreign_manifest_is_refused(tmp_path):
    make_shards(tmp_path)
    manifest = tmp_path / "manifest.json"
    good = json.loads(manifest.read_text())
    manifest.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        ShardSet.open(tmp_path)
    manifest.write_text(json.dumps({**good, "version": 99}))
    with pytest.raises(UserError, match="version 99"):
        ShardSet.open(tmp_path)
    manifest.write_text(json.dumps({**good, "format": "something-else"}))
    with pytest.raises(UserError, match="not a twicing-lm-shards manifest"):
        ShardSet.open(tmp_path)


def test_missing_shard_file_is_refused_naming_it(tmp_path):
    make_shards(tmp_path)
    (tmp_path / "val-00000.idx").unlink()
    with pytest.raises(UserError, match="val-00000.idx.*missing"):
        ShardSet.open(tmp_path)


def test_index_that_does_not_match_the_tokens_is_refused(tmp_path):
    make_shards(tmp_path)
    np.array([0, 3, 6], dtype="<u8").tofile(tmp_path / "train-00000.idx")
    with pytest.raises(UserError, match="train-00000.idx.*inconsistent"):
        ShardSet.open(tmp_path, verify=False)


def test_changed_tokenizer_fails_its_checksum(tmp_path):
    make_shards(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"another model")
    with pytest.raises(UserError, match="tokenizer.*checksum"):
        ShardSet.open(tmp_path)


def test_token_ids_that_do_not_fit_the_dtype_are_refused(tmp_path):
    with ShardWriter(tmp_path, "train", np.uint16, 100, EOD) as w:
        with pytest.raises(UserError, match="out of range"):
            w.add_document([1, 70000])


def test_failed_writer_leaves_no_temp_files(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path, "train", np.uint16, 100, EOD) as w:
            w.add_document([1, 2])
            raise RuntimeError("tokenizer crashed")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("tokens_per_shard", [1, 4, 6, 11, 1000])
def test_bulk_add_encoded_writes_the_same_bytes_as_one_document_at_a_time(tmp_path, tokens_per_shard):
    docs = DOCS * 3
    one, bulk = tmp_path / "one", tmp_path / "bulk"
    with ShardWriter(one, "train", np.uint16, tokens_per_shard, EOD) as w:
        for d in docs:
            w.add_document(d)
    tokens = np.array([t for d in docs for t in d + [EOD]], dtype=np.uint16)
    lengths = np.array([len(d) + 1 for d in docs])
    with ShardWriter(bulk, "train", np.uint16, tokens_per_shard, EOD) as wb:
        # In two calls, split mid-shard, as parts of consecutive work units arrive.
        cut = int(lengths[:7].sum())
        wb.add_encoded(tokens[:cut], lengths[:7])
        wb.add_encoded(tokens[cut:], lengths[7:])
    assert wb.close() == w.close()
    assert sorted(p.name for p in one.iterdir()) == sorted(p.name for p in bulk.iterdir())
    for p in one.iterdir():
        assert p.read_bytes() == (bulk / p.name).read_bytes(), p.name
    with pytest.raises(ValueError, match="eod"):
        ShardWriter(tmp_path / "x", "train", np.uint16, 10, EOD).add_encoded(np.array([5, 6]), np.array([2]))
