"""Causal attention variants, chosen by name.

Every function takes q, k, v shaped (batch, heads, time, head_dim) and is causal.

Softmax attention is a non-local-means smoother: out = A V with A = softmax(Q K^T / sqrt(d) + mask).
Twicing attention (Abdullaev & Nguyen, "Transformer Meets Twicing", ICLR 2025, arXiv 2503.00687)
applies Tukey's twicing to that smoother: smooth the residual once more and add it back,

    out = (2A - A^2) V = A (2V - A V).

The right-hand form needs only two ordinary attention passes with the same A,
U = attn(Q, K, V) and out = attn(Q, K, 2V - U), so it runs on fused kernels in O(T) memory and
never forms a T x T matrix. Causality is preserved: A^2 is lower-triangular when A is, and the
rows of 2A - A^2 still sum to one.

The `*_reference` functions materialise A explicitly; they exist to test the fused ones.
"""

import math
from typing import Callable

import torch
import torch.nn.functional as F

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(QK^T/sqrt(d)) V on PyTorch's fused kernel (flash / memory-efficient where available)."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def twicing_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(2A - A^2) V computed as A (2V - A V): two fused passes, no T x T tensor."""
    u = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return F.scaled_dot_product_attention(q, k, 2 * v - u, is_causal=True)


def causal_attention_matrix(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The explicit (batch, heads, T, T) matrix A = softmax(QK^T/sqrt(d) + causal mask)."""
    t = q.size(-2)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    future = torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1)
    return scores.masked_fill(future, float("-inf")).softmax(dim=-1)


def softmax_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """A V with A materialised (for tests only)."""
    return causal_attention_matrix(q, k) @ v


def twicing_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(2A - A^2) V with A and A^2 materialised, exactly as the paper writes it (for tests only)."""
    a = causal_attention_matrix(q, k)
    return (2 * a - a @ a) @ v


ATTENTION: dict[str, AttentionFn] = {
    "softmax": softmax_attention,
    "twicing": twicing_attention,
    "softmax_reference": softmax_attention_reference,
    "twicing_reference": twicing_attention_reference,
}

# How many attention passes each variant costs, for FLOP counts.
ATTENTION_PASSES = {"softmax": 1, "twicing": 2, "softmax_reference": 1, "twicing_reference": 2}


def get_attention(name: str) -> AttentionFn:
    """Look up an attention variant by name."""
    try:
        return ATTENTION[name]
    except KeyError:
        raise ValueError(f"unknown attention {name!r}; choose one of {', '.join(ATTENTION)}") from None
