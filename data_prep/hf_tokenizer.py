"""A Hugging Face `tokenizers` file (tokenizer.json) behind the interface of our sentencepiece Tokenizer.

The end-of-document (eod) id, which the shards put after every document, is the tokenizer's eos
token: the one asked for (`lm prep --eod-token`), else `eos_token` of the tokenizer_config.json
beside the file, else the first of KNOWN_EOD among its added tokens. A tokenizer naming none is
refused: shards without a separator would run documents into each other unnoticed.

Text is always encoded whole and as plain text: no saved truncation or padding applies, no special
tokens are added (a post-processor's BOS, say), and special tokens spelled inside a document are not
matched, so no document can forge an eod. Decoding skips special tokens, as sentencepiece skips
its control pieces.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import tokenizers

from core.errors import UserError
from core.json_files import read_json_object

HF_NAME = "tokenizer.json"
CONFIG_NAME = "tokenizer_config.json"
KNOWN_EOD = ("<|endoftext|>", "</s>", "<eos>")


def _one_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken object."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def read_config(tokenizer_file: Path) -> dict:
    """The tokenizer_config.json beside a tokenizer.json, or {} when there is none."""
    path = tokenizer_file.with_name(CONFIG_NAME)
    if not path.is_file():
        return {}
    return read_json_object(path)


def parse_tokenizer(data: bytes, path: Path) -> tokenizers.Tokenizer:
    """The tokenizer in `data` (the bytes of `path`); a file that is none is a UserError naming it."""
    try:
        return tokenizers.Tokenizer.from_buffer(data)
    except Exception as e:  # the Rust side raises plain Exception, for bad JSON as for a bad model
        raise UserError(f"{path} is not a valid Hugging Face tokenizer file: {_one_line(e)}") from None


def ids_needed(tokenizer: tokenizers.Tokenizer) -> int:
    """Rows a model's vocabulary needs for this tokenizer: ids may leave gaps, so the largest one + 1."""
    ids = tokenizer.get_vocab(with_added_tokens=True).values()
    return max(tokenizer.get_vocab_size(with_added_tokens=True), max(ids, default=-1) + 1)


class HFTokenizer:
    """A tokenizer.json: text <-> token ids, with an end-of-document id like Tokenizer's."""

    kind = "hf-tokenizers"

    def __init__(self, path: str | os.PathLike, eod_token: str | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"tokenizer {self.path} does not exist")
        data = self.path.read_bytes()
        self.hf = parse_tokenizer(data, self.path)
        self.hf.encode_special_tokens = True  # see the module docstring: documents are plain text
        # A saved file may carry a model's truncation (say to 512 ids) or padding: a document is
        # encoded whole and as it is.
        self.hf.no_truncation()
        self.hf.no_padding()
        self.sha256 = hashlib.sha256(data).hexdigest()
        self.config = read_config(self.path)
        self.vocab_size: int = ids_needed(self.hf)
        self.eod_token, self.eod_id = self._end_of_document(eod_token)
        pad = token_text(self.config.get("pad_token"))
        pad_id = self.hf.token_to_id(pad) if pad else None
        self.pad_id: int = self.eod_id if pad_id is None else pad_id  # eod doubles as padding

    def _end_of_document(self, asked: str | None) -> tuple[str, int]:
        config_path = self.path.with_name(CONFIG_NAME)
        if asked is not None:
            token, origin = asked, "--eod-token"
        elif token_text(self.config.get("eos_token")):
            token, origin = token_text(self.config["eos_token"]), f"eos_token of {config_path}"
        else:
            added = {t.content for t in self.hf.get_added_tokens_decoder().values()}
            known = [t for t in KNOWN_EOD if t in added]
            if not known:
                raise UserError(
                    f"{self.path} names no end-of-document token (no eos_token in a {CONFIG_NAME} beside it, "
                    f"none of {', '.join(KNOWN_EOD)} among its added tokens); name one with "
                    "lm prep --eod-token TOKEN"
                )
            token, origin = known[0], "a known added token"
        token_id = self.hf.token_to_id(token)
        if token_id is None:
            raise UserError(f"{self.path}: end-of-document token {token!r} ({origin}) is not in its vocabulary")
        return token, token_id

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        # One document at a time in this thread, like sentencepiece's num_threads=1 here: the prep
        # pool provides the parallelism, and a batch would start tokenizers' own threads in each worker.
        return [self.encode(text) for text in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.path)!r}, vocab_size={self.vocab_size}, eod={self.eod_token!r})"
