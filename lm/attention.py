"""Causal attention variants, registered by name with the facts the rest of the model reads.

Every function takes q shaped (batch, heads, time, head_dim) and k, v shaped (batch, kv_heads,
time, head_dim), and is causal. kv_heads divides heads: under grouped-query attention query head h
reads key/value head h // (heads / kv_heads), as Hugging Face's Llama does.

Softmax attention is a non-local-means smoother: out = A V with A = softmax(Q K^T / sqrt(d) + mask).
Twicing attention (Abdullaev & Nguyen, "Transformer Meets Twicing", ICLR 2025, arXiv 2503.00687)
applies Tukey's twicing to that smoother: smooth the residual once more and add it back,

    out = (2A - A^2) V = A (2V - A V).

The right-hand form needs only two ordinary attention passes with the same A,
U = attn(Q, K, V) and out = attn(Q, K, 2V - U), so it runs on fused kernels in O(T) memory and
never forms a T x T matrix. Causality is preserved: A^2 is lower-triangular when A is, and the
rows of 2A - A^2 still sum to one.

Twicing runs as two SDPA passes (`twicing_sdpa`) or on a Triton kernel (lm.kernels.twicing_triton)
that shares the first pass's log-sum-exp with the second and forms 2V - U in registers
(`twicing_triton`: the kernel wherever it takes the inputs, a CUDA GPU with bf16 or fp16 and head
size 64 or 128, else two SDPA passes). `twicing`, what model.attention_impl: fused runs, is the
one of the two that benchmarks/measured_fastest.json records fastest on this class of GPU for this
head size (lm.fastest), two SDPA passes where nothing is recorded and off a GPU. The `*_reference`
functions materialise A explicitly; they exist to test the fused ones.

Cached decoding (`*_cached`) keeps K and V of the tokens so far and, for twicing, U as well:
for a new token i, u_i = a_i V is appended to the U cache and out_i = 2 u_i - a_i U, since row i
of A (2V - U) is 2 a_i V - a_i U. Every row of U depends only on earlier tokens, so U computed once
stays valid.

Grouped-query twicing: U = A V has a row per query head, so the second pass has keys per kv head
and values 2V - U per query head. SDPA's own GQA needs keys and values with the same heads
(otherwise it falls back to materialising A), so `attend` runs that pass once per position i
within the groups: query heads i, i + G, ... meet each kv head once, an ordinary SDPA call on K
itself. No expanded copy of K is made or kept for backward.

Each variant is an `AttentionVariant` in `ATTENTION` (name -> variant): its function, its cached
function, whether it twices and how many attention passes it costs. The model, the cache and the
FLOP count read these facts; none of them parses a name.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F

from core.errors import UserError
from lm import fastest

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
CachedAttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "LayerCache"], torch.Tensor]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """SDPA of q over k (kv_heads) with values v of kv_heads or of q's heads (see the docstring)."""
    heads, kv_heads = q.size(-3), k.size(-3)
    if kv_heads == heads:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    if v.size(-3) == kv_heads:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    group = heads // kv_heads
    parts = [F.scaled_dot_product_attention(q[:, i::group], k, v[:, i::group], is_causal=causal) for i in range(group)]
    return torch.stack(parts, dim=2).flatten(1, 2)  # (B, kv_heads, group, T, D): head j * group + i


def per_query_head(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Key/value heads repeated for each query head of their group (h reads h // group)."""
    return x if x.size(-3) == heads else x.repeat_interleave(heads // x.size(-3), dim=-3)


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(QK^T/sqrt(d)) V on PyTorch's fused kernel (flash / memory-efficient where available)."""
    return attend(q, k, v)


def twicing_attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(2A - A^2) V computed as A (2V - A V): two fused SDPA passes, no T x T tensor."""
    u = attend(q, k, v)
    return attend(q, k, 2 * per_query_head(v, q.size(-3)) - u)


def _load_triton_kernels() -> ModuleType | None:
    """The Triton module where a GPU can run it; CPU-only machines never import Triton."""
    if not torch.cuda.is_available():
        return None
    try:
        from lm.kernels import twicing_triton
    except ImportError:  # no Triton installed
        return None
    return twicing_triton


# Looked up once here rather than per call, so that torch.compile traces a plain global.
TRITON_KERNELS = _load_triton_kernels()


def _kernel_takes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    return q.is_cuda and TRITON_KERNELS is not None and TRITON_KERNELS.supports(q, k, v)


_FASTEST: dict[tuple[int, int], bool] = {}


def kernel_is_fastest(device_index: int, head_dim: int) -> bool:
    """Whether benchmarks/measured_fastest.json records the kernel faster than two SDPA passes on
    this GPU's class for this head size (read once per GPU and head size)."""
    if (device_index, head_dim) not in _FASTEST:
        name = torch.cuda.get_device_name(device_index)
        _FASTEST[device_index, head_dim] = fastest.fastest_twicing(name, head_dim, fastest.load_record()) == "triton"
    return _FASTEST[device_index, head_dim]


if TRITON_KERNELS is not None:  # a GPU with Triton: torch.compile calls it at trace time, no graph break
    kernel_is_fastest = torch.compiler.assume_constant_result(kernel_is_fastest)  # (imports dynamo: not on CPUs)


def _kernel_chosen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    return _kernel_takes(q, k, v) and kernel_is_fastest(q.device.index, q.size(-1))


def twicing_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(2A - A^2) V on the implementation measured fastest here: the kernel where recorded, else two SDPA passes."""
    if _kernel_chosen(q, k, v):
        return TRITON_KERNELS.twicing_attention_triton(q, k, v)
    return twicing_attention_sdpa(q, k, v)


def twicing_attention_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(2A - A^2) V on the Triton kernel wherever it takes the inputs, else two SDPA passes."""
    if _kernel_takes(q, k, v):
        return TRITON_KERNELS.twicing_attention_triton(q, k, v)
    return twicing_attention_sdpa(q, k, v)


def causal_attention_matrix(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The explicit (batch, heads, T, T) matrix A = softmax(QK^T/sqrt(d) + causal mask)."""
    t = q.size(-2)
    scores = q @ per_query_head(k, q.size(-3)).transpose(-2, -1) / math.sqrt(q.size(-1))
    future = torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1)
    return scores.masked_fill(future, float("-inf")).softmax(dim=-1)


def softmax_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """A V with A materialised (for tests only)."""
    return causal_attention_matrix(q, k) @ per_query_head(v, q.size(-3))


def twicing_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(2A - A^2) V with A and A^2 materialised, exactly as the paper writes it (for tests only)."""
    a = causal_attention_matrix(q, k)
    return (2 * a - a @ a) @ per_query_head(v, q.size(-3))


class LayerCache:
    """One layer's K, V (kv heads) and for twicing U (query heads) of the tokens so far, (batch, heads, time, dim)."""

    def __init__(self):
        self.k = self.v = self.u = None

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.size(-2)


def _append_token(cache: LayerCache, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.size(-2) != 1:
        raise ValueError("after the prompt, cached attention takes one token at a time")
    cache.k, cache.v = torch.cat([cache.k, k], dim=-2), torch.cat([cache.v, v], dim=-2)


def softmax_attention_cached(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerCache) -> torch.Tensor:
    """A V of new tokens (a whole prompt into an empty cache, or one token) over the cache."""
    if cache.length == 0:
        cache.k, cache.v = k, v
        return attend(q, k, v)
    _append_token(cache, q, k, v)
    return attend(q, cache.k, cache.v, causal=False)  # the newest token sees every cached one


def twicing_attention_sdpa_cached(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerCache) -> torch.Tensor:
    """A (2V - U) of new tokens over the cache, keeping U = A V: token i gets 2 u_i - a_i U."""
    if cache.length == 0:  # prefill: the two passes over the prompt, keeping the first
        u = attend(q, k, v)
        cache.k, cache.v, cache.u = k, v, u
        return attend(q, k, 2 * per_query_head(v, q.size(-3)) - u)
    _append_token(cache, q, k, v)
    u = attend(q, cache.k, cache.v, causal=False)
    cache.u = torch.cat([cache.u, u], dim=-2)  # U has a row per query head, even under GQA
    return 2 * u - attend(q, cache.k, cache.u, causal=False)


def _kernel_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerCache) -> torch.Tensor:
    out, u = TRITON_KERNELS.twicing_attention_and_u(q, k, v)
    cache.k, cache.v, cache.u = k, v, u
    return out


def twicing_attention_cached(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerCache) -> torch.Tensor:
    """As `twicing_attention_sdpa_cached`, but where the kernel is the measured-fastest and takes the
    prompt, out and U come from one call."""
    if cache.length == 0 and _kernel_chosen(q, k, v):
        return _kernel_prefill(q, k, v, cache)
    return twicing_attention_sdpa_cached(q, k, v, cache)


def twicing_attention_kernel_cached(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerCache
) -> torch.Tensor:
    """As `twicing_attention_sdpa_cached`, but a prefill the kernel takes gets out and U from one call."""
    if cache.length == 0 and _kernel_takes(q, k, v):
        return _kernel_prefill(q, k, v, cache)
    return twicing_attention_sdpa_cached(q, k, v, cache)


@dataclass(frozen=True)
class AttentionVariant:
    """One registered attention variant: its math, and the facts the model, cache and FLOP count read."""

    name: str
    attend: AttentionFn  # (q, k, v) -> out, causal
    attend_cached: CachedAttentionFn  # (q, k, v, cache) -> out: the prompt, then one token per call
    twices: bool  # out = (2A - A^2) V rather than A V
    passes: int  # attention passes (QK^T, then A times values) of its two-pass form, for the FLOP count
    kernel: str  # when it takes the Triton kernel on a GPU: "never", "if fastest" (measured) or "always"
    runs: str  # how it runs off the kernel, for the training log

    def runs_on(self, device: torch.device, head_dim: int) -> str:
        """How layers of this variant will run for a model on `device` (for the training log)."""
        if self.kernel == "never" or device.type != "cuda" or TRITON_KERNELS is None:
            return self.runs
        if head_dim not in TRITON_KERNELS.SUPPORTED_HEAD_DIMS:
            return self.runs
        index = torch.cuda.current_device() if device.index is None else device.index
        if self.kernel == "if fastest" and not kernel_is_fastest(index, head_dim):
            return f"{self.runs} (measured fastest here)"
        return f"the Triton kernel in bf16/fp16, {self.runs} in fp32"


# The reference variants cache like their fused twins: a cache is for generation, not for tests of A.
ATTENTION: dict[str, AttentionVariant] = {
    variant.name: variant
    for variant in (
        AttentionVariant(
            "softmax",
            softmax_attention,
            softmax_attention_cached,
            twices=False,
            passes=1,
            kernel="never",
            runs="one SDPA pass",
        ),
        AttentionVariant(
            "twicing",
            twicing_attention,
            twicing_attention_cached,
            twices=True,
            passes=2,
            kernel="if fastest",
            runs="two SDPA passes",
        ),
        AttentionVariant(
            "twicing_triton",
            twicing_attention_kernel,
            twicing_attention_kernel_cached,
            twices=True,
            passes=2,
            kernel="always",
            runs="two SDPA passes",
        ),
        AttentionVariant(
            "twicing_sdpa",
            twicing_attention_sdpa,
            twicing_attention_sdpa_cached,
            twices=True,
            passes=2,
            kernel="never",
            runs="two SDPA passes",
        ),
        AttentionVariant(
            "softmax_reference",
            softmax_attention_reference,
            softmax_attention_cached,
            twices=False,
            passes=1,
            kernel="never",
            runs="materialised A (reference)",
        ),
        AttentionVariant(
            "twicing_reference",
            twicing_attention_reference,
            twicing_attention_sdpa_cached,
            twices=True,
            passes=2,
            kernel="never",
            runs="materialised A (reference)",
        ),
    )
}


def check_runnable(attention_impl: str, twicing_layers: int, device: torch.device) -> None:
    """`model.attention_impl: triton` asks for the kernel: refuse it, in one line, on a device
    without a CUDA GPU and Triton (the other values run everywhere)."""
    if (
        attention_impl == "triton"
        and twicing_layers
        and (torch.device(device).type != "cuda" or TRITON_KERNELS is None)
    ):
        where = "Triton is not installed" if torch.device(device).type == "cuda" else f"this run is on {device}"
        raise UserError(
            f"model.attention_impl: triton needs a CUDA GPU with Triton, and {where}; "
            "use fused (the measured-fastest) or sdpa"
        )


def get_attention(name: str) -> AttentionVariant:
    """Look up an attention variant by name."""
    try:
        return ATTENTION[name]
    except KeyError:
        raise ValueError(f"unknown attention {name!r}; choose one of {', '.join(ATTENTION)}") from None
