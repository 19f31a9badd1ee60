"""The analyses of "Transformer Meets Twicing" (Abdullaev & Nguyen, ICLR 2025, arXiv 2503.00687).

    lm analyze --checkpoint A --checkpoint B (--text FILE | --dataset NAME ...) --out DIR

For each checkpoint, on the same text:
1. Over-smoothing: the average pairwise cosine similarity of token representations per layer.
   Pairs: the text's token stream [eod] d1 [eod] d2 ... is cut into consecutive, non-overlapping
   windows of `context` tokens (at most --windows of them, evenly spaced over the text; a text
   shorter than one context is one window). Each window is run through the model alone. For every
   layer l, h_1..h_T are the residual-stream vectors of the window's T tokens: layer 0 is the
   embedding output (token + position), layer l >= 1 the output of block l (before the final
   LayerNorm). The similarity is the mean of cos(h_i, h_j) over all ordered pairs i != j of the
   window, then the mean over windows. Values near 1 mean the tokens have collapsed together;
   the paper shows twicing keeps them apart longer.
2. Robustness: perplexity under word-swap corruption. The words (maximal runs of non-whitespace)
   of the text are permuted once with the seed; at rate r the first round(r * words) of them are
   each replaced by a different word drawn uniformly from the text's own distinct words (also
   seeded), whitespace kept. So corruptions are nested across rates, and word counts unchanged.
3. The spectral curves behind the paper's argument: applying attention n times scales an
   eigenvalue x of A by p_n(x) = x^n; twicing's 2A - A^2 by (2x - x^2)^n, which keeps eigenvalues
   near 1 from decaying (2x - x^2 >= x on [0, 1]), i.e. less smoothing with depth.

Writes DIR/analysis.json, DIR/analysis.png (matplotlib, Agg) and DIR/analysis.md (the table).
"""

import argparse
import json
import re
from pathlib import Path

import numpy as np
import torch

from core.errors import UserError, refuse_non_empty, run_command
from lm.evaluate import EvalText, Parser, add_text_arguments, document_ids, evaluate_documents, text_from_args
from lm.inference import load_for_inference

DEFAULT_RATES = (0.0, 0.05, 0.1, 0.2)
DEFAULT_POWERS = (1, 2, 4, 8, 16)
PAIRS = (
    "per window of `context` tokens (consecutive, non-overlapping, evenly spaced over the text), "
    "mean of cos(h_i, h_j) over all ordered pairs i != j of the window's residual-stream vectors; "
    "layer 0 = embedding output, layer l = output of block l; then the mean over windows"
)
_WORD = re.compile(r"\S+")


# ---- 1. over-smoothing ------------------------------------------------------------------------


def mean_pairwise_cosine(h: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity over ordered pairs i != j of the rows of h (..., T, d), T >= 2.

    With unit rows u_i: sum over all (i, j) of u_i.u_j = |sum_i u_i|^2, and the T diagonal terms are 1.
    """
    t = h.size(-2)
    u = torch.nn.functional.normalize(h.double(), dim=-1)
    total = u.sum(dim=-2).pow(2).sum(dim=-1)
    return (total - t) / (t * (t - 1))


@torch.no_grad()
def layer_outputs(model, idx: torch.Tensor) -> list[torch.Tensor]:
    """Residual stream (B, T, d) after the embedding (layer 0) and after every block."""
    outputs: list[torch.Tensor] = []
    record = lambda module, inputs, output: outputs.append(output.detach())  # noqa: E731
    hooks = [model.embedding_dropout.register_forward_hook(record)]
    hooks += [block.register_forward_hook(record) for block in model.blocks]
    try:
        model(idx)
    finally:
        for hook in hooks:
            hook.remove()
    return outputs


def analysis_windows(n_tokens: int, context: int, max_windows: int) -> list[tuple[int, int]]:
    """(start, end) of the windows the cosine similarity is averaged over (see the docstring)."""
    full = n_tokens // context
    if full == 0:
        if n_tokens < 2:
            raise UserError("the text is too short: cosine similarity needs at least two tokens")
        return [(0, n_tokens)]
    picks = np.unique(np.linspace(0, full - 1, num=min(full, max_windows)).round().astype(int))
    return [(int(k) * context, (int(k) + 1) * context) for k in picks]


@torch.no_grad()
def cosine_similarity_per_layer(
    model, ids: list[int], bos_id: int, context: int, max_windows: int = 64, batch_size: int = 8
) -> list[float]:
    """Average pairwise cosine similarity per layer (0 = embedding), over the analysis windows."""
    sequence = torch.tensor([bos_id] + list(ids))
    windows = analysis_windows(len(sequence), context, max_windows)
    device = next(model.parameters()).device
    sums = torch.zeros(model.config.n_layer + 1, dtype=torch.float64)
    for i in range(0, len(windows), batch_size):
        batch = torch.stack([sequence[s:e] for s, e in windows[i : i + batch_size]]).to(device)
        per_layer = [mean_pairwise_cosine(h).sum().cpu() for h in layer_outputs(model, batch)]
        sums += torch.stack(per_layer)
    return (sums / len(windows)).tolist()


# ---- 2. word-swap corruption ------------------------------------------------------------------


def word_swap(documents: list[str], rate: float, seed: int = 0) -> list[str]:
    """The documents with round(rate * words) words replaced by other words of their vocabulary."""
    if not 0.0 <= rate <= 1.0:
        raise UserError(f"word-swap rate must be in [0, 1], got {rate}")
    spans = [(d, m.start(), m.end()) for d, doc in enumerate(documents) for m in _WORD.finditer(doc)]
    words = [documents[d][s:e] for d, s, e in spans]
    n_swap = round(rate * len(words))
    if n_swap == 0:
        return list(documents)
    vocab = sorted(set(words))
    if len(vocab) < 2:
        raise UserError("word swap needs a text with at least two distinct words")
    index = {w: i for i, w in enumerate(vocab)}
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(words))  # the same order at every rate: nested corruptions
    draws = rng.integers(0, len(vocab) - 1, size=len(words))  # one replacement per word, fixed
    replaced: dict[int, list[tuple[int, int, str]]] = {}
    for k in order[:n_swap].tolist():
        d, s, e = spans[k]
        r = int(draws[k]) + (draws[k] >= index[words[k]])  # skip the word itself: always a change
        replaced.setdefault(d, []).append((s, e, vocab[r]))
    out = list(documents)
    for d, edits in replaced.items():
        doc = out[d]
        for s, e, word in sorted(edits, reverse=True):  # right to left keeps earlier offsets valid
            doc = doc[:s] + word + doc[e:]
        out[d] = doc
    return out


# ---- 3. spectral curves -----------------------------------------------------------------------


def spectral_curves(powers=DEFAULT_POWERS, points: int = 101) -> dict:
    """p_n(x) = x^n (n softmax layers) and (2x - x^2)^n (n twicing layers) on x in [0, 1]."""
    x = np.linspace(0.0, 1.0, points)
    return {
        "x": x.tolist(),
        "powers": list(powers),
        "softmax": {str(n): (x**n).tolist() for n in powers},
        "twicing": {str(n): ((2 * x - x**2) ** n).tolist() for n in powers},
    }


# ---- one model, several models, the outputs ---------------------------------------------------


def analyze_model(
    model,
    tokenizer,
    text: EvalText,
    context: int | None,
    stride: int | None,
    rates=DEFAULT_RATES,
    seed: int = 0,
    max_windows: int = 64,
    batch_size: int = 8,
) -> dict:
    context = context if context is not None else model.config.block_size
    swaps = []
    for rate in rates:
        report = evaluate_documents(
            model, tokenizer, word_swap(text.documents, rate, seed), context, stride, batch_size
        )
        swaps.append({"rate": rate, **report})
    clean = next((s for s in swaps if s["rate"] == 0.0), None)
    if clean is None:
        clean = evaluate_documents(model, tokenizer, text.documents, context, stride, batch_size)
    ids = document_ids(tokenizer, text.documents)
    return {
        "twicing_layers": model.config.twicing_layer_indices(),
        "n_layer": model.config.n_layer,
        "clean": clean,
        "word_swap": swaps,
        "cosine_similarity": cosine_similarity_per_layer(
            model, ids, tokenizer.eod_id, context, max_windows, batch_size
        ),
    }


def unique_labels(checkpoints: list[str], labels: list[str] | None) -> list[str]:
    if labels:
        if len(labels) != len(checkpoints):
            raise UserError(
                f"{len(labels)} --label for {len(checkpoints)} --checkpoint; give one per checkpoint or none"
            )
        names = list(labels)
    else:
        names = [Path(c).resolve().name for c in checkpoints]
    seen: dict[str, int] = {}
    for i, name in enumerate(names):  # two runs named alike still get distinct columns
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            names[i] = f"{name}-{seen[name]}"
    return names


def check_out_dir(out: Path) -> None:
    refuse_non_empty(out)


def run_analysis(
    checkpoints: list[str],
    text: EvalText,
    out: Path,
    labels: list[str] | None = None,
    context: int | None = None,
    stride: int | None = None,
    rates=DEFAULT_RATES,
    seed: int = 0,
    max_windows: int = 64,
    powers=DEFAULT_POWERS,
    batch_size: int = 8,
) -> dict:
    """Analyse every checkpoint on `text`; write analysis.json, .png and .md into the new dir `out`."""

    check_out_dir(out)
    if not checkpoints:
        raise UserError("give at least one --checkpoint")
    names = unique_labels(checkpoints, labels)
    models = []
    for name, path in zip(names, checkpoints):
        model, tokenizer, source = load_for_inference(path)
        result = analyze_model(model, tokenizer, text, context, stride, rates, seed, max_windows, batch_size)
        models.append({"label": name, "checkpoint": str(source), **result})
    analysis = {
        "text": {
            "source": text.source,
            "documents": len(text.documents),
            "words": len(text.text.split()),
            "bytes": len(text.text.encode("utf-8")),
        },
        "settings": {
            "context": context,
            "stride": stride,
            "rates": list(rates),
            "seed": seed,
            "max_windows": max_windows,
        },
        "cosine_pairs": PAIRS,
        "models": models,
        "spectral": spectral_curves(powers),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "analysis.json").write_text(json.dumps(analysis, indent=2))
    (out / "analysis.md").write_text(markdown_table(analysis) + "\n")
    write_plot(analysis, out / "analysis.png")
    return analysis


def markdown_table(analysis: dict) -> str:
    """Side by side: one column per model; clean and word-swap PPL, cosine similarity per layer."""
    models = analysis["models"]
    rows = [
        ["clean token PPL"] + [f"{m['clean']['token_ppl']:.2f}" for m in models],
        ["clean word PPL"] + [f"{m['clean']['word_ppl']:.2f}" for m in models],
        ["clean bits/byte"] + [f"{m['clean']['bits_per_byte']:.4f}" for m in models],
        ["twicing layers"] + [",".join(map(str, m["twicing_layers"])) or "none" for m in models],
    ]
    for i, rate in enumerate(analysis["settings"]["rates"]):
        if rate:
            rows.append([f"word-swap {rate:.0%} token PPL"] + [f"{m['word_swap'][i]['token_ppl']:.2f}" for m in models])
            rows.append([f"word-swap {rate:.0%} word PPL"] + [f"{m['word_swap'][i]['word_ppl']:.2f}" for m in models])
    for layer in range(max(len(m["cosine_similarity"]) for m in models)):
        name = "embedding" if layer == 0 else f"block {layer}"
        rows.append(
            [f"cos sim layer {layer} ({name})"]
            + [f"{m['cosine_similarity'][layer]:.4f}" if layer < len(m["cosine_similarity"]) else "" for m in models]
        )
    header = ["metric"] + [m["label"] for m in models]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def write_plot(analysis: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, (ax_cos, ax_swap, ax_spec) = plt.subplots(1, 3, figsize=(16, 4.5))
    for m in analysis["models"]:
        ax_cos.plot(range(len(m["cosine_similarity"])), m["cosine_similarity"], marker="o", label=m["label"])
        rates = [100 * s["rate"] for s in m["word_swap"]]
        ax_swap.plot(rates, [s["word_ppl"] for s in m["word_swap"]], marker="o", label=m["label"])
    ax_cos.set(title="over-smoothing: mean pairwise cosine similarity", xlabel="layer (0 = embedding)", ylabel="cosine")
    ax_swap.set(title="word-swap corruption", xlabel="words swapped (%)", ylabel="word perplexity (log)", yscale="log")
    spec = analysis["spectral"]
    for i, n in enumerate(spec["powers"]):
        color = f"C{i}"
        ax_spec.plot(spec["x"], spec["softmax"][str(n)], color=color, linestyle="--", label=f"x^{n}")
        ax_spec.plot(spec["x"], spec["twicing"][str(n)], color=color, label=f"(2x-x²)^{n}")
    ax_spec.set(title="eigenvalue after n layers: softmax (--) vs twicing", xlabel="eigenvalue x of A", ylabel="p_n(x)")
    for ax in (ax_cos, ax_swap, ax_spec):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _rates(text: str) -> list[float]:
    try:
        rates = [float(r) for r in text.split(",") if r.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of rates: {text!r}") from None
    if not rates or any(not 0.0 <= r <= 1.0 for r in rates):
        raise argparse.ArgumentTypeError(f"rates must be in [0, 1], got {text!r}")
    return rates


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="lm analyze",
        description="The twicing paper's analyses of one or more checkpoints on one text.",
        epilog=__doc__.split("\n\n", 2)[1] + "\n\n" + PAIRS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--checkpoint", action="append", required=True, help="run, checkpoint or converted directory (repeat)"
    )
    p.add_argument(
        "--label", action="append", default=None, help="column name per checkpoint (repeat; default: directory name)"
    )
    add_text_arguments(p)
    p.add_argument("--out", required=True, help="new (or empty) directory for analysis.json / .png / .md")
    p.add_argument("--context", type=int, default=None, help="window length (default: each model's context)")
    p.add_argument("--stride", type=int, default=None, help="perplexity stride (default: context / 2)")
    p.add_argument("--rates", type=_rates, default=list(DEFAULT_RATES), help="word-swap rates, e.g. 0,0.05,0.1,0.2")
    p.add_argument("--seed", type=int, default=0, help="word-swap seed")
    p.add_argument("--windows", type=int, default=64, help="most windows for the cosine similarity")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.windows < 1:
        raise UserError(f"--windows must be positive, got {args.windows}")
    out = Path(args.out)
    check_out_dir(out)  # before the (slow) loading
    text = text_from_args(args)
    analysis = run_analysis(
        args.checkpoint,
        text,
        out,
        args.label,
        args.context,
        args.stride,
        args.rates,
        args.seed,
        args.windows,
        batch_size=args.batch_size,
    )
    print(markdown_table(analysis))
    print(f"wrote {out / 'analysis.json'} and {out / 'analysis.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_command(main))
