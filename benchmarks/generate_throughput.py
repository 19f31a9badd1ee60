"""Generation speed with and without the K/V (and twicing U) cache, in the same run.

    .venv/bin/python benchmarks/generate_throughput.py [--checkpoint RUN] [--config configs/demo.yaml]

Without --checkpoint the model of the config is randomly initialised (speed does not depend on
the weights). Greedy decoding of --new tokens after a prompt of --prompt tokens, batch 1 and 8.
"""

import argparse
import time
from pathlib import Path

import torch
import yaml

from lm.config import RunConfig
from lm.generate import generate_batch
from lm.inference import load_model
from lm.model import GPT

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    p.add_argument("--prompt", type=int, default=16, help="prompt length in tokens")
    p.add_argument("--new", type=int, default=96, help="tokens to generate")
    args = p.parse_args()
    if args.checkpoint:
        model = load_model(args.checkpoint)[0]
    else:
        raw = yaml.safe_load(Path(args.config).read_text())
        torch.manual_seed(0)
        model = GPT(RunConfig.from_dict({"model": raw["model"]}).model).eval()
    config = model.config
    print(
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, layers {config.layer_attention()}, "
        f"{torch.get_num_threads()} threads, prompt {args.prompt}, {args.new} new tokens"
    )
    print(f"{'batch':>5} {'cache':>6} {'tokens/s':>9} {'speed-up':>9}")
    for batch in (1, 8):
        prompts = [[(7 * i + j) % config.vocab_size for j in range(args.prompt)] for i in range(batch)]
        rates = {}
        for use_cache in (False, True):
            generate_batch(model, prompts, 4, temperature=0, use_cache=use_cache)  # warm-up
            start = time.perf_counter()
            generate_batch(model, prompts, args.new, temperature=0, use_cache=use_cache)
            rates[use_cache] = batch * args.new / (time.perf_counter() - start)
        for use_cache in (False, True):
            print(
                f"{batch:>5} {'yes' if use_cache else 'no':>6} {rates[use_cache]:>9.0f} "
                f"{rates[use_cache] / rates[False]:>8.2f}x"
            )


if __name__ == "__main__":
    main()
