"""Perplexity of a checkpoint on a text, by sliding-window evaluation.

    lm eval --checkpoint RUN --text FILE [--context N] [--stride N] [--json]
    lm eval --checkpoint RUN --dataset wikitext-103-raw [--wikitext-dir DIR] --split test --json
    torchrun --nproc_per_node 4 -m lm.evaluate --checkpoint RUN --dataset ...   # data-parallel

What is scored. The evaluated text is a list of documents: a --text file is one document; a
WikiText split is its articles (one per ` = Title = ` heading, as `data_prep.wikitext` recovers
them: the article's lines joined by "\\n", stripped). Each document is tokenised on its own and
preceded by the end-of-document id, as the shards join documents in training:
[eod] d1 [eod] d2 ... dN. Every token after the leading eod is scored exactly once (the eods
between articles too: predicting an article's end is part of the text).

Sliding windows. The first window scores its first `context` tokens; each later window advances
by `stride` and scores only its last `stride` tokens, so each of those sees at least
context - stride tokens of history. Windows of equal length are batched; under torchrun or the
deepspeed launcher (WORLD_SIZE > 1) window i goes to rank i % world_size and the NLL sums are
all-reduced, so the result is that of one process (up to float summation order); rank 0 prints.

Normalisation. Counts are of the original text T = "\\n".join(documents) (for a file: the file's
text): words = len(T.split()), the whitespace-separated words, as the WikiText literature counts
them (so models with different tokenizers compare; note the literature's WikiText-103 count also
includes one <eos> per line, ours does not); bytes = len(T.encode("utf-8")), the "\\n" between
articles being what each separating eod token stands for. token_ppl = exp(NLL / tokens),
word_ppl = exp(NLL / words), bits_per_byte = NLL / (bytes * ln 2), NLL in nats.
"""

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from core.errors import UserError, run_command
from core.ranks import launcher_world_size, started_by
from data_prep import wikitext
from lm.distributed import close_distributed, init_distributed
from lm.inference import load_for_inference

SPLITS = ("train", "val", "test")


@dataclass
class EvalText:
    """The documents to score and where they came from."""

    documents: list[str]
    source: str

    @property
    def text(self) -> str:
        return "\n".join(self.documents)


# ---- sliding windows ---------------------------------------------------------------------------


def window_plan(n: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, keep) per window over n targets: inputs are sequence[start:end], and the
    window scores its last `keep` targets (sequence[end - keep + 1 : end + 1])."""
    if context < 1:
        raise UserError(f"context must be positive, got {context}")
    if not 0 < stride <= context:
        raise UserError(f"stride must be in 1..context ({context}), got {stride}")
    plan, end = [], 0
    while end < n:
        begin, end = end, min(n, end + (context if end == 0 else stride))
        plan.append((max(0, end - context), end, end - begin))
    return plan


@torch.no_grad()
def sliding_window_nll(
    model,
    ids: list[int],
    bos_id: int,
    context: int,
    stride: int,
    batch_size: int = 8,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[float, int]:
    """(total NLL in nats, number of scored tokens) of `ids` given a leading `bos_id`.

    With world_size > 1, only this rank's windows (i % world_size == rank): sum over ranks.
    """
    if batch_size < 1:
        raise UserError(f"batch size must be positive, got {batch_size}")
    sequence = torch.tensor([bos_id] + list(ids))
    mine = window_plan(len(ids), context, stride)[rank::world_size]
    device = next(model.parameters()).device
    by_length: dict[int, list[tuple[int, int, int]]] = {}
    for window in mine:  # only the first window (or a short text) differs in length
        by_length.setdefault(window[1] - window[0], []).append(window)
    total, scored = torch.zeros((), dtype=torch.float64), 0
    for length, windows in by_length.items():
        for i in range(0, len(windows), batch_size):
            chunk = windows[i : i + batch_size]
            inputs = torch.stack([sequence[s:e] for s, e, _ in chunk]).to(device)
            targets = torch.stack([sequence[s + 1 : e + 1] for s, e, _ in chunk]).to(device)
            _, nll = model(inputs, targets, reduction="none")
            keep = torch.tensor([k for _, _, k in chunk], device=device)
            scored_mask = torch.arange(length, device=device)[None, :] >= (length - keep)[:, None]
            total += (nll.double() * scored_mask).sum().cpu()
            scored += int(keep.sum())
    return total.item(), scored


def document_ids(tokenizer, documents: list[str]) -> list[int]:
    """d1 [eod] d2 [eod] ... dN: the documents' ids as the shards join them (no leading eod)."""
    ids: list[int] = []
    for i, doc in enumerate(documents):
        if i:
            ids.append(tokenizer.eod_id)
        ids.extend(tokenizer.encode(doc))
    return ids


def perplexity_report(nll: float, tokens: int, text: str) -> dict:
    """Token, word and byte normalisations of a total NLL (nats) over `text`."""
    words, nbytes = len(text.split()), len(text.encode("utf-8"))
    return {
        "token_ppl": math.exp(nll / tokens),
        "word_ppl": math.exp(nll / max(1, words)),
        "bits_per_byte": nll / (max(1, nbytes) * math.log(2)),
        "nll": nll,
        "tokens": tokens,
        "words": words,
        "bytes": nbytes,
    }


def evaluate_documents(
    model,
    tokenizer,
    documents: list[str],
    context: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    world=None,
) -> dict:
    """Sliding-window perplexity report of documents (see the module docstring); `world` from
    lm.distributed.init_distributed splits the windows across its ranks."""
    context = context if context is not None else model.config.block_size
    if context > model.config.block_size:
        raise UserError(f"--context {context} exceeds the model's context of {model.config.block_size}")
    stride = stride if stride is not None else max(1, context // 2)
    ids = document_ids(tokenizer, documents)
    if not ids:
        raise UserError("the text to evaluate is empty")
    rank, size = (world.rank, world.world_size) if world is not None else (0, 1)
    nll, tokens = sliding_window_nll(model, ids, tokenizer.eod_id, context, stride, batch_size, rank, size)
    if size > 1:
        import torch.distributed as dist

        totals = torch.tensor([nll, float(tokens)], dtype=torch.float64, device=world.device)
        dist.all_reduce(totals)
        nll, tokens = totals[0].item(), round(totals[1].item())
    return {**perplexity_report(nll, tokens, "\n".join(documents)), "context": context, "stride": stride}


def evaluate_text(
    model, tokenizer, text: str, context: int | None = None, stride: int | None = None, batch_size: int = 8, world=None
) -> dict:
    """A text as one document: tokenised whole, preceded by the eod id."""
    return evaluate_documents(model, tokenizer, [text], context, stride, batch_size, world)


# ---- where the text comes from -----------------------------------------------------------------


def read_text(path: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"text file not found: {p}")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{p}: not valid UTF-8 at byte {exc.start}") from None


def wikitext_documents(name: str | None, split: str, root: str | None = None) -> list[str]:
    """The articles of a WikiText split: from a local copy `root`, else from the hub by name."""
    if name is not None and name not in wikitext.CONFIGS:
        raise UserError(f"unknown dataset {name!r}; choose one of {', '.join(wikitext.CONFIGS)}")
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    corpus = wikitext.dir_corpus(root, name) if root else wikitext.hub_corpus(name)
    if split not in corpus.splits:
        raise UserError(f"no WikiText {split} split in {root}")
    documents = list(corpus.documents(split))
    if not documents:
        raise UserError(f"the WikiText {split} split is empty")
    return documents


def add_text_arguments(p: argparse.ArgumentParser) -> None:
    """--text FILE | --dataset NAME [--wikitext-dir DIR] [--split S], shared with lm analyze."""
    p.add_argument("--text", help="UTF-8 text file to score (one document)")
    p.add_argument("--dataset", choices=list(wikitext.CONFIGS), help="WikiText by name: its split's articles")
    p.add_argument("--wikitext-dir", help="local WikiText copy (wiki.*.raw / *.tokens or hub dumps); offline")
    p.add_argument("--split", choices=SPLITS, default=None, help="WikiText split (default test)")


def text_from_args(args: argparse.Namespace) -> EvalText:
    wikitext = args.dataset is not None or args.wikitext_dir is not None
    if args.text is not None and wikitext:
        raise UserError("give either --text or --dataset/--wikitext-dir, not both")
    if args.text is not None:
        if args.split is not None:
            raise UserError("--split applies to --dataset/--wikitext-dir, not to --text")
        return EvalText([read_text(args.text)], str(args.text))
    if not wikitext:
        raise UserError("nothing to evaluate: give --text FILE or --dataset NAME")
    split = args.split or "test"
    docs = wikitext_documents(args.dataset, split, args.wikitext_dir)
    return EvalText(docs, f"{args.dataset or args.wikitext_dir}:{split}")


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one-line UserErrors, like every other bad input."""

    def error(self, message: str):
        raise UserError(f"{message} (see {self.prog} --help)")


def parse_args(argv=None) -> argparse.Namespace:
    p = Parser(
        prog="lm eval",
        description="Perplexity of a checkpoint on a text (sliding window).",
        epilog="Run under torchrun / the deepspeed launcher to split the windows across processes.",
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        help="run directory (newest complete checkpoint), checkpoint or converted directory",
    )
    add_text_arguments(p)
    p.add_argument("--context", type=int, default=None, help="window length in tokens (default: the model's context)")
    p.add_argument("--stride", type=int, default=None, help="new tokens scored per window (default: context / 2)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # from the deepspeed launcher
    return p.parse_args(argv)


def distributed_world():
    """The process group when started by a launcher with several ranks, else None.

    SLURM's variables alone do not count: a batch script's own shell carries SLURM_NTASKS too, and
    an `lm eval` run there directly would wait for ranks that never come.
    """
    if launcher_world_size() == 1 or started_by().launcher == "SLURM":
        return None
    return init_distributed()


def main(argv=None) -> int:

    args = parse_args(argv)
    text = text_from_args(args)  # before any process group: bad input fails alike on every rank
    world = distributed_world()
    device = world.device if world else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer, tag_dir = load_for_inference(args.checkpoint, device)
    report = evaluate_documents(model, tokenizer, text.documents, args.context, args.stride, args.batch_size, world)
    report = {
        "checkpoint": str(tag_dir),
        "source": text.source,
        "documents": len(text.documents),
        "ranks": world.world_size if world else 1,
        **report,
    }
    if world is None or world.is_main:
        if args.json:
            print(json.dumps(report), flush=True)
        else:
            print(
                f"token ppl {report['token_ppl']:.3f} | word ppl {report['word_ppl']:.3f} | "
                f"bits/byte {report['bits_per_byte']:.4f} | {report['tokens']} tokens, {report['words']} words, "
                f"{report['bytes']} bytes",
                flush=True,
            )
    close_distributed()
    return 0


if __name__ == "__main__":
    raise SystemExit(run_command(main))
