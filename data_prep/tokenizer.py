"""Sentencepiece training, and the tokenizers used everywhere else.

Trained models fix ids 0-3: unk=0, bos=1, eos=2, pad=3. The eos id is the end-of-document (eod)
token that the shards put after every document. By default training is lossless: no Unicode
normalisation, whitespace kept as is, and unknown characters spelled as UTF-8 bytes
(byte fallback), so decode(encode(text)) == text for any text.

`load_tokenizer(path)` is the one way in for a tokenizer file: a sentencepiece model (`Tokenizer`)
or a Hugging Face tokenizer.json (`data_prep.hf_tokenizer.HFTokenizer`), both with encode,
encode_batch, decode, vocab_size, eod_id, pad_id, sha256 and path. Copies in shard, run and
converted directories go by fixed names, SP_NAME or HF_NAME (with its tokenizer_config.json).
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import re
import shutil
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import sentencepiece as spm

from core.errors import UserError
from data_prep.hf_tokenizer import CONFIG_NAME, HF_NAME, HFTokenizer, read_config

SP_NAME = "tokenizer.model"
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
# Longest training line in bytes; sentencepiece skips longer lines (its default is 4192,
# shorter than many WikiText paragraphs).
MAX_SENTENCE_BYTES = 1 << 16


def _one_line(err: Exception) -> str:
    """Sentencepiece's reason without its source location, e.g. 'Vocabulary size too high...'."""
    msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return re.sub(r"^[A-Z_]+: \S+\(\d+\) \[.*?\] ", "", msg)


def _training_lines(docs: Iterable[str]) -> Iterator[str]:
    for doc in docs:
        for line in doc.split("\n"):
            if line.strip():
                yield line


def train_sentencepiece(
    docs: Iterable[str],
    model_prefix: str | os.PathLike,
    vocab_size: int,
    model_type: str = "bpe",
    character_coverage: float = 0.9995,
    byte_fallback: bool = True,
    max_sentences: int | None = None,
    seed: int = 0,
    normalization_rule_name: str = "identity",
    remove_extra_whitespaces: bool = False,
) -> Path:
    """Train a sentencepiece model on docs; write `{model_prefix}.model`, return its path.

    Each non-blank line of each document is one training sentence. With `max_sentences`,
    sentencepiece keeps a uniform random sample of that many sentences (reservoir
    sampling over the stream), so big corpora train in bounded memory. Training is
    deterministic: one thread and a fixed seed for the sampling. Sentences are streamed in
    and the model streamed out, rather than going through files, because sentencepiece
    records its input and output paths in the model: with temp paths the same corpus would
    give different model bytes (and checksums).
    """
    if model_type not in ("bpe", "unigram"):
        raise UserError(f"model type must be 'bpe' or 'unigram', got {model_type!r}")
    if vocab_size < 1:
        raise UserError(f"vocab size must be positive, got {vocab_size}")
    if seed < 0:
        raise UserError(f"seed must be non-negative, got {seed}")
    if not 0 < character_coverage <= 1:
        raise UserError(f"character coverage must be in (0, 1], got {character_coverage}")
    if max_sentences is not None and max_sentences <= 100:
        raise UserError(f"max sentences must be above 100 (sentencepiece's minimum sample), got {max_sentences}")
    lines = _training_lines(docs)
    first = next(lines, None)
    if first is None:
        raise UserError("cannot train a tokenizer on an empty corpus")
    model = io.BytesIO()
    options = dict(
        sentence_iterator=itertools.chain([first], lines),
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=character_coverage,
        byte_fallback=byte_fallback,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        pad_id=PAD_ID,
        normalization_rule_name=normalization_rule_name,
        remove_extra_whitespaces=remove_extra_whitespaces,
        num_threads=1,
        shuffle_input_sentence=False,
        max_sentence_length=MAX_SENTENCE_BYTES,
        minloglevel=2,
    )
    if max_sentences is not None:
        options.update(input_sentence_size=max_sentences, shuffle_input_sentence=True)
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.Train(**options)
    except (RuntimeError, OSError) as e:
        raise UserError(f"sentencepiece training failed (vocab size {vocab_size}): {_one_line(e)}") from None
    path = Path(f"{model_prefix}.model")
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write under a temporary name next to the target, then rename: no half-written model.
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(model.getvalue())
    os.replace(tmp, path)
    return path


class Tokenizer:
    """A trained sentencepiece model: text <-> token ids."""

    kind = "sentencepiece"

    def __init__(self, model_path: str | os.PathLike):
        self.path = Path(model_path)
        if not self.path.is_file():
            raise UserError(f"tokenizer model {self.path} does not exist")
        data = self.path.read_bytes()
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(data)
        except (RuntimeError, OSError) as e:
            raise UserError(f"{self.path} is not a valid sentencepiece model: {_one_line(e)}") from None
        self.sha256 = hashlib.sha256(data).hexdigest()
        self.vocab_size: int = self.sp.get_piece_size()
        self.eod_id: int = self.sp.eos_id()
        if self.eod_id < 0:
            raise UserError(f"tokenizer model {self.path} has no end-of-sentence (eos) token")
        # Models made elsewhere may lack a pad piece; eod then doubles as padding.
        self.pad_id: int = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eod_id

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text, out_type=int)

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        # One call, one thread: the prep pool provides the parallelism.
        return self.sp.encode(list(texts), out_type=int, num_threads=1)

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


def tokenizer_file(path: str | os.PathLike) -> Path:
    """A file as it is; for a directory, its tokenizer.model, else its tokenizer.json."""
    path = Path(path)
    if not path.is_dir():
        return path
    for name in (SP_NAME, HF_NAME):
        if (path / name).is_file():
            return path / name
    raise UserError(f"tokenizer directory {path} holds no {SP_NAME} or {HF_NAME}")


def tokenizer_kind(path: Path) -> str:
    """HFTokenizer.kind for a .json file (or another that reads as a JSON object), else Tokenizer.kind."""
    if path.suffix in (".json", ".model"):
        return HFTokenizer.kind if path.suffix == ".json" else Tokenizer.kind
    try:
        with open(path, "rb") as f:
            head = f.read(64).lstrip()
    except OSError:
        head = b""
    return HFTokenizer.kind if head.startswith(b"{") else Tokenizer.kind


def canonical_name(path: Path) -> str:
    """The name a copy of this tokenizer file goes by: tokenizer.model or tokenizer.json."""
    return HF_NAME if tokenizer_kind(path) == HFTokenizer.kind else SP_NAME


def load_tokenizer(path: str | os.PathLike, eod_token: str | None = None) -> Tokenizer | HFTokenizer:
    """The tokenizer of a sentencepiece model, a tokenizer.json, or a directory holding either.

    `eod_token` names the end-of-document token of a tokenizer.json (see data_prep.hf_tokenizer);
    a sentencepiece model's is always its eos piece.
    """
    path = tokenizer_file(path)
    if not path.is_file():
        raise UserError(f"tokenizer {path} does not exist")
    if tokenizer_kind(path) == HFTokenizer.kind:
        return HFTokenizer(path, eod_token)
    if eod_token is not None:
        raise UserError(
            f"--eod-token is for a Hugging Face tokenizer.json; the sentencepiece model {path} ends documents "
            "with its eos piece"
        )
    try:
        return Tokenizer(path)
    except UserError as e:
        if path.suffix == ".model":
            raise
        raise UserError(f"{path} is neither a sentencepiece model nor a Hugging Face tokenizer.json ({e})") from None


def _copy_atomic(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def copy_tokenizer(path: str | os.PathLike, dest_dir: str | os.PathLike, eod_token: str | None = None) -> Path:
    """Copy a tokenizer file into dest_dir under its canonical name; returns the copy's path.

    A tokenizer.json takes its tokenizer_config.json along (it may name the eod token); with
    `eod_token`, the copy's config names that one, so the copy alone says where documents end.
    dest_dir (a shard, run or work directory of ours) is left with this tokenizer only: the other
    kind's file (a tokenizer.model would win directory lookups) and a stale config are removed.
    """
    path, dest_dir = Path(path), Path(dest_dir)
    dest = dest_dir / canonical_name(path)
    config, dest_config = path.with_name(CONFIG_NAME), dest_dir / CONFIG_NAME
    stale = [dest_dir / SP_NAME] if dest.name == HF_NAME else [dest_dir / HF_NAME, dest_config]
    if dest.name == HF_NAME:
        if eod_token is not None:
            tmp = dest_config.with_name(f".{CONFIG_NAME}.tmp-{os.getpid()}")
            merged = {**read_config(path), "eos_token": eod_token}
            tmp.write_text(json.dumps(merged, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            os.replace(tmp, dest_config)
        elif not config.is_file():
            dest_config.unlink(missing_ok=True)
        elif config.resolve() != dest_config.resolve():
            _copy_atomic(config, dest_config)
    if path.resolve() != dest.resolve():
        _copy_atomic(path, dest)
    for other in stale:
        if other.resolve() != path.resolve():
            other.unlink(missing_ok=True)
    return dest
