"""The prep pipeline: corpus -> tokenizer -> work units (parallel) -> token shards.

    rank 0        check --out, record the settings, train (or reuse) the tokenizer
    every rank    stream each split, cut it into units, tokenise its units (u % size == rank)
                  with a local process pool, one part file per unit
    rank 0        concatenate the parts in unit order into shards; manifest last

Shard boundaries are decided only during that ordered concatenation, so the bytes depend
on the corpus and settings, never on --workers or the number of ranks. Finished units are
kept across a crash: a rerun with --resume skips every unit whose part passes its checksum.
With several ranks the output directory must be on a filesystem they all see.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

from tqdm import tqdm

from core.errors import UserError
from data_prep import shards, units
from data_prep.ranks import Ranks
from data_prep.sources import Corpus
from data_prep.tokenizer import (
    SP_NAME,
    canonical_name,
    copy_tokenizer,
    load_tokenizer,
    tokenizer_file,
    train_sentencepiece,
)

TOKENIZER_NAME = SP_NAME  # a trained tokenizer's; a given one keeps its kind's name (tokenizer.json)
WORK_DIR = ".prep"  # parts and settings of an unfinished prep; removed once it is done
STATE = "state.json"


@dataclass
class PrepOptions:
    """Everything that decides the output bytes, plus how to get there (workers, resume)."""

    vocab_size: int = 8000
    model_type: str = "bpe"
    character_coverage: float = 0.9995
    max_sentences: int | None = None  # tokenizer training sample cap (shuffled, seeded)
    seed: int = 0
    tokenizer: str | None = None  # an existing tokenizer (.model, tokenizer.json or a directory) to use
    eod_token: str | None = None  # the end-of-document token of a given tokenizer.json
    tokens_per_shard: int = 50_000_000
    docs_per_unit: int = 1024
    unit_chars: int = 1 << 22
    workers: int = 1
    resume: bool = False
    overwrite: bool = False


def _settings(corpus: Corpus, opts: PrepOptions) -> dict:
    """What the parts depend on: a resume continues only a run with the same settings."""
    keep = (
        "vocab_size",
        "model_type",
        "character_coverage",
        "max_sentences",
        "seed",
        "tokenizer",
        "docs_per_unit",
        "unit_chars",
    )
    settings = {"corpus": corpus.description, **{k: v for k, v in asdict(opts).items() if k in keep}}
    if opts.eod_token is not None:  # only when set: preps recorded before the option still match
        settings["eod_token"] = opts.eod_token
    return settings


def _first_difference(old: dict, new: dict) -> str:
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            return f"{key}: {json.dumps(old.get(key))[:60]} -> {json.dumps(new.get(key))[:60]}"
    return "none"


def _claim_out_dir(out: Path, opts: PrepOptions, settings: dict) -> str:
    """Decide "fresh", "resume" or "done" for --out; refuse anything that would lose data."""
    if out.exists() and not out.is_dir():
        raise UserError(f"output path {out} exists and is not a directory")
    if not out.is_dir() or not any(out.iterdir()) or opts.overwrite:
        return "fresh"
    state, manifest = out / WORK_DIR / STATE, out / shards.MANIFEST
    if opts.resume:
        if state.is_file():
            try:
                old = json.loads(state.read_text())["settings"]
            except (ValueError, KeyError, TypeError):
                raise UserError(f"{state} is unreadable; pass --overwrite to start over") from None
            if old != settings:
                raise UserError(
                    f"cannot resume in {out}: it was started with other settings "
                    f"({_first_difference(old, settings)}); pass --overwrite "
                    "to start over"
                )
            return "resume"
        if manifest.is_file():
            try:
                done = json.loads(manifest.read_text()).get("prep", {}).get("settings")
            except (ValueError, AttributeError):
                done = None
            if done == settings:
                return "done"
            raise UserError(
                f"{out} already holds finished token shards made with other settings; pass --overwrite to replace them"
            )
        raise UserError(f"{out} is not empty and holds no unfinished prep to resume; choose an empty directory")
    if manifest.is_file():
        raise UserError(f"{out} already holds token shards; pass --overwrite (overwrite=True) to replace them")
    if state.is_file():
        raise UserError(f"{out} holds an unfinished prep; pass --resume to continue it or --overwrite to start over")
    raise UserError(f"{out} is not empty; choose an empty directory or pass --overwrite")


def _old_shard_files(out: Path) -> set[str]:
    """Files named by an existing manifest, so an overwrite can remove the ones it orphans."""
    try:
        old = shards.ShardSet.open(out, verify=False).manifest["splits"]
    except UserError:
        return set()
    return {e[key] for entries in old.values() for e in entries for key in ("file", "index")}


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def _setup(corpus: Corpus, out: Path, opts: PrepOptions, settings: dict) -> dict:
    """Rank 0: claim --out, record the settings, have a tokenizer. Returns the shared plan."""
    mode = _claim_out_dir(out, opts, settings)
    if mode == "done":
        return {"mode": mode}
    created = not out.exists()
    try:
        return _start(corpus, out, opts, settings, mode)
    except UserError:
        # Bad input met while training the tokenizer (say, non-UTF-8 bytes): a fresh run
        # leaves nothing behind, so the fixed command runs again as it is.
        if mode == "fresh":
            shutil.rmtree(out / WORK_DIR, ignore_errors=True)
            if created:
                shutil.rmtree(out, ignore_errors=True)
        raise


def _start(corpus: Corpus, out: Path, opts: PrepOptions, settings: dict, mode: str) -> dict:
    work = out / WORK_DIR
    if mode == "fresh":
        shutil.rmtree(work, ignore_errors=True)
    (work / "parts").mkdir(parents=True, exist_ok=True)
    for stale in (work / "parts").glob(".*.tmp-*"):  # half-written by a crashed run
        stale.unlink()
    state_path = work / STATE
    if mode == "resume":
        state = json.loads(state_path.read_text())
    else:  # an earlier prep stays whole until this one's shards are ready to replace it
        state = {
            "settings": settings,
            "tokenizer_sha256": None,
            "old_files": sorted(_old_shard_files(out)) if opts.overwrite else [],
        }
    # The new tokenizer waits in the work dir too; it replaces the old one at assembly.
    name = canonical_name(tokenizer_file(opts.tokenizer)) if opts.tokenizer else TOKENIZER_NAME
    model = work / name
    if not (model.is_file() and state.get("tokenizer_sha256") == shards.sha256_file(model)):
        state["tokenizer_sha256"] = None
        _write_json(state_path, state)
        if opts.tokenizer:
            given = load_tokenizer(opts.tokenizer, opts.eod_token)  # a bad file or no eod: refused here
            # With --eod-token the copy's tokenizer_config.json names it: every worker reads the same.
            copy_tokenizer(given.path, work, opts.eod_token)
        else:
            train_sentencepiece(
                corpus.documents("train"),
                work / model.stem,
                opts.vocab_size,
                model_type=opts.model_type,
                character_coverage=opts.character_coverage,
                max_sentences=opts.max_sentences,
                seed=opts.seed,
            )
    state["tokenizer_sha256"] = sha = shards.sha256_file(model)
    _write_json(state_path, state)
    corpus.prepare()  # e.g. download a hub dataset once, before the other ranks read it
    return {"mode": mode, "tokenizer_sha256": sha, "tokenizer_name": name, "old_files": state.get("old_files", [])}


def _pool(workers: int, model: Path, under_mpi: bool) -> ProcessPoolExecutor | None:
    if workers == 1:
        units.init_worker(str(model))
        return None
    # fork is quickest; after MPI is initialised a clean forkserver child is safer.
    ctx = get_context("forkserver" if under_mpi else "fork")
    return ProcessPoolExecutor(workers, mp_context=ctx, initializer=units.init_worker, initargs=(str(model),))


def _tokenize_split(
    corpus: Corpus,
    split: str,
    parts: Path,
    opts: PrepOptions,
    ranks: Ranks,
    pool: ProcessPoolExecutor | None,
    dtype: str,
    tok_sha: str,
) -> int:
    """Tokenise this rank's unfinished units of a split; returns the split's unit count."""
    pending: deque[Future] = deque()
    bar = tqdm(desc=f"tokenising {split}", unit="doc", unit_scale=True, disable=None if ranks.rank == 0 else True)
    skipped, n_units = 0, 0

    def settle(block_until: int) -> None:
        while len(pending) > block_until:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for f in done:
                pending.remove(f)
                bar.update(f.result()[2])  # re-raises a worker's exception here

    try:
        for u, docs in units.iter_units(corpus.documents(split), opts.docs_per_unit, opts.unit_chars):
            n_units = u + 1
            if u % ranks.size != ranks.rank:
                continue
            if opts.resume and units.unit_is_finished(parts, split, u, tok_sha):
                skipped += 1
                bar.update(len(docs))
                continue
            args = (str(parts), split, u, docs, dtype, tok_sha)
            if pool is None:
                bar.update(units.encode_unit(*args)[2])
                continue
            pending.append(pool.submit(units.encode_unit, *args))
            settle(2 * opts.workers)  # a bounded number of units in flight: streaming
        settle(0)
    finally:
        for f in pending:
            f.cancel()
        bar.close()
    if skipped and ranks.rank == 0:
        print(f"{split}: resumed, {skipped} finished unit(s) skipped on rank 0", flush=True)
    return n_units


def _assemble(out: Path, splits: dict[str, int], opts: PrepOptions, settings: dict, plan: dict) -> None:
    """Rank 0: concatenate every split's parts in unit order into shards; manifest last."""
    parts = out / WORK_DIR / "parts"
    # From here an earlier manifest no longer describes the directory.
    (out / shards.MANIFEST).unlink(missing_ok=True)
    name = plan["tokenizer_name"]
    copy_tokenizer(out / WORK_DIR / name, out)  # again after a crash here: the work dir goes last
    tok = load_tokenizer(out / name)
    dtype = shards.dtype_for_vocab(tok.vocab_size)
    entries: dict[str, list[dict]] = {}
    for split, n_units in splits.items():
        with shards.ShardWriter(out, split, dtype, opts.tokens_per_shard, tok.eod_id) as w:
            for u in tqdm(range(n_units), desc=f"writing {split} shards", unit="unit", disable=None):
                w.add_encoded(*units.read_part(parts, split, u, dtype))
        entries[split] = w.close()
    prep_record = {"settings": settings, "tokens_per_shard": opts.tokens_per_shard}
    shards.write_manifest(
        out,
        vocab_size=tok.vocab_size,
        eod_id=tok.eod_id,
        pad_id=tok.pad_id,
        tokenizer_path=tok.path,
        tokenizer_kind=tok.kind,
        splits=entries,
        extra={"prep": prep_record},
    )
    new_files = {e[key] for es in entries.values() for e in es for key in ("file", "index")}
    for stale in set(plan["old_files"]) - new_files:
        (out / stale).unlink(missing_ok=True)
    shutil.rmtree(out / WORK_DIR, ignore_errors=True)


def run(corpus: Corpus, out_dir: str | os.PathLike, opts: PrepOptions, ranks: Ranks | None = None) -> Path:
    """Prepare token shards of every split of `corpus` in out_dir; returns out_dir."""
    ranks = ranks or Ranks()
    out = Path(out_dir).resolve()
    if opts.workers < 1:
        raise UserError(f"workers must be at least 1, got {opts.workers}")
    if opts.docs_per_unit < 1 or opts.unit_chars < 1:
        raise UserError("docs per unit and unit chars must be positive")
    if "train" not in corpus.splits:
        raise UserError("the corpus has no train split")
    if opts.eod_token is not None and not opts.tokenizer:
        raise UserError(
            "--eod-token needs --tokenizer (a Hugging Face tokenizer.json); a trained tokenizer has its eos"
        )
    settings = _settings(corpus, opts)
    plan = ranks.on_rank0(lambda: _setup(corpus, out, opts, settings))
    if plan["mode"] == "done":
        if ranks.rank == 0:
            print(f"{out} already holds these shards; nothing to do", flush=True)
        return out

    def tokenize() -> dict[str, int]:
        tok = load_tokenizer(out / WORK_DIR / plan["tokenizer_name"])
        if tok.sha256 != plan["tokenizer_sha256"]:
            raise UserError(
                f"rank {ranks.rank} sees a different {tok.path}: "
                "with several nodes, --out must be on a shared filesystem"
            )
        dtype = shards.dtype_for_vocab(tok.vocab_size).str
        pool = _pool(opts.workers, tok.path, ranks.size > 1)
        try:
            resumed = PrepOptions(**{**asdict(opts), "resume": plan["mode"] == "resume"})
            return {
                split: _tokenize_split(corpus, split, out / WORK_DIR / "parts", resumed, ranks, pool, dtype, tok.sha256)
                for split in corpus.splits
            }
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)

    counts = ranks.on_all(tokenize)  # also the barrier: every rank's parts are written
    ranks.on_rank0(lambda: _assemble(out, counts, opts, settings, plan))
    return out
