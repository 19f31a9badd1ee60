"""Sentencepiece training and the tokenizer used everywhere else.

Ids 0-3 are fixed: unk=0, bos=1, eos=2, pad=3. The eos id is the end-of-document (eod) token
that the shards put after every document. By default training is lossless: no Unicode
normalisation, whitespace kept as is, and unknown characters spelled as UTF-8 bytes
(byte fallback), so decode(encode(text)) == text for any text.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import sentencepiece as spm

from core.errors import UserError

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

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"
