"""A decoder-only causal language model with twicing attention, for Hugging Face `transformers`.

Written by `lm.hf_export` next to the weights and loaded with

    AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)

The architecture is a pre-norm decoder: token embeddings (plus learned position embeddings, or
rotary positions applied to queries and keys), blocks of causal self-attention and an MLP, a final
norm and an output projection, tied to the token embedding or its own. The config chooses the
parameter layout, GPT-2's names (`transformer.h.0.attn.c_attn.weight`, ...) or Llama's
(`model.layers.0.self_attn.q_proj.weight`, ...), and the options: LayerNorm or RMSNorm, a GELU or
SwiGLU MLP, grouped-query attention, biases. The layers are `nn.Linear`, so matrices are stored
(out, in), not as GPT-2's transposed Conv1D.

Each layer uses either softmax attention, out = A V with A = softmax(Q K^T / sqrt(d) + causal mask),
or twicing attention (Abdullaev & Nguyen, "Transformer Meets Twicing: Harnessing Unattended
Residual Information", ICLR 2025, arXiv 2503.00687), which applies Tukey's twicing to the smoother A:

    out = (2A - A^2) V = A (2V - A V).

The right-hand form is two ordinary attention passes with the same A, U = attn(Q, K, V) and
out = attn(Q, K, 2V - U), so it runs on `scaled_dot_product_attention` and never forms A^2.

Generation: `model.generate(...)` works through `GenerationMixin` without a key/value cache: every
step recomputes the last `block_size` tokens (the window slides once the context is full). A 0/1
`attention_mask` (e.g. left padding in a batch) is honoured.

Self-contained: needs torch and transformers (5.x), nothing from the training code.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutput

from .configuration_twicing_gpt import TwicingGPTConfig

# Each layout's names for the model's parts; the modules in a block follow in this order.
LAYOUTS = {
    "gpt2": dict(
        body="transformer", tokens="wte", positions="wpe", blocks="h", final_norm="ln_f", block=("ln_1", "attn", "ln_2")
    ),
    "llama": dict(
        body="model",
        tokens="embed_tokens",
        positions="embed_positions",
        blocks="layers",
        final_norm="norm",
        block=("input_layernorm", "self_attn", "post_attention_layernorm"),
    ),
}


def rotary_cos_sin(position_ids, head_dim: int, theta: float):
    """cos and sin (batch, 1, time, head_dim) in fp32 of the angles position * theta^(-2i / head_dim),
    each half repeated: Llama's feature order, which pairs feature i with i + head_dim / 2."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=position_ids.device).float() / head_dim
    inverse_frequencies = 1.0 / (theta**exponents)
    angles = position_ids.float()[..., None] * inverse_frequencies
    angles = torch.cat([angles, angles], dim=-1)[:, None]
    return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin):
    first, second = x.chunk(2, dim=-1)
    return x * cos.to(x.dtype) + torch.cat([-second, first], dim=-1) * sin.to(x.dtype)


def attend(q, k, v, mask, twicing: bool):
    """Causal attention of q (batch, heads, time, head_dim) over k, v of the same or fewer (kv) heads;
    `mask` is None (plain causal) or a boolean (batch, 1, time, time) tensor, True where a query may
    attend to a key."""
    group = q.size(1) // k.size(1)
    if group > 1:
        # Query head h reads kv head h // group. Twicing's second values 2V - U are per query head
        # anyway, so both passes simply see the kv heads repeated (an inference-time copy).
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    causal = mask is None
    u = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    if not twicing:
        return u
    # (2A - A^2) V = A (2V - A V): the second pass smooths the residual V - AV once more.
    return F.scaled_dot_product_attention(q, k, 2 * v - u, attn_mask=mask, is_causal=causal)


class TwicingGPTAttention(nn.Module):
    """n_head query heads over n_kv_head key/value heads. GPT-2's layout projects them in one c_attn
    (rows: queries, then keys, then values) and outputs through c_proj; Llama's has q_proj, k_proj,
    v_proj and o_proj."""

    def __init__(self, config: TwicingGPTConfig, layer_idx: int):
        super().__init__()
        self.head_dim = config.head_dim
        self.twicing = config.layer_attention[layer_idx] == "twicing"
        self.gpt2 = config.arch == "gpt2"
        q_dim, kv_dim = config.n_head * self.head_dim, config.n_kv_head * self.head_dim
        self.split = [q_dim, kv_dim, kv_dim]
        if self.gpt2:
            self.c_attn = nn.Linear(config.n_embd, q_dim + 2 * kv_dim, bias=config.bias)
            self.c_proj = nn.Linear(q_dim, config.n_embd, bias=config.bias)
        else:
            self.q_proj = nn.Linear(config.n_embd, q_dim, bias=config.bias)
            self.k_proj = nn.Linear(config.n_embd, kv_dim, bias=config.bias)
            self.v_proj = nn.Linear(config.n_embd, kv_dim, bias=config.bias)
            self.o_proj = nn.Linear(q_dim, config.n_embd, bias=config.bias)

    def forward(self, x, mask, rotary):
        b, t, _ = x.shape
        if self.gpt2:
            parts = self.c_attn(x).split(self.split, dim=-1)
        else:
            parts = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q, k, v = (part.view(b, t, -1, self.head_dim).transpose(1, 2) for part in parts)
        if rotary is not None:  # q and k rotated once: both of twicing's passes use this one A
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        y = attend(q, k, v, mask, self.twicing).transpose(1, 2).reshape(b, t, self.split[0])
        return self.c_proj(y) if self.gpt2 else self.o_proj(y)


class TwicingGPTMLP(nn.Module):
    """GELU (tanh) or SwiGLU. GPT-2's layout: c_fc, whose rows under SwiGLU are the gate's then the up
    projection's, and c_proj; Llama's: gate_proj (SwiGLU only), up_proj, down_proj."""

    def __init__(self, config: TwicingGPTConfig):
        super().__init__()
        self.swiglu = config.mlp == "swiglu"
        self.gpt2 = config.arch == "gpt2"
        if self.gpt2:
            self.c_fc = nn.Linear(config.n_embd, (2 if self.swiglu else 1) * config.d_ff, bias=config.bias)
            self.c_proj = nn.Linear(config.d_ff, config.n_embd, bias=config.bias)
        else:
            if self.swiglu:
                self.gate_proj = nn.Linear(config.n_embd, config.d_ff, bias=config.bias)
            self.up_proj = nn.Linear(config.n_embd, config.d_ff, bias=config.bias)
            self.down_proj = nn.Linear(config.d_ff, config.n_embd, bias=config.bias)

    def forward(self, x):
        if self.gpt2:
            h = self.c_fc(x)
            gate, h = h.chunk(2, dim=-1) if self.swiglu else (None, h)
        else:
            gate, h = self.gate_proj(x) if self.swiglu else None, self.up_proj(x)
        # GPT-2's GELU is the tanh approximation ("gelu_new" in transformers).
        h = F.silu(gate) * h if self.swiglu else F.gelu(h, approximate="tanh")
        return self.c_proj(h) if self.gpt2 else self.down_proj(h)


def make_norm(config: TwicingGPTConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd, eps=config.layer_norm_epsilon)
    return nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)


class TwicingGPTBlock(nn.Module):
    """A pre-norm block: x + attn(norm(x)), then + mlp(norm(x)), its parts named as the layout names them."""

    def __init__(self, config: TwicingGPTConfig, layer_idx: int):
        super().__init__()
        self.names = LAYOUTS[config.arch]["block"]
        first_norm, attention, second_norm = self.names
        setattr(self, first_norm, make_norm(config))
        setattr(self, attention, TwicingGPTAttention(config, layer_idx))
        setattr(self, second_norm, make_norm(config))
        self.mlp = TwicingGPTMLP(config)

    def forward(self, x, mask, rotary):
        first_norm, attention, second_norm = (getattr(self, name) for name in self.names)
        x = x + attention(first_norm(x), mask, rotary)
        return x + self.mlp(second_norm(x))


class TwicingGPTPreTrainedModel(PreTrainedModel):
    config_class = TwicingGPTConfig
    base_model_prefix = "transformer"  # GPT-2's; Llama's layout names its body "model" (see __init__)
    _no_split_modules = ["TwicingGPTBlock"]

    def __init__(self, config: TwicingGPTConfig, *inputs, **kwargs):
        super().__init__(config, *inputs, **kwargs)
        # transformers reads the instance's prefix when it matches checkpoint names to the model's.
        self.base_model_prefix = LAYOUTS[config.arch]["body"]


class TwicingGPTModel(TwicingGPTPreTrainedModel):
    """The decoder stack without the output projection: token ids -> final hidden states."""

    def __init__(self, config: TwicingGPTConfig):
        super().__init__(config)
        self.layout = LAYOUTS[config.arch]
        self._input_embed_layer = self.layout["tokens"]  # get_input_embeddings looks it up by this name
        setattr(self, self.layout["tokens"], nn.Embedding(config.vocab_size, config.n_embd))
        if config.position == "learned":
            setattr(self, self.layout["positions"], nn.Embedding(config.block_size, config.n_embd))
        blocks = nn.ModuleList(TwicingGPTBlock(config, i) for i in range(config.n_layer))
        setattr(self, self.layout["blocks"], blocks)
        setattr(self, self.layout["final_norm"], make_norm(config))
        self.post_init()

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kwargs) -> BaseModelOutput:
        t = input_ids.size(1)
        if t > self.config.block_size:
            raise ValueError(f"sequence of {t} tokens is longer than the context ({self.config.block_size})")
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            keep = attention_mask.bool()
            causal = torch.ones(t, t, dtype=torch.bool, device=input_ids.device).tril()
            # A padded query would see no key at all (NaN); let every query see itself.
            mask = (causal & keep[:, None, None, :]) | torch.eye(t, dtype=torch.bool, device=input_ids.device)
            if position_ids is None:  # left padding: the first real token gets position 0
                position_ids = (keep.long().cumsum(-1) - 1).clamp(min=0)
        if position_ids is None:
            position_ids = torch.arange(t, device=input_ids.device)[None]
        x = self.get_input_embeddings()(input_ids)
        rotary = None
        if self.config.position == "learned":
            x = x + getattr(self, self.layout["positions"])(position_ids)
        else:  # computed, not a buffer: the same for every layer, and nothing to load
            rotary = rotary_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta)
        for block in getattr(self, self.layout["blocks"]):
            x = block(x, mask, rotary)
        return BaseModelOutput(last_hidden_state=getattr(self, self.layout["final_norm"])(x))


class TwicingGPTForCausalLM(TwicingGPTPreTrainedModel, GenerationMixin):
    """TwicingGPTModel with the output projection (tied to the token embedding or its own) and the LM loss."""

    def __init__(self, config: TwicingGPTConfig):
        super().__init__(config)
        layout = LAYOUTS[config.arch]
        if config.tie_word_embeddings:
            self._tied_weights_keys = {"lm_head.weight": f"{layout['body']}.{layout['tokens']}.weight"}
        setattr(self, layout["body"], TwicingGPTModel(config))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.base_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.base_model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def forward(self, input_ids, attention_mask=None, position_ids=None, labels=None, **kwargs) -> CausalLMOutput:
        """Logits (batch, time, vocab); with `labels` also the mean next-token cross-entropy.

        As in transformers, labels are shifted inside: pass labels = input_ids; -100 is ignored.
        Cache-related arguments from `generate` (cache, use_cache, ...) are accepted and ignored.
        """
        hidden = self.base_model(input_ids, attention_mask=attention_mask, position_ids=position_ids)
        logits = self.lm_head(hidden.last_hidden_state)
        loss = None
        if labels is not None:
            shifted = logits[:, :-1].float().flatten(0, 1)
            loss = F.cross_entropy(shifted, labels[:, 1:].flatten().to(logits.device), ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        """No cache: feed the whole sequence, cropped to the last block_size tokens, every step."""
        block = self.config.block_size
        inputs = {"input_ids": input_ids[:, -block:]}
        if attention_mask is not None:
            inputs["attention_mask"] = attention_mask[:, -block:]
        return inputs


__all__ = ["TwicingGPTForCausalLM", "TwicingGPTModel", "TwicingGPTPreTrainedModel"]
