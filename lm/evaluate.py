"""Perplexity of a checkpoint on a text, by sliding-window evaluation.

    lm eval --checkpoint RUN_DIR --text FILE [--context N] [--stride N] [--json]

The text is tokenised whole and preceded by the end-of-document id, so every token of the text is
scored, exactly once. The first window scores its first `context` tokens; each later window
advances by `stride` and scores only its last `stride` tokens, so each of those sees at least
context - stride tokens of history. Reported: token-level perplexity, word-level perplexity (total
NLL over the whitespace-separated words of the text, comparable across tokenizers, as in the
WikiText literature) and bits per UTF-8 byte.
"""

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from lm.errors import UserError, run_command


@torch.no_grad()
def sliding_window_nll(model, ids: list[int], bos_id: int, context: int, stride: int) -> tuple[float, int]:
    """(total NLL in nats, number of scored tokens) of `ids` given a leading `bos_id`."""
    if not 0 < stride <= context:
        raise UserError(f"stride must be in 1..context ({context}), got {stride}")
    sequence = torch.tensor([bos_id] + ids)
    n = len(ids)  # targets: sequence[1:]
    device = next(model.parameters()).device
    total, scored, end = 0.0, 0, 0
    while end < n:
        begin_score, end = end, min(n, end + (context if end == 0 else stride))
        start = max(0, end - context)
        inputs = sequence[start:end].to(device)
        targets = sequence[start + 1 : end + 1].to(device)
        logits, _ = model(inputs[None])
        keep = end - begin_score  # the targets this window is responsible for
        scores = logits[0, -keep:]
        scores = scores.to(torch.promote_types(scores.dtype, torch.float32))  # bf16 -> fp32, fp64 stays
        nll = F.cross_entropy(scores, targets[-keep:], reduction="sum")
        total += nll.item()
        scored += keep
    return total, scored


def perplexity_report(nll: float, tokens: int, text: str) -> dict:
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


def evaluate_text(model, tokenizer, text: str, context: int | None = None, stride: int | None = None) -> dict:
    context = context or model.config.block_size
    if context > model.config.block_size:
        raise UserError(f"--context {context} exceeds the model's context of {model.config.block_size}")
    stride = stride or context // 2 or 1
    ids = tokenizer.encode(text)
    if not ids:
        raise UserError("the text to evaluate is empty")
    nll, tokens = sliding_window_nll(model, ids, tokenizer.eod_id, context, stride)
    return {**perplexity_report(nll, tokens, text), "context": context, "stride": stride}


def read_text(path: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"text file not found: {p}")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{p}: not valid UTF-8 at byte {exc.start}") from None


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="lm eval", description="Perplexity of a checkpoint on a text (sliding window).")
    p.add_argument("--checkpoint", required=True, help="run directory (newest complete checkpoint) or checkpoint directory")
    p.add_argument("--text", required=True, help="UTF-8 text file to score")
    p.add_argument("--context", type=int, default=None, help="window length in tokens (default: the model's context)")
    p.add_argument("--stride", type=int, default=None, help="new tokens scored per window (default: context / 2)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from lm.checkpoint import load_for_inference

    args = parse_args(argv)
    text = read_text(args.text)
    model, tokenizer, tag_dir = load_for_inference(args.checkpoint)
    report = {"checkpoint": str(tag_dir), **evaluate_text(model, tokenizer, text, args.context, args.stride)}
    if args.json:
        print(json.dumps(report))
    else:
        print(f"token ppl {report['token_ppl']:.3f} | word ppl {report['word_ppl']:.3f} | "
              f"bits/byte {report['bits_per_byte']:.4f} | {report['tokens']} tokens, {report['words']} words")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_command(main))
