"""WikiText (-103 and -2, raw and tokenised) as a corpus with its own train/val/test splits.

WikiText is a sequence of lines in which ` = Title = ` starts an article (` = = Section = = `
lines stay inside it). Whatever the copy, we recover those lines and split them into one
document per article (`corpus.iter_articles`). Copies we read:
- the hub dataset `Salesforce/wikitext` by name (downloaded through `datasets`);
- offline, a directory with the original `wiki.{train,valid,test}.{tokens,raw}` files;
- offline, a directory of parquet / arrow / jsonl dumps of the hub dataset (its parquet
  files, `save_to_disk` output, `to_json` output), one row per line, as the hub has them.
Parquet and arrow dumps are read by the same `sources.hf_rows` as the hub name.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from core.errors import UserError
from data_prep.corpus import iter_articles, iter_file_lines
from data_prep.sources import HF_BUILDERS, Corpus, DocStream, file_fingerprint, hf_rows, jsonl_rows

HUB_NAME = "Salesforce/wikitext"
# Our short names -> the hub's config names; "-raw" keeps the original text, the others
# have rare words replaced by <unk> and numbers split (" @,@ ").
CONFIGS = {
    "wikitext-103-raw": "wikitext-103-raw-v1",
    "wikitext-103": "wikitext-103-v1",
    "wikitext-2-raw": "wikitext-2-raw-v1",
    "wikitext-2": "wikitext-2-v1",
}
# Our split name -> (the hub's split name, the original files' split name).
SPLITS = {"train": ("train", "train"), "val": ("validation", "valid"), "test": ("test", "test")}
_DUMP_SUFFIXES = (*HF_BUILDERS, ".jsonl")
_SPLIT_WORDS = {"train": "train", "validation": "val", "valid": "val", "val": "val", "test": "test"}


def rows_to_lines(rows: Iterable[str]) -> Iterator[str]:
    """Hub rows are lines that keep their "\\n" (blank lines are ""); give bare lines."""
    for row in rows:
        yield from row.removesuffix("\n").split("\n")


def _config(name: str) -> str:
    key = name.removeprefix(HUB_NAME + "/").removesuffix("-v1")
    if key not in CONFIGS:
        raise UserError(f"unknown WikiText dataset {name!r}; choose one of {', '.join(CONFIGS)}")
    return CONFIGS[key]


def _articles(lines: DocStream) -> DocStream:
    return lambda: iter_articles(lines())


def hub_corpus(name: str, streaming: bool = False) -> Corpus:
    """WikiText from the hub by name, e.g. "wikitext-103-raw" (needs network once)."""
    config = _config(name)

    def lines(hub_split: str) -> DocStream:
        return lambda: rows_to_lines(hf_rows(HUB_NAME, "text", config=config, split=hub_split, streaming=streaming))

    splits = {ours: _articles(lines(hub)) for ours, (hub, _) in SPLITS.items()}
    prepare = (lambda: None) if streaming else (lambda: next(splits["train"](), None))
    return Corpus(splits, {"source": "wikitext-hub", "name": HUB_NAME, "config": config}, prepare)


def _original_files(root: Path, variant: str | None) -> dict[str, Path] | None:
    """wiki.{train,valid,test}.{raw,tokens} under root, if there; None when absent."""
    found = {p.suffix[1:] for p in root.rglob("wiki.train.*") if p.suffix in (".raw", ".tokens")}
    if not found:
        return None
    if variant is None:
        if len(found) > 1:
            raise UserError(
                f"{root} has both wiki.train.raw and wiki.train.tokens; pick one "
                "with --dataset wikitext-103-raw or --dataset wikitext-103"
            )
        variant = found.pop()
    files = {}
    for ours, (_, original) in SPLITS.items():
        matches = sorted(root.rglob(f"wiki.{original}.{variant}"))
        if len(matches) > 1:
            raise UserError(
                f"{root} has several wiki.{original}.{variant} files "
                f"({matches[0]}, {matches[1]}); point --wikitext-dir at one copy"
            )
        if matches:
            files[ours] = matches[0]
    return files


def _dump_split(rel: Path) -> str | None:
    """Which split a dump file holds, from its path: train-0000.parquet, validation/x.arrow."""
    for word in re.split(r"[/\\._-]+", rel.as_posix().lower()):
        if word in _SPLIT_WORDS:
            return _SPLIT_WORDS[word]
    return None


def _dump_files(root: Path, config: str | None) -> dict[str, list[Path]]:
    files = [p for p in sorted(root.rglob("*")) if p.is_file() and p.suffix in _DUMP_SUFFIXES]
    # The hub's parquet layout keeps one folder per config: keep the one asked for.
    configs = {part for p in files for part in p.relative_to(root).parts if part in CONFIGS.values()}
    if configs:
        if config is None and len(configs) > 1:
            raise UserError(
                f"{root} holds several WikiText variants ({', '.join(sorted(configs))}); pick one with --dataset"
            )
        chosen = config if config is not None else configs.pop()
        files = [p for p in files if chosen in p.relative_to(root).parts]
    by_split: dict[str, list[Path]] = {}
    for p in files:
        split = _dump_split(p.relative_to(root))
        if split is not None:
            by_split.setdefault(split, []).append(p)
    return by_split


def _dump_lines(files: list[Path]) -> Iterator[str]:
    """Lines of a split stored as rows of dump files, in file order."""
    for suffix, builder in HF_BUILDERS.items():
        same = [str(p) for p in files if p.suffix == suffix]
        if same:
            what = f"{same[0]}" + (f" (+{len(same) - 1} files)" if len(same) > 1 else "")
            yield from rows_to_lines(hf_rows(builder, "text", data_files=same, what=what))
    for p in files:
        if p.suffix == ".jsonl":
            yield from rows_to_lines(jsonl_rows(p, "text"))


def dir_corpus(root: str | Path, name: str | None = None) -> Corpus:
    """WikiText from a local copy in `root` (offline); `name` picks the variant if needed."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"WikiText directory {root} does not exist")
    config = _config(name) if name else None
    variant = None if config is None else ("raw" if "raw" in config else "tokens")
    originals = _original_files(root, variant)
    if originals:
        streams = {s: (lambda p=p: iter_file_lines(p)) for s, p in originals.items()}
        used = list(originals.values())
    else:
        dumps = _dump_files(root, config)
        streams = {s: (lambda fs=fs: _dump_lines(fs)) for s, fs in dumps.items()}
        used = [p for fs in dumps.values() for p in fs]
    if not used:
        raise UserError(
            f"no WikiText files in {root}: expected wiki.train.tokens / "
            "wiki.train.raw, or parquet, arrow or jsonl dumps of the splits"
        )
    for split, word in (("train", "train"), ("val", "valid/validation")):
        if split not in streams:
            raise UserError(f"no WikiText {word} split in {root}")
    splits = {s: _articles(streams[s]) for s in SPLITS if s in streams}
    return Corpus(splits, {"source": "wikitext-dir", "config": config, "files": file_fingerprint(used)})
