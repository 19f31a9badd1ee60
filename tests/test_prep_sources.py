"""Corpus sources: text/jsonl/parquet/arrow files, WikiText copies in every form, HF datasets.

Every test writes its own small files; parquet and arrow are written with `datasets`
itself and read through the same `load_dataset` path a hub name uses.
"""

import json

import pytest

from core.errors import UserError
from data_prep import sources, wikitext
from data_prep.corpus import split_train_val

# A WikiText-style sample: two articles, sections inside the first, a blank-line preamble.
WIKI_LINES = [
    " ",
    " = Alpha = ",
    " ",
    " Alpha text , with @-@ marks .",
    " = = History = = ",
    " More alpha .",
    " ",
    " = Beta = ",
    " Beta text .",
]
ARTICLES = [
    "= Alpha = \n \n Alpha text , with @-@ marks .\n = = History = = \n More alpha .",
    "= Beta = \n Beta text .",
]


def docs(corpus, split):
    return list(corpus.documents(split))


def write_wiki(root, suffix="tokens", splits=("train", "valid", "test")):
    root.mkdir(parents=True, exist_ok=True)
    for s in splits:
        (root / f"wiki.{s}.{suffix}").write_text("\n".join(WIKI_LINES) + "\n")
    return root


def hub_rows():
    """The rows the hub dataset has for WIKI_LINES: lines with their newline; blanks are ""."""
    return [line + "\n" if line.strip() else "" for line in WIKI_LINES]


def test_original_wikitext_files_split_into_articles_with_sections_inside(tmp_path):
    corpus = wikitext.dir_corpus(write_wiki(tmp_path / "wt"))
    assert list(corpus.splits) == ["train", "val", "test"]
    assert docs(corpus, "train") == ARTICLES
    assert docs(corpus, "val") == ARTICLES and docs(corpus, "test") == ARTICLES


def test_raw_and_tokens_copies_need_a_choice(tmp_path):
    root = write_wiki(tmp_path / "wt", "tokens")
    write_wiki(root, "raw")
    (root / "wiki.train.raw").write_text(" = Raw = \n raw text\n")
    with pytest.raises(UserError, match="both wiki.train.raw and wiki.train.tokens.*--dataset"):
        wikitext.dir_corpus(root)
    assert docs(wikitext.dir_corpus(root, "wikitext-103-raw"), "train") == ["= Raw = \n raw text"]
    assert docs(wikitext.dir_corpus(root, "wikitext-103"), "train") == ARTICLES


def test_wikitext_parquet_dump_in_the_hub_layout_reads_like_the_original(tmp_path):
    datasets = pytest.importorskip("datasets")
    root = tmp_path / "hub"
    for config in ("wikitext-103-raw-v1", "wikitext-103-v1"):
        for split in ("train", "validation", "test"):
            (root / config).mkdir(parents=True, exist_ok=True)
            datasets.Dataset.from_dict({"text": hub_rows()}).to_parquet(
                root / config / f"{split}-00000-of-00001.parquet"
            )
    with pytest.raises(UserError, match="several WikiText variants.*--dataset"):
        wikitext.dir_corpus(root)
    corpus = wikitext.dir_corpus(root, "wikitext-103-raw")
    # Blank lines come back as "" instead of " ": the stripped articles are the same.
    assert [d.replace("\n \n", "\n\n") for d in ARTICLES] == docs(corpus, "train")
    assert docs(corpus, "val") == docs(corpus, "test") == docs(corpus, "train")


def test_wikitext_arrow_dump_from_save_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    dd = datasets.DatasetDict(
        {s: datasets.Dataset.from_dict({"text": hub_rows()}) for s in ("train", "validation", "test")}
    )
    dd.save_to_disk(str(tmp_path / "saved"))
    corpus = wikitext.dir_corpus(tmp_path / "saved", "wikitext-103-raw")
    assert len(docs(corpus, "train")) == 2 and docs(corpus, "train")[1] == ARTICLES[1]
    assert docs(corpus, "val") == docs(corpus, "train")


def test_wikitext_jsonl_dump(tmp_path):
    root = tmp_path / "jl"
    root.mkdir()
    for split in ("train", "validation"):
        (root / f"{split}.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in hub_rows()))
    corpus = wikitext.dir_corpus(root)
    assert list(corpus.splits) == ["train", "val"]
    assert docs(corpus, "train")[1] == ARTICLES[1]


def test_wikitext_errors_name_the_problem(tmp_path):
    with pytest.raises(UserError, match="WikiText directory .*nowhere does not exist"):
        wikitext.dir_corpus(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no WikiText files in .*empty"):
        wikitext.dir_corpus(tmp_path / "empty")
    write_wiki(tmp_path / "noval", splits=("train",))
    with pytest.raises(UserError, match="no WikiText valid/validation split"):
        wikitext.dir_corpus(tmp_path / "noval")
    with pytest.raises(UserError, match="unknown WikiText dataset 'wikitext-7'"):
        wikitext.hub_corpus("wikitext-7")
    assert wikitext.hub_corpus("wikitext-103-raw").description["config"] == "wikitext-103-raw-v1"


def test_text_files_and_globs_keep_the_order_given(tmp_path):
    for name, text in (("b.txt", "bee"), ("a.txt", "ay"), ("c.md", "see")):
        (tmp_path / name).write_text(text)
    stream = sources.text_files([str(tmp_path / "c.md"), str(tmp_path / "*.txt")])
    assert list(stream()) == ["see", "ay", "bee"]
    with pytest.raises(UserError, match=r"no files match '.*\*\.rst'"):
        sources.text_files([str(tmp_path / "*.rst")])
    with pytest.raises(UserError, match="input file .*gone.txt does not exist"):
        sources.text_files([tmp_path / "gone.txt"])


def test_jsonl_one_document_per_row_of_the_text_field(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"body": "first", "id": 1}\n\n{"body": "second\\nline", "id": 2}\n')
    assert list(sources.text_files([path], "body")()) == ["first", "second\nline"]
    with pytest.raises(UserError, match=r"d.jsonl line 1 has no field 'text' \(fields: body, id\)"):
        list(sources.text_files([path])())
    path.write_text('{"text": "ok"}\n{"text": 5}\n{oops\n')
    with pytest.raises(UserError, match="d.jsonl line 2: field 'text' is int, not text"):
        list(sources.text_files([path])())
    path.write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(UserError, match="d.jsonl line 2 is not valid JSON"):
        list(sources.text_files([path])())


def test_parquet_and_arrow_files_one_document_per_row(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"body": ["row one", "  ", "row two"], "n": [1, 2, 3]})
    ds.to_parquet(tmp_path / "x.parquet")
    ds.save_to_disk(str(tmp_path / "saved"))
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    for path in (tmp_path / "x.parquet", arrow):
        assert list(sources.text_files([path], "body")()) == ["row one", "row two"]
        with pytest.raises(UserError, match=r"has no field 'text' \(fields: body, n\)"):
            list(sources.text_files([path])())


def test_any_hf_dataset_by_name_with_its_own_val_split(tmp_path):
    # A local dataset directory loads by "name" through exactly the hub's load_dataset call.
    datasets = pytest.importorskip("datasets")
    for split, rows in (("train", ["t1", "t2", "t3"]), ("validation", ["v1"])):
        datasets.Dataset.from_dict({"content": rows}).to_parquet(tmp_path / "ds" / f"{split}-00000-of-00001.parquet")
    name = str(tmp_path / "ds")
    corpus = sources.hf_corpus(name, "content", val_split="validation", streaming=True)
    assert docs(corpus, "train") == ["t1", "t2", "t3"] and docs(corpus, "val") == ["v1"]
    carved = sources.hf_corpus(name, "content", val_fraction=0.34, streaming=True)
    assert (docs(carved, "train"), docs(carved, "val")) == split_train_val(["t1", "t2", "t3"], 0.34)
    with pytest.raises(UserError, match="has no field 'text' .*content"):
        docs(sources.hf_corpus(name, "text", val_split="validation", streaming=True), "train")
    with pytest.raises(UserError, match="could not load dataset .*split 'nope'"):
        docs(sources.hf_corpus(name, "content", split="nope", streaming=True), "train")


def test_carved_val_matches_split_train_val_without_holding_the_corpus():
    items = [f"doc {i}" for i in range(50)]
    train, val = sources.carve_val(lambda: iter(items), 0.1, seed=3)
    assert (list(train()), list(val())) == split_train_val(items, 0.1, seed=3)
    empty_train, _ = sources.carve_val(lambda: iter([]), 0.1, seed=0)
    with pytest.raises(UserError, match="corpus is empty"):
        list(empty_train())
