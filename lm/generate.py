"""Text generation: greedy, temperature, top-k and top-p sampling, batched, with K/V (and U) caches.

    lm generate --checkpoint RUN_DIR --prompt "The module" [--prompt ...] --max-new-tokens 60

The checkpoint may be a run directory, a checkpoint of any ZeRO stage and TP size, or a directory
written by `lm convert`.
"""

import argparse
import json
import sys

import torch

from core.errors import UserError, run_command
from lm.inference import load_for_inference


@torch.no_grad()
def generate_batch(
    model,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    vocab_size: int | None = None,
    finished=None,
) -> list[list[int]]:
    """Extend every prompt by `max_new_tokens` ids (temperature 0: greedy); returns the new ids.

    With `vocab_size` (the tokenizer's), only ids below it are drawn: a model's vocabulary may be
    padded (for TP, or for round sizes), and a padded id is no token.

    Prompts of equal token length are decoded together as one batch (no padding needed). With
    `use_cache`, the prompt is encoded once and each step feeds only the newest token (keeping K, V
    and, for twicing, U per layer); once the context is full, decoding slides a window of the last
    block_size tokens and recomputes it, since learned positions cannot shift inside a cache.

    `finished(i, new_ids) -> bool`, if given, ends a batch early once it holds for every prompt i of
    it (lm harness stops at its tasks' stop strings); the caller cuts each output where it likes.
    """
    block = model.config.block_size
    for ids in prompts:
        if not ids:
            raise UserError("a prompt is empty after tokenisation")
        if len(ids) > block:
            raise UserError(f"a prompt is {len(ids)} tokens, longer than the model's context of {block}")
    device = next(model.parameters()).device
    outputs: list[list[int]] = [[] for _ in prompts]
    by_length: dict[int, list[int]] = {}
    for i, ids in enumerate(prompts):
        by_length.setdefault(len(ids), []).append(i)
    for rows in by_length.values():
        ids = torch.tensor([prompts[i] for i in rows], device=device)
        cache = model.new_cache() if use_cache else None
        logits, _ = model(ids, cache=cache)
        for step in range(max_new_tokens):
            next_ids = sample(logits[:, -1, :vocab_size].float(), temperature, top_k, top_p, generator)
            ids = torch.cat([ids, next_ids[:, None]], dim=1)
            if step == max_new_tokens - 1:
                break
            if finished is not None and all(
                finished(i, ids[row, len(prompts[i]) :].tolist()) for row, i in enumerate(rows)
            ):
                break
            if cache is not None and ids.size(1) <= block:
                logits, _ = model(next_ids[:, None], cache=cache)
            else:
                logits, _ = model(ids[:, -block:])
        for row, i in enumerate(rows):
            outputs[i] = ids[row, len(prompts[i]) :].tolist()
    return outputs


def generate(
    model,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> list[int]:
    """`generate_batch` for one prompt."""
    return generate_batch(model, [prompt_ids], max_new_tokens, temperature, top_k, top_p, generator, use_cache)[0]


def sample(
    logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None, generator: torch.Generator | None
) -> torch.Tensor:
    """One id per row of (rows, vocab) logits."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits / temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def continuation_text(tokenizer, prompt_ids: list[int], new_ids: list[int]) -> str:
    """The text the new ids add to the prompt (decoding them alone would drop a leading space)."""
    prompt = tokenizer.decode(prompt_ids)
    return tokenizer.decode(prompt_ids + new_ids)[len(prompt) :]


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Per row, keep the top-k logits and the smallest set whose probability reaches top_p."""
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass of the strictly more likely tokens
        drop = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, order, before >= top_p)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="lm generate", description="Generate text from a checkpoint.")
    p.add_argument(
        "--checkpoint", required=True, help="run directory (newest complete checkpoint) or checkpoint directory"
    )
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for several prompts)")
    p.add_argument("--max-new-tokens", type=int, default=50)
    p.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-cache", action="store_true", help="recompute the whole context for every token")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = p.parse_args(argv)
    if args.max_new_tokens < 0 or args.temperature < 0 or (args.top_k is not None and args.top_k <= 0):
        raise UserError("--max-new-tokens and --temperature must be >= 0 and --top-k > 0")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {args.top_p}")
    return args


def main(argv=None) -> int:

    args = parse_args(argv)
    model, tokenizer, tag_dir = load_for_inference(args.checkpoint)
    generator = torch.Generator().manual_seed(args.seed)
    prompt_ids = [tokenizer.encode(prompt) for prompt in args.prompt]
    new = generate_batch(
        model,
        prompt_ids,
        args.max_new_tokens,
        args.temperature,
        args.top_k,
        args.top_p,
        generator,
        use_cache=not args.no_cache,
        vocab_size=tokenizer.vocab_size,
    )
    outputs = [
        {"prompt": prompt, "completion": continuation_text(tokenizer, ids, new_ids)}
        for prompt, ids, new_ids in zip(args.prompt, prompt_ids, new)
    ]
    if args.json:
        print(json.dumps({"checkpoint": str(tag_dir), "outputs": outputs}))
    else:
        for out in outputs:
            sys.stdout.write(out["prompt"] + out["completion"] + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_command(main))
