"""Text generation from a trained checkpoint: greedy, temperature, top-k and top-p sampling.

    lm generate --checkpoint RUN_DIR --prompt "The module" --max-new-tokens 60
"""

import argparse
import json
import sys

import torch

from lm.errors import UserError, run_command


@torch.no_grad()
def generate(model, prompt_ids: list[int], max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, generator: torch.Generator | None = None) -> list[int]:
    """Extend `prompt_ids` by up to `max_new_tokens` ids; temperature 0 means greedy."""
    block = model.config.block_size
    if not prompt_ids:
        raise UserError("the prompt is empty after tokenisation")
    if len(prompt_ids) > block:
        raise UserError(f"the prompt is {len(prompt_ids)} tokens, longer than the model's context of {block}")
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids], device=device)
    for _ in range(max_new_tokens):
        logits, _ = model(ids[:, -block:])  # the window slides once the context is full
        logits = logits[0, -1].float()
        if temperature == 0:
            next_id = logits.argmax()
        else:
            probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
            next_id = torch.multinomial(probs, 1, generator=generator)[0]
        ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    return ids[0, len(prompt_ids):].tolist()


def continuation_text(tokenizer, prompt_ids: list[int], new_ids: list[int]) -> str:
    """The text the new ids add to the prompt (decoding them alone would drop a leading space)."""
    prompt = tokenizer.decode(prompt_ids)
    return tokenizer.decode(prompt_ids + new_ids)[len(prompt):]


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Keep the top-k logits and the smallest set whose probability reaches top_p; others -> -inf."""
    if top_k is not None and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        before = sorted_logits.softmax(-1).cumsum(-1) - sorted_logits.softmax(-1)
        drop = torch.zeros_like(logits, dtype=torch.bool).scatter(0, order, before >= top_p)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="lm generate", description="Generate text from a checkpoint.")
    p.add_argument("--checkpoint", required=True, help="run directory (newest complete checkpoint) or checkpoint directory")
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for several prompts)")
    p.add_argument("--max-new-tokens", type=int, default=50)
    p.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = p.parse_args(argv)
    if args.max_new_tokens < 0 or args.temperature < 0 or (args.top_k is not None and args.top_k <= 0):
        raise UserError("--max-new-tokens and --temperature must be >= 0 and --top-k > 0")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {args.top_p}")
    return args


def main(argv=None) -> int:
    from lm.checkpoint import load_for_inference

    args = parse_args(argv)
    model, tokenizer, tag_dir = load_for_inference(args.checkpoint)
    generator = torch.Generator().manual_seed(args.seed)
    outputs = []
    for prompt in args.prompt:
        prompt_ids = tokenizer.encode(prompt)
        new = generate(model, prompt_ids, args.max_new_tokens, args.temperature, args.top_k, args.top_p, generator)
        outputs.append({"prompt": prompt, "completion": continuation_text(tokenizer, prompt_ids, new)})
    if args.json:
        print(json.dumps({"checkpoint": str(tag_dir), "outputs": outputs}))
    else:
        for out in outputs:
            sys.stdout.write(out["prompt"] + out["completion"] + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_command(main))
