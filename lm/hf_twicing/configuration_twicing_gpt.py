"""Configuration of a decoder-only language model with twicing attention, for Hugging Face `transformers`.

Written by `lm.hf_export` next to the weights (with the modeling files) and loaded with
`AutoConfig.from_pretrained(dir, trust_remote_code=True)`. This file is self-contained: it needs
`transformers` (5.x) and nothing from the training code.

Twicing attention: Abdullaev & Nguyen, "Transformer Meets Twicing: Harnessing Unattended Residual
Information", ICLR 2025 (arXiv 2503.00687).
"""

from transformers import PreTrainedConfig

ATTENTION_KINDS = ("softmax", "twicing")
# The choices of each option; the first is GPT-2's, the default, so configs written before these
# options existed (GPT-2 layout, learned positions, LayerNorm, GELU) load unchanged.
CHOICES = {
    "arch": ("gpt2", "llama"),
    "position": ("learned", "rope"),
    "norm": ("layernorm", "rmsnorm"),
    "mlp": ("gelu", "swiglu"),
}


class TwicingGPTConfig(PreTrainedConfig):
    """A pre-norm decoder whose layers each use softmax or twicing attention.

    `layer_attention` names the attention of every layer, e.g. ["softmax", "softmax", "twicing"];
    its length is `n_layer`. `arch` is the parameter layout: GPT-2's names (`transformer.h.{i}.attn.
    c_attn`, ...) or Llama's (`model.layers.{i}.self_attn.q_proj`, ...). The options compute the
    same in either layout: `position` learned embeddings or rotary ("rope", base `rope_theta`),
    `norm` LayerNorm or RMSNorm (eps `layer_norm_epsilon`), `mlp` tanh-GELU or SiLU-gated
    ("swiglu"), `n_kv_head` key/value heads (grouped-query attention; None is n_head), `bias` in
    the linear layers and LayerNorms, and `tie_word_embeddings` (alias `tie_embeddings`) whether
    the output projection is the token embedding. `d_ff` is the MLP width.
    """

    model_type = "twicing_gpt"
    attribute_map = {
        "hidden_size": "n_embd",
        "num_hidden_layers": "n_layer",
        "num_attention_heads": "n_head",
        "num_key_value_heads": "n_kv_head",
        "max_position_embeddings": "block_size",
        "intermediate_size": "d_ff",
        "tie_embeddings": "tie_word_embeddings",  # the training config's name
    }

    vocab_size: int = 50257
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None
    n_embd: int = 768
    d_ff: int | None = None
    arch: str = "gpt2"
    position: str = "learned"
    rope_theta: float = 10000.0
    norm: str = "layernorm"
    mlp: str = "gelu"
    bias: bool = True
    layer_norm_epsilon: float = 1e-5
    layer_attention: list[str] | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    tie_word_embeddings: bool = True
    use_cache: bool = False  # no key/value cache: every step recomputes the whole window

    def __post_init__(self, **kwargs):
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.d_ff is None:  # as the training config: SwiGLU keeps GPT-2's weight count, rounded to 64
            self.d_ff = -(-8 * self.n_embd // (3 * 64)) * 64 if self.mlp == "swiglu" else 4 * self.n_embd
        if self.layer_attention is None:
            self.layer_attention = ["softmax"] * self.n_layer
        self.layer_attention = list(self.layer_attention)
        if len(self.layer_attention) != self.n_layer:
            raise ValueError(f"layer_attention names {len(self.layer_attention)} layers, n_layer is {self.n_layer}")
        unknown = sorted(set(self.layer_attention) - set(ATTENTION_KINDS))
        if unknown:
            raise ValueError(f"unknown attention {unknown[0]!r} in layer_attention; choose from {ATTENTION_KINDS}")
        for name, choices in CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; choose from {choices}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head ({self.n_head}) must be divisible by n_kv_head ({self.n_kv_head})")
        if self.position == "rope" and self.head_dim % 2:
            raise ValueError(f"rotary positions rotate feature pairs: the head size ({self.head_dim}) must be even")
        super().__post_init__(**kwargs)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


__all__ = ["TwicingGPTConfig"]
