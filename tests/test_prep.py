"""Data preparation: corpus reading, tokenizer training, and `lm prep` writing shards."""

import numpy as np
import pytest

from core.errors import UserError
from data_prep.corpus import embedded_corpus, read_text_files, split_train_val
from data_prep.prep import main, prepare_shards
from data_prep.shards import ShardSet
from data_prep.tokenizer import Tokenizer, train_sentencepiece

VOCAB = 400  # byte fallback alone needs 256 pieces; small keeps training fast


@pytest.fixture(scope="module")
def docs():
    return embedded_corpus()[:12]


@pytest.fixture(scope="module")
def tokenizer(docs, tmp_path_factory):
    return Tokenizer(train_sentencepiece(docs, tmp_path_factory.mktemp("tok") / "sp", VOCAB))


def test_embedded_corpus_is_real_english_in_a_fixed_order():
    corpus = embedded_corpus()
    assert len(corpus) > 50 and all(d == d.strip() and d for d in corpus)
    assert corpus == embedded_corpus()
    assert sum(" the " in d for d in corpus) > 40


def test_tokenizer_round_trip_is_exact_for_any_text(tokenizer):
    # Exact because training uses normalization_rule_name="identity" and
    # remove_extra_whitespaces=False (sentencepiece would otherwise apply NFKC and collapse
    # spaces), and byte fallback spells unseen characters (CJK, emoji, controls) as bytes.
    text = "  Café naïve — 東京タワー 😀 tab\there\x07bell\x00nul\r\nline\n\n  end  "
    ids = tokenizer.encode(text)
    assert all(isinstance(i, int) and 0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(np.array(ids, dtype=np.uint16)) == text


def test_tokenizer_reserves_the_special_ids(tokenizer):
    assert tokenizer.vocab_size == VOCAB
    assert (tokenizer.eod_id, tokenizer.pad_id) == (2, 3)
    assert len(tokenizer.sha256) == 64


def test_tokenizer_training_is_deterministic(docs, tmp_path):
    a = train_sentencepiece(docs[:4], tmp_path / "a", VOCAB, model_type="unigram")
    b = train_sentencepiece(docs[:4], tmp_path / "b", VOCAB, model_type="unigram")
    assert a.read_bytes() == b.read_bytes()


def test_too_large_vocab_is_a_user_error_with_sentencepiece_reason(docs, tmp_path):
    with pytest.raises(UserError, match=r"^sentencepiece training failed.*too high") as err:
        train_sentencepiece(docs[:1], tmp_path / "sp", 50_000)
    assert "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_missing_or_invalid_tokenizer_model_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        Tokenizer(tmp_path / "nope.model")
    (tmp_path / "bad.model").write_bytes(b"garbage")
    with pytest.raises(UserError, match="bad.model.*not a valid sentencepiece model"):
        Tokenizer(tmp_path / "bad.model")


def test_plain_text_file_is_one_document(tmp_path):
    (tmp_path / "a.txt").write_text("first line\n\nsecond paragraph\n")
    assert read_text_files([tmp_path / "a.txt"]) == ["first line\n\nsecond paragraph"]


def test_wikitext_article_headings_split_a_file_into_articles(tmp_path):
    (tmp_path / "wiki.txt").write_text(
        " \n = Alpha = \n\n Alpha text .\n = = History = = \n more alpha\n = Beta = \n beta text\n"
    )
    assert read_text_files([tmp_path / "wiki.txt"]) == [
        "= Alpha = \n\n Alpha text .\n = = History = = \n more alpha",
        "= Beta = \n beta text",
    ]


def test_non_utf8_file_is_a_user_error_naming_file_and_offset(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("naïve".encode("latin-1"))
    with pytest.raises(UserError, match=r"latin1.txt is not valid UTF-8.*byte offset 2"):
        read_text_files([tmp_path / "latin1.txt"])


def test_missing_file_and_empty_corpus_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="missing.txt does not exist"):
        read_text_files([tmp_path / "missing.txt"])
    (tmp_path / "blank.txt").write_text(" \n\n")
    with pytest.raises(UserError, match="no text"):
        read_text_files([tmp_path / "blank.txt"])


def test_train_val_split_is_deterministic_disjoint_and_never_empty():
    docs = [f"doc {i}" for i in range(20)]
    train, val = split_train_val(docs, 0.2, seed=0)
    assert (train, val) == split_train_val(docs, 0.2, seed=0)
    assert len(val) == 4 and sorted(train + val) == sorted(docs)
    assert split_train_val(docs, 0.2, seed=1) != (train, val)
    assert [len(side) for side in split_train_val(docs[:2], 0.01, seed=0)] == [1, 1]
    with pytest.raises(UserError, match="val fraction"):
        split_train_val(docs, 1.5, seed=0)


def test_shard_bytes_do_not_depend_on_the_number_of_workers(docs, tmp_path):
    # Paragraphs as documents: enough of them that the pool hands out many chunks.
    paragraphs = [p for d in docs for p in d.split("\n\n") if p.strip()]
    assert len(paragraphs) > 100
    outs = [
        prepare_shards(
            paragraphs[:-20], paragraphs[-20:], tmp_path / f"w{n}", vocab_size=VOCAB, workers=n, tokens_per_shard=5000
        )
        for n in (1, 3)
    ]
    names = sorted(p.name for p in outs[0].iterdir())
    assert names == sorted(p.name for p in outs[1].iterdir())
    assert "train-00001.bin" in names, "the corpus should span several shards"
    for name in names:
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name


def test_prepared_shards_decode_back_to_the_documents(docs, tmp_path):
    out = prepare_shards(docs[:3], docs[3:4], tmp_path / "out", vocab_size=VOCAB)
    shards = ShardSet.open(out)
    tok = Tokenizer(shards.tokenizer_path)
    for split, expected in (("train", docs[:3]), ("val", docs[3:4])):
        tokens = np.concatenate(shards.tokens(split))
        offsets = shards.document_offsets(split)[0]
        decoded = [tok.decode(tokens[s : e - 1]) for s, e in zip(offsets[:-1], offsets[1:])]
        assert decoded == expected


def test_prep_refuses_to_overwrite_existing_shards_unless_asked(docs, tmp_path):
    out = prepare_shards(docs[:4], docs[4:5], tmp_path / "out", vocab_size=VOCAB, tokens_per_shard=1000)
    assert (out / "train-00001.bin").exists()
    before = (out / "manifest.json").read_bytes()
    with pytest.raises(UserError, match="already holds token shards.*overwrite"):
        prepare_shards(docs[:1], docs[2:3], out, vocab_size=VOCAB)
    assert (out / "manifest.json").read_bytes() == before
    # With overwrite, shards of the old run that the new one does not write are removed.
    prepare_shards(docs[:1], docs[2:3], out, vocab_size=VOCAB, overwrite=True)
    assert ShardSet.open(out).num_documents("train") == 1
    assert sorted(p.name for p in out.glob("train-*")) == ["train-00000.bin", "train-00000.idx"]


def test_lm_prep_command_writes_shards_and_prints_a_summary(docs, tmp_path, capsys):
    (tmp_path / "corpus.txt").write_text("\n = Article = \n".join(docs[:6]))
    out = tmp_path / "shards"
    code = main(
        [
            "--input",
            str(tmp_path / "corpus.txt"),
            "--out",
            str(out),
            "--vocab-size",
            str(VOCAB),
            "--workers",
            "2",
            "--val-fraction",
            "0.2",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "train: 5 documents" in printed and "val: 1 documents" in printed
    assert str(out) in printed
    assert ShardSet.open(out).num_tokens("val") > 0
