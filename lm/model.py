"""A decoder-only language model with pluggable attention per layer: GPT-2's layout or Llama's.

Two parameter layouts, named by `model.arch`:
- GPT-2 (Radford et al., 2019): `transformer.wte`, `transformer.wpe`, blocks `transformer.h.{i}`
  with `ln_1`, `attn.c_attn` (queries, keys and values in one projection), `attn.c_proj`, `ln_2`,
  `mlp.c_fc`, `mlp.c_proj`, then `transformer.ln_f`. Names and shapes follow GPT-2 one-to-one (our
  Linear weights are the transpose of its Conv1D weights), so a softmax model exports exactly.
- Llama (Touvron et al., 2023): `model.embed_tokens`, blocks `model.layers.{i}` with
  `input_layernorm`, `self_attn.{q,k,v,o}_proj`, `post_attention_layernorm`,
  `mlp.{gate,up,down}_proj`, then `model.norm` and `lm_head`: Hugging Face's Llama names, one to one.
The options compute the same in either layout: learned or rotary positions (lm.positions), LayerNorm
or RMSNorm, a GELU or SwiGLU MLP, grouped-query attention (n_kv_head key/value heads shared by
groups of query heads), biases, and an output layer tied to the token embedding or its own.

What is new is the attention of each layer, a variant registered in `lm.attention` and named by
the config: plain softmax attention, or twicing attention (Abdullaev & Nguyen, "Transformer Meets
Twicing", ICLR 2025), out = (2A - A^2) V, which the paper's language model uses in its last two
layers. The loss is a parameter-free submodule, so that tensor parallelism can swap in its own
vocabulary-parallel cross-entropy as it swaps the other layers (lm.parallel); so is
`sequence_split`, which sequence parallelism makes keep this rank's part of the embedded sequence.

Activation checkpointing (`recompute_blocks`, set from train.activation_checkpointing) keeps only
the input of the chosen blocks and runs their forward again in backward, trading compute for
memory; parameters and state-dict names are the same either way.
"""

import math
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lm.attention import AttentionVariant, LayerCache, get_attention
from lm.config import ModelConfig
from lm.positions import apply_rotary, rotary_cos_sin

Rotary = tuple[torch.Tensor, torch.Tensor] | None  # (cos, sin) of the positions at hand, or no rotation


class SelfAttention(nn.Module):
    """Causal self-attention of n_head query heads over n_kv_head key/value heads; the layouts differ
    only in how the projections are stored (`project`, `output`)."""

    def __init__(self, config: ModelConfig, variant: AttentionVariant):
        super().__init__()
        self.n_head = config.n_head  # heads computed here: n_head / tp under tensor parallelism
        self.n_kv_head = config.n_kv_head  # likewise n_kv_head / tp
        self.head_dim = config.head_dim
        self.variant = variant  # softmax or twicing, and how it runs (lm.attention)
        self.resid_dropout = nn.Dropout(config.dropout)

    def heads(self, x: torch.Tensor, b: int, t: int) -> torch.Tensor:
        return x.view(b, t, -1, self.head_dim).transpose(1, 2)  # (B, heads, T, head_dim)

    def forward(self, x: torch.Tensor, rotary: Rotary = None, cache: LayerCache | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (self.heads(part, b, t) for part in self.project(x))
        if rotary is not None:  # q and k rotated once: both of twicing's passes use this one A
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        y = self.variant.attend(q, k, v) if cache is None else self.variant.attend_cached(q, k, v, cache)
        y = y.transpose(1, 2).reshape(b, t, self.n_head * self.head_dim)
        return self.resid_dropout(self.output(y))


class CausalSelfAttention(SelfAttention):
    """GPT-2's layout: one projection c_attn whose rows are the queries, then the keys, then the values."""

    def __init__(self, config: ModelConfig, variant: AttentionVariant):
        super().__init__(config, variant)
        q_dim, kv_dim = config.n_head * self.head_dim, config.n_kv_head * self.head_dim
        self.c_attn = nn.Linear(config.n_embd, q_dim + 2 * kv_dim, bias=config.bias)
        self.c_proj = nn.Linear(q_dim, config.n_embd, bias=config.bias)

    def project(self, x: torch.Tensor) -> list[torch.Tensor]:
        kv_dim = self.n_kv_head * self.head_dim
        return self.c_attn(x).split([self.n_head * self.head_dim, kv_dim, kv_dim], dim=-1)

    def output(self, y: torch.Tensor) -> torch.Tensor:
        return self.c_proj(y)


class LlamaAttention(SelfAttention):
    """Llama's layout: q_proj, k_proj, v_proj and o_proj."""

    def __init__(self, config: ModelConfig, variant: AttentionVariant):
        super().__init__(config, variant)
        q_dim, kv_dim = config.n_head * self.head_dim, config.n_kv_head * self.head_dim
        self.q_proj = nn.Linear(config.n_embd, q_dim, bias=config.bias)
        self.k_proj = nn.Linear(config.n_embd, kv_dim, bias=config.bias)
        self.v_proj = nn.Linear(config.n_embd, kv_dim, bias=config.bias)
        self.o_proj = nn.Linear(q_dim, config.n_embd, bias=config.bias)

    def project(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.q_proj(x), self.k_proj(x), self.v_proj(x)]

    def output(self, y: torch.Tensor) -> torch.Tensor:
        return self.o_proj(y)


def activation(kind: str, h: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    # GPT-2 uses the tanh approximation of GELU ("gelu_new" in transformers); SwiGLU gates with SiLU.
    return F.silu(gate) * h if kind == "swiglu" else F.gelu(h, approximate="tanh")


class MLP(nn.Module):
    """GPT-2's layout: c_fc, then c_proj. Under SwiGLU c_fc's rows are the gate's, then the up projection's."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.kind = config.mlp
        width = 2 * config.ffn_dim if config.mlp == "swiglu" else config.ffn_dim
        self.c_fc = nn.Linear(config.n_embd, width, bias=config.bias)
        self.c_proj = nn.Linear(config.ffn_dim, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)
        gate, h = h.chunk(2, dim=-1) if self.kind == "swiglu" else (None, h)
        return self.dropout(self.c_proj(activation(self.kind, h, gate)))


class LlamaMLP(nn.Module):
    """Llama's layout: gate_proj (SwiGLU only), up_proj, down_proj."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.kind = config.mlp
        if config.mlp == "swiglu":
            self.gate_proj = nn.Linear(config.n_embd, config.ffn_dim, bias=config.bias)
        self.up_proj = nn.Linear(config.n_embd, config.ffn_dim, bias=config.bias)
        self.down_proj = nn.Linear(config.ffn_dim, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.gate_proj(x) if self.kind == "swiglu" else None
        return self.dropout(self.down_proj(activation(self.kind, self.up_proj(x), gate)))


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd, eps=config.layer_norm_epsilon)
    return nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)


class Block(nn.Module):
    """A pre-norm block under GPT-2's names: ln_1, attn, ln_2, mlp."""

    def __init__(self, config: ModelConfig, variant: AttentionVariant):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config, variant)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    @property
    def attention(self) -> SelfAttention:
        return self.attn

    def forward(self, x: torch.Tensor, rotary: Rotary = None, cache: LayerCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), rotary, cache)
        return x + self.mlp(self.ln_2(x))


class LlamaBlock(nn.Module):
    """The same block under Llama's names: input_layernorm, self_attn, post_attention_layernorm, mlp."""

    def __init__(self, config: ModelConfig, variant: AttentionVariant):
        super().__init__()
        self.input_layernorm = make_norm(config)
        self.self_attn = LlamaAttention(config, variant)
        self.post_attention_layernorm = make_norm(config)
        self.mlp = LlamaMLP(config)

    @property
    def attention(self) -> SelfAttention:
        return self.self_attn

    def forward(self, x: torch.Tensor, rotary: Rotary = None, cache: LayerCache | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rotary, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


# Each layout's names for the model's body and its parts.
LAYOUTS = {
    "gpt2": dict(body="transformer", tokens="wte", positions="wpe", blocks="h", norm="ln_f", block=Block),
    "llama": dict(
        body="model", tokens="embed_tokens", positions="embed_positions", blocks="layers", norm="norm", block=LlamaBlock
    ),
}
NORM_GAINS = (".ln_1.", ".ln_2.", ".ln_f.", "layernorm.", "model.norm.")  # in the names of norm weights
RESIDUAL_PROJECTIONS = ("c_proj.weight", "o_proj.weight", "down_proj.weight")  # write into the residual stream


def is_norm_parameter(name: str) -> bool:
    return any(part in name for part in NORM_GAINS)


def writes_residual(name: str) -> bool:
    return name.endswith(RESIDUAL_PROJECTIONS)


def block_prefix(config: ModelConfig) -> str:
    """Where the blocks' state-dict names start: `transformer.h` or `model.layers` (then `.{i}.`)."""
    layout = LAYOUTS[config.arch]
    return f"{layout['body']}.{layout['blocks']}"


def embedding_names(config: ModelConfig) -> tuple[str, str]:
    """(token embedding, output layer): the state-dict names that are one tensor when they are tied."""
    layout = LAYOUTS[config.arch]
    return f"{layout['body']}.{layout['tokens']}.weight", "lm_head.weight"


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
        layout = LAYOUTS[config.arch]
        self._names = layout
        parts = {layout["tokens"]: nn.Embedding(config.vocab_size, config.n_embd)}
        if config.position == "learned":
            parts[layout["positions"]] = nn.Embedding(config.block_size, config.n_embd)
        parts["drop"] = nn.Dropout(config.dropout)
        parts[layout["blocks"]] = nn.ModuleList(
            layout["block"](config, get_attention(name)) for name in config.layer_attention()
        )
        parts[layout["norm"]] = make_norm(config)
        setattr(self, layout["body"], nn.ModuleDict(parts))  # `transformer` (GPT-2) or `model` (Llama)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.token_embedding.weight = self.lm_head.weight  # weight tying, as in GPT-2
        self.loss = CrossEntropy()  # no parameters, so no state-dict keys; replaced under TP
        self.sequence_split = nn.Identity()  # likewise; sequence parallelism keeps this rank's tokens
        self.recompute_blocks: frozenset[int] = frozenset()  # blocks whose activations backward recomputes
        # Context parallelism (lm.parallel.context): idx is this rank's chunk of a sequence over
        # `context_ranks` ranks, and chunk_positions(T, device) gives the global positions of its tokens.
        self.context_ranks = 1
        self.chunk_positions: Callable[[int, torch.device], torch.Tensor] | None = None
        self.apply(self._init_weights)
        # GPT-2 scales the init of the projections that write into the residual stream by
        # 1/sqrt(2 * n_layer), so the residual's variance does not grow with depth.
        for name, p in self.named_parameters():
            if writes_residual(name):
                nn.init.normal_(p, mean=0.0, std=config.init_std / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module: nn.Module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    # The parts by role, whatever the layout calls them.
    @property
    def body(self) -> nn.ModuleDict:
        return getattr(self, self._names["body"])

    @property
    def token_embedding(self) -> nn.Module:
        return self.body[self._names["tokens"]]

    def replace_token_embedding(self, module: nn.Module) -> None:
        # Not a property setter: nn.Module.__setattr__ would register a module of that name instead.
        self.body[self._names["tokens"]] = module

    @property
    def position_embedding(self) -> nn.Module | None:
        return self.body[self._names["positions"]] if self.config.position == "learned" else None

    @property
    def embedding_dropout(self) -> nn.Module:
        return self.body["drop"]

    @property
    def blocks(self) -> nn.ModuleList:
        return self.body[self._names["blocks"]]

    @property
    def final_norm(self) -> nn.Module:
        return self.body[self._names["norm"]]

    def num_parameters(self, exclude_position_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # tied weights are counted once
        positions = self.position_embedding
        return n - positions.weight.numel() if exclude_position_embedding and positions is not None else n

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
        Under tensor parallelism the logits are this rank's vocabulary slice; under sequence
        parallelism the blocks see this rank's part of the sequence, the logits all of it; under
        context parallelism idx, targets and the logits are this rank's chunk of the sequence (lm.parallel).
        """
        start = cache[0].length if cache else 0
        t = start + idx.size(1) * self.context_ranks
        if t > self.config.block_size:
            raise ValueError(f"sequence of {t} tokens is longer than the context ({self.config.block_size})")
        if self.chunk_positions is None:
            pos = torch.arange(start, t, device=idx.device)
        else:
            pos = self.chunk_positions(t, idx.device)
        x = self.token_embedding(idx)
        rotary = None
        if self.config.position == "learned":
            x = x + self.position_embedding(pos)
        else:
            rotary = rotary_cos_sin(pos, self.config.head_dim, self.config.rope_theta)
        x = self.embedding_dropout(self.sequence_split(x))
        for i, block in enumerate(self.blocks):
            if i in self.recompute_blocks and cache is None and torch.is_grad_enabled():
                # Non-reentrant: the recompute calls the block (and its hooks, ZeRO-3's gathers, TP's
                # collectives) again under the same RNG and autocast state, so it computes the same.
                x = checkpoint(block, x, rotary, use_reentrant=False, preserve_rng_state=True)
            else:
                x = block(x, rotary, cache[i] if cache else None)
        logits = self.lm_head(self.final_norm(x))
        if targets is None:
            return logits, None
        return logits, self.loss(logits, targets, reduction)

    def new_cache(self) -> list[LayerCache]:
        return [LayerCache() for _ in self.blocks]

    def optimizer_groups(self, weight_decay: float) -> list[dict]:
        """Weight decay on matrices (and the embeddings), none on biases and norm gains.

        Told apart by name, not by shape: a ZeRO-3 partition of a matrix is a flat tensor.
        """
        vectors = {name for name, _ in self.named_parameters() if name.endswith(".bias") or is_norm_parameter(name)}
        decay = [p for name, p in self.named_parameters() if name not in vectors]
        no_decay = [p for name, p in self.named_parameters() if name in vectors]
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def flops_per_token(self) -> int:
        """Training FLOPs per token (forward + backward = 3x forward), counting twicing's second pass.

        Every weight is a multiply-add per token except the embedding lookups: the positions', and
        the tokens' when the output layer has its own weight. Grouped-query attention costs the
        same per query head: QK^T and A times values are n_head heads of head_dim wide.
        """
        c, n = self.config, self.config.block_size
        matmul_params = self.num_parameters(exclude_position_embedding=True)
        if not c.tie_embeddings:
            matmul_params -= c.vocab_size * c.n_embd
        attention_passes = sum(block.attention.variant.passes for block in self.blocks)  # twicing: 2
        # each pass: QK^T and AV, 2 FLOPs per multiply-add, causal halves it on average
        attention = attention_passes * 2 * 2 * n * c.n_embd // 2
        return 3 * (2 * matmul_params + attention)
