"""A GPT-2 style language model with pluggable attention per layer.

The architecture is GPT-2's (Radford et al., 2019): learned token and position embeddings,
pre-LayerNorm blocks of causal self-attention and a GELU MLP, a final LayerNorm, and an output
projection tied to the token embedding. Parameter names and shapes follow GPT-2 one-to-one
(`transformer.h.0.attn.c_attn.weight`, ...; our Linear weights are the transpose of GPT-2's Conv1D
weights), so a softmax model exports to Hugging Face GPT-2 exactly.

What is new is the attention of each layer, a variant registered in `lm.attention` and named by
the config: plain softmax attention, or twicing attention (Abdullaev & Nguyen, "Transformer Meets
Twicing", ICLR 2025), out = (2A - A^2) V, which the paper's language model uses in its last two
layers. The loss is a parameter-free submodule, so that tensor parallelism can swap in its own
vocabulary-parallel cross-entropy as it swaps the other layers (lm.parallel).

Activation checkpointing (`recompute_blocks`, set from train.activation_checkpointing) keeps only
the input of the chosen blocks and runs their forward again in backward, trading compute for
memory; parameters and state-dict names are the same either way.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lm.attention import AttentionVariant, LayerCache, get_attention
from lm.config import ModelConfig


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig, variant: AttentionVariant):
        super().__init__()
        self.n_head = config.n_head  # heads computed here: n_head / tp under tensor parallelism
        self.head_dim = config.n_embd // config.n_head
        self.variant = variant  # softmax or twicing, and how it runs (lm.attention)
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        # (B, T, 3 * heads * head_dim) -> three (B, heads, T, head_dim) tensors
        q, k, v = self.c_attn(x).view(b, t, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)
        y = self.variant.attend(q, k, v) if cache is None else self.variant.attend_cached(q, k, v, cache)
        y = y.transpose(1, 2).reshape(b, t, self.n_head * self.head_dim)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.ffn_dim, bias=config.bias)
        self.c_proj = nn.Linear(config.ffn_dim, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # GPT-2 uses the tanh approximation of GELU ("gelu_new" in transformers).
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, variant: AttentionVariant):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.attn = CausalSelfAttention(config, variant)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache)
        return x + self.mlp(self.ln_2(x))


class CrossEntropy(nn.Module):
    """Token cross-entropy of logits (B, T, vocab) against ids (B, T), reduced "mean", "sum" or "none"."""

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        # In at least fp32: a bf16 log-softmax over a large vocabulary loses the loss's digits.
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction=reduction)
        return loss if reduction != "none" else loss.view(targets.shape)


class GPT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList(Block(config, get_attention(name)) for name in config.layer_attention()),
                ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying, as in GPT-2
        self.loss = CrossEntropy()  # no parameters, so no state-dict keys; replaced under TP
        self.recompute_blocks: frozenset[int] = frozenset()  # blocks whose activations backward recomputes
        self.apply(self._init_weights)
        # GPT-2 scales the init of the projections that write into the residual stream by
        # 1/sqrt(2 * n_layer), so the residual's variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=config.init_std / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module: nn.Module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_parameters(self, exclude_position_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # tied weights are counted once
        return n - self.transformer.wpe.weight.numel() if exclude_position_embedding else n

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        reduction: str = "mean",
        cache: list[LayerCache] | None = None,
    ):
        """Logits (B, T, vocab) for token ids (B, T); with targets also the cross-entropy.

        reduction "mean" gives the mean over all tokens, "none" the (B, T) per-token losses.
        With `cache` (one LayerCache per layer, from `new_cache()`), idx continues the cached
        tokens: the whole prompt first, then one token per call.
        Under tensor parallelism the logits are this rank's vocabulary slice (lm.parallel).
        """
        start = cache[0].length if cache else 0
        t = start + idx.size(1)
        if t > self.config.block_size:
            raise ValueError(f"sequence of {t} tokens is longer than the context ({self.config.block_size})")
        pos = torch.arange(start, t, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for i, block in enumerate(self.transformer.h):
            if i in self.recompute_blocks and cache is None and torch.is_grad_enabled():
                # Non-reentrant: the recompute calls the block (and its hooks, ZeRO-3's gathers, TP's
                # collectives) again under the same RNG and autocast state, so it computes the same.
                x = checkpoint(block, x, use_reentrant=False, preserve_rng_state=True)
            else:
                x = block(x, cache[i] if cache else None)
        logits = self.lm_head(self.transformer.ln_f(x))
        if targets is None:
            return logits, None
        return logits, self.loss(logits, targets, reduction)

    def new_cache(self) -> list[LayerCache]:
        return [LayerCache() for _ in self.transformer.h]

    def optimizer_groups(self, weight_decay: float) -> list[dict]:
        """Weight decay on matrices (and the embedding), none on biases and LayerNorm gains.

        Told apart by name, not by shape: a ZeRO-3 partition of a matrix is a flat tensor.
        """
        vectors = {name for name, _ in self.named_parameters() if name.endswith(".bias") or ".ln_" in name}
        decay = [p for name, p in self.named_parameters() if name not in vectors]
        no_decay = [p for name, p in self.named_parameters() if name in vectors]
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def flops_per_token(self) -> int:
        """Training FLOPs per token (forward + backward = 3x forward), counting twicing's second pass."""
        c, n = self.config, self.config.block_size
        matmul_params = self.num_parameters(exclude_position_embedding=True)
        attention_passes = sum(block.attn.variant.passes for block in self.transformer.h)  # twicing: 2
        # each pass: QK^T and AV, 2 FLOPs per multiply-add, causal halves it on average
        attention = attention_passes * 2 * 2 * n * c.n_embd // 2
        return 3 * (2 * matmul_params + attention)
