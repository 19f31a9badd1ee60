"""Configuration of a GPT-2 style language model with twicing attention, for Hugging Face `transformers`.

Written by `lm.hf_export` next to the weights (with `modeling_twicing_gpt.py`) and loaded with
`AutoConfig.from_pretrained(dir, trust_remote_code=True)`. This file is self-contained: it needs
`transformers` (5.x) and nothing from the training code.

Twicing attention: Abdullaev & Nguyen, "Transformer Meets Twicing: Harnessing Unattended Residual
Information", ICLR 2025 (arXiv 2503.00687).
"""

from transformers import PreTrainedConfig

ATTENTION_KINDS = ("softmax", "twicing")


class TwicingGPTConfig(PreTrainedConfig):
    """A GPT-2 decoder whose layers each use softmax or twicing attention.

    `layer_attention` names the attention of every layer, e.g. ["softmax", "softmax", "twicing"];
    its length is `n_layer`. `d_ff` is the MLP width (GPT-2's 4 * n_embd unless chosen otherwise),
    `bias` whether the linear layers and LayerNorms have biases. The output projection is tied to
    the token embedding, as in GPT-2.
    """

    model_type = "twicing_gpt"
    attribute_map = {
        "hidden_size": "n_embd",
        "num_hidden_layers": "n_layer",
        "num_attention_heads": "n_head",
        "max_position_embeddings": "block_size",
        "intermediate_size": "d_ff",
    }

    vocab_size: int = 50257
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    d_ff: int | None = None
    bias: bool = True
    layer_norm_epsilon: float = 1e-5
    layer_attention: list[str] | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    tie_word_embeddings: bool = True
    use_cache: bool = False  # no key/value cache: every step recomputes the whole window

    def __post_init__(self, **kwargs):
        if self.d_ff is None:
            self.d_ff = 4 * self.n_embd
        if self.layer_attention is None:
            self.layer_attention = ["softmax"] * self.n_layer
        self.layer_attention = list(self.layer_attention)
        if len(self.layer_attention) != self.n_layer:
            raise ValueError(f"layer_attention names {len(self.layer_attention)} layers, n_layer is {self.n_layer}")
        unknown = sorted(set(self.layer_attention) - set(ATTENTION_KINDS))
        if unknown:
            raise ValueError(f"unknown attention {unknown[0]!r} in layer_attention; choose from {ATTENTION_KINDS}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        super().__post_init__(**kwargs)


__all__ = ["TwicingGPTConfig"]
