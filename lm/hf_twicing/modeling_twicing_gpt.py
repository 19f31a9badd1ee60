"""A GPT-2 style causal language model with twicing attention, for Hugging Face `transformers`.

Written by `lm.hf_export` next to the weights and loaded with

    AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)

The architecture is GPT-2's: learned token and position embeddings, pre-LayerNorm blocks of causal
self-attention and a GELU (tanh) MLP, a final LayerNorm and an output projection tied to the token
embedding. Parameter names are GPT-2's (`transformer.h.0.attn.c_attn.weight`, ...), but the layers
are `nn.Linear`, so matrices are stored (out, in) rather than as GPT-2's transposed Conv1D.

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


def attend(q, k, v, mask, twicing: bool):
    """Causal attention of (batch, heads, time, head_dim) tensors; `mask` is None (plain causal) or a
    boolean (batch, 1, time, time) tensor, True where a query may attend to a key."""
    causal = mask is None
    u = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    if not twicing:
        return u
    # (2A - A^2) V = A (2V - A V): the second pass smooths the residual V - AV once more.
    return F.scaled_dot_product_attention(q, k, 2 * v - u, attn_mask=mask, is_causal=causal)


class TwicingGPTAttention(nn.Module):
    def __init__(self, config: TwicingGPTConfig, layer_idx: int):
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.twicing = config.layer_attention[layer_idx] == "twicing"
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x, mask):
        b, t, _ = x.shape
        q, k, v = self.c_attn(x).view(b, t, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)
        y = attend(q, k, v, mask, self.twicing)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, self.n_head * self.head_dim))


class TwicingGPTMLP(nn.Module):
    def __init__(self, config: TwicingGPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.d_ff, bias=config.bias)
        self.c_proj = nn.Linear(config.d_ff, config.n_embd, bias=config.bias)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class TwicingGPTBlock(nn.Module):
    def __init__(self, config: TwicingGPTConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.attn = TwicingGPTAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.mlp = TwicingGPTMLP(config)

    def forward(self, x, mask):
        x = x + self.attn(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))


class TwicingGPTPreTrainedModel(PreTrainedModel):
    config_class = TwicingGPTConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["TwicingGPTBlock"]


class TwicingGPTModel(TwicingGPTPreTrainedModel):
    """The decoder stack without the output projection: token ids -> final hidden states."""

    _input_embed_layer = "wte"

    def __init__(self, config: TwicingGPTConfig):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.h = nn.ModuleList(TwicingGPTBlock(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
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
        x = self.wte(input_ids) + self.wpe(position_ids)
        for block in self.h:
            x = block(x, mask)
        return BaseModelOutput(last_hidden_state=self.ln_f(x))


class TwicingGPTForCausalLM(TwicingGPTPreTrainedModel, GenerationMixin):
    """TwicingGPTModel with the output projection (tied to the token embedding) and the LM loss."""

    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config: TwicingGPTConfig):
        super().__init__(config)
        self.transformer = TwicingGPTModel(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def forward(self, input_ids, attention_mask=None, position_ids=None, labels=None, **kwargs) -> CausalLMOutput:
        """Logits (batch, time, vocab); with `labels` also the mean next-token cross-entropy.

        As in transformers, labels are shifted inside: pass labels = input_ids; -100 is ignored.
        Cache-related arguments from `generate` (cache, use_cache, ...) are accepted and ignored.
        """
        hidden = self.transformer(input_ids, attention_mask=attention_mask, position_ids=position_ids)
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
