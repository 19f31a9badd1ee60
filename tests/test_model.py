"""Specification of the GPT model in lm.model.

A softmax model is GPT-2 (same parameter names, shapes and function as Hugging Face's
GPT2LMHeadModel); twicing layers change only the attention; the whole model is causal.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import relative_error
from lm.attention import ATTENTION
from lm.config import ModelConfig
from lm.model import GPT, CrossEntropy
from lm.parallel import ParallelGroups, shard_model
from lm.parallel.layers import VocabParallelCrossEntropy

SMALL = dict(vocab_size=97, block_size=16, n_layer=3, n_head=4, n_embd=32, d_ff=48)

# GPT-2 stores these as Conv1D weights, (in, out): the transpose of our nn.Linear (out, in).
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def small_config(**overrides) -> ModelConfig:
    return ModelConfig(**{**SMALL, **overrides})


def make_model(seed=0, perturb=0.0, **overrides) -> GPT:
    """A float64 model in eval mode. `perturb` adds noise to every parameter, so that LayerNorm
    gains and biases are not their trivial 1 and 0 and a mix-up of any of them would show."""
    torch.manual_seed(seed)
    model = GPT(small_config(**overrides)).double().eval()
    if perturb:
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(perturb * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def tokens(batch=2, t=16, seed=0) -> torch.Tensor:
    return torch.randint(0, SMALL["vocab_size"], (batch, t), generator=torch.Generator().manual_seed(seed))


def logits_of(model, idx) -> torch.Tensor:
    with torch.no_grad():
        return model(idx)[0]


# --------------------------------------------------------------------------- GPT-2 compatibility


def hf_gpt2():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=SMALL["vocab_size"],
        n_positions=SMALL["block_size"],
        n_embd=SMALL["n_embd"],
        n_layer=SMALL["n_layer"],
        n_head=SMALL["n_head"],
        n_inner=SMALL["d_ff"],
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        layer_norm_epsilon=1e-5,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config).double().eval()


def hf_parameter_state(hf) -> dict:
    """HF's state_dict without buffers that are not parameters (`attn.bias`, `masked_bias` in some versions)."""
    parameters = {name for name, _ in hf.named_parameters(remove_duplicate=False)}
    return {k: v for k, v in hf.state_dict().items() if k in parameters}


def to_gpt2_state(model: GPT) -> dict:
    return {k: (v.t() if k.endswith(CONV1D_WEIGHTS) else v) for k, v in model.state_dict().items()}


def test_state_dict_holds_only_parameters():
    model = make_model()
    assert set(model.state_dict()) == {name for name, _ in model.named_parameters(remove_duplicate=False)}


def test_parameter_names_and_shapes_map_one_to_one_onto_gpt2():
    ours, theirs = make_model().state_dict(), hf_parameter_state(hf_gpt2())
    assert set(ours) == set(theirs)
    for name, tensor in ours.items():
        if name.endswith(CONV1D_WEIGHTS):
            assert tensor.dim() == 2
            assert tensor.t().shape == theirs[name].shape, name
        else:
            assert tensor.shape == theirs[name].shape, name


def test_softmax_model_exports_to_gpt2_with_identical_logits():
    model = make_model(perturb=0.1)
    hf = hf_gpt2()
    missing, unexpected = hf.load_state_dict(to_gpt2_state(model), strict=False)
    assert not unexpected
    assert set(missing).isdisjoint(hf_parameter_state(hf))  # at most non-parameter buffers
    assert hf.lm_head.weight is hf.transformer.wte.weight
    idx = tokens()
    ours = logits_of(model, idx)
    with torch.no_grad():
        theirs = hf(input_ids=idx).logits
    assert ours.shape == theirs.shape == (2, 16, SMALL["vocab_size"])
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)


def test_twicing_model_is_not_gpt2():
    """The export check above is not vacuous: twicing attention computes something else."""
    model = make_model(perturb=0.1, twicing_layers="last:1")
    hf = hf_gpt2()
    hf.load_state_dict(to_gpt2_state(model), strict=False)
    idx = tokens()
    with torch.no_grad():
        theirs = hf(input_ids=idx).logits
    assert relative_error(logits_of(model, idx), theirs) > 1e-3


# --------------------------------------------------------------------------- weight tying


def test_output_embedding_is_tied_to_the_token_embedding():
    model = make_model()
    assert model.lm_head.weight is model.transformer.wte.weight


def test_num_parameters_counts_the_tied_embedding_once():
    v, t, c, f, n = (SMALL[k] for k in ("vocab_size", "block_size", "n_embd", "d_ff", "n_layer"))
    per_block = 2 * 2 * c + (c * 3 * c + 3 * c) + (c * c + c) + (c * f + f) + (f * c + c)
    expected = v * c + t * c + n * per_block + 2 * c
    model = make_model()
    assert model.num_parameters() == expected
    assert model.num_parameters(exclude_position_embedding=True) == expected - t * c


# --------------------------------------------------------------------------- attention implementations


@pytest.mark.parametrize("twicing_layers", ["all", "last:1", "none"])
def test_fused_attention_gives_the_same_logits_as_the_reference(twicing_layers):
    fused = make_model(perturb=0.1, twicing_layers=twicing_layers, attention_impl="fused")
    reference = GPT(small_config(twicing_layers=twicing_layers, attention_impl="reference")).double().eval()
    reference.load_state_dict(fused.state_dict())
    names = [block.attn.variant.name for block in reference.transformer.h]
    assert names == [f"{name}_reference" for name in fused.config.layer_attention()]
    idx = tokens()
    assert relative_error(logits_of(fused, idx), logits_of(reference, idx)) <= 1e-10


def test_layers_use_the_attention_the_config_selects():
    model = make_model(twicing_layers=[0, 2])
    assert [block.attn.variant.name for block in model.transformer.h] == ["twicing", "softmax", "twicing"]


@pytest.mark.parametrize("attention_impl", ["fused", "triton", "sdpa", "reference"])
def test_each_layer_holds_the_registered_variant_it_runs(attention_impl):
    model = make_model(twicing_layers="last:1", attention_impl=attention_impl)
    variants = [block.attn.variant for block in model.transformer.h]
    assert variants == [ATTENTION[name] for name in model.config.layer_attention()]
    assert [variant.twices for variant in variants] == [False, False, True]


# --------------------------------------------------------------------------- causality


@pytest.mark.parametrize("twicing_layers", ["none", "all", "last:1"])
@pytest.mark.parametrize("t", [1, 7, 15])
def test_logits_before_t_do_not_depend_on_tokens_from_t_on(twicing_layers, t):
    model = make_model(perturb=0.1, twicing_layers=twicing_layers)
    idx = tokens()
    changed = idx.clone()
    changed[:, t:] = (idx[:, t:] + 1 + tokens(t=16 - t, seed=1) % 50) % SMALL["vocab_size"]
    before, after = logits_of(model, idx), logits_of(model, changed)
    torch.testing.assert_close(after[:, :t], before[:, :t], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(after[:, t:], before[:, t:])  # the change is seen where it may be


@pytest.mark.parametrize("twicing_layers", ["none", "all"])
def test_a_prefix_gets_the_same_logits_alone_as_inside_the_full_sequence(twicing_layers):
    model = make_model(perturb=0.1, twicing_layers=twicing_layers)
    idx = tokens()
    torch.testing.assert_close(logits_of(model, idx[:, :5]), logits_of(model, idx)[:, :5], rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- loss and input length


def test_loss_is_the_mean_cross_entropy_of_the_logits():
    torch.manual_seed(0)
    model = GPT(small_config(twicing_layers="last:1")).eval()
    idx, targets = tokens(seed=2), tokens(seed=3)
    logits, loss = model(idx, targets)
    assert loss.dim() == 0
    expected = F.cross_entropy(logits.reshape(-1, SMALL["vocab_size"]), targets.reshape(-1))
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)


def test_the_loss_is_a_parameter_free_submodule_in_at_least_fp32():
    model = make_model()
    assert isinstance(model.loss, CrossEntropy) and dict(model.named_children())["loss"] is model.loss
    assert not list(model.loss.parameters()) and not list(model.loss.buffers())
    logits, targets = torch.randn(2, 5, 7, dtype=torch.bfloat16), tokens(t=5) % 7
    flat = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    assert model.loss(logits, targets).dtype == torch.float32  # bf16 logits, fp32 loss
    torch.testing.assert_close(model.loss(logits, targets, "none"), flat.view(2, 5))
    torch.testing.assert_close(model.loss(logits, targets, "sum"), flat.sum())
    torch.testing.assert_close(model.loss(logits, targets), flat.mean())


@pytest.mark.parametrize("tp_rank", [0, 1])
def test_tensor_parallelism_gives_the_model_its_loss_as_a_submodule_and_keeps_the_state_dict_keys(tp_rank):
    """shard_model swaps `loss` as it swaps the layers; nothing is assigned onto the instance.

    Building the slices issues no collectives, so one process can check the structure; the slow
    tests in test_tensor_parallel.py check what the sharded model computes.
    """
    full = make_model(vocab_size=96)  # TP splits the vocabulary evenly
    groups = ParallelGroups(tp_size=2, tp_rank=tp_rank, tp_group=None, dp_size=1, dp_rank=0, dp_group=None)
    sharded = shard_model(make_model(vocab_size=96), groups)
    assert isinstance(sharded.loss, VocabParallelCrossEntropy) and sharded.loss.vocab_start == tp_rank * 48
    assert dict(sharded.named_children())["loss"] is sharded.loss
    assert not {"loss", "cross_entropy"} & set(vars(sharded))  # a module, not an instance attribute
    assert list(sharded.state_dict()) == list(full.state_dict())  # checkpoints and HF export read these names

    logits, loss = make_model()(tokens())
    assert loss is None and logits.shape == (2, 16, SMALL["vocab_size"])


def test_fresh_model_predicts_nearly_uniformly():
    torch.manual_seed(0)
    _, loss = GPT(small_config()).eval()(tokens(), tokens(seed=1))
    assert abs(loss.item() - math.log(SMALL["vocab_size"])) < 0.05


def test_sequence_longer_than_block_size_is_a_value_error():
    model = make_model()
    model(tokens(t=16))  # exactly block_size is fine
    with pytest.raises(ValueError, match=r"17 tokens .*\(16\)"):
        model(tokens(t=17))


# --------------------------------------------------------------------------- initialisation


@pytest.mark.parametrize("init_std", [0.02, 0.01])
def test_init_scales_residual_projections_by_one_over_sqrt_two_n_layer(init_std):
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=256, block_size=8, n_layer=8, n_head=4, n_embd=256, d_ff=1024, init_std=init_std)
    model = GPT(config)
    residual_std = init_std / math.sqrt(2 * config.n_layer)
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight"):
            assert p.std().item() == pytest.approx(residual_std, rel=0.05), name
        elif p.dim() == 2:  # c_attn, c_fc, the embeddings
            assert p.std().item() == pytest.approx(init_std, rel=0.05), name
        if p.dim() == 2:
            assert abs(p.mean().item()) < init_std / 10, name


def test_init_zeroes_biases_and_sets_layernorm_to_identity():
    model = GPT(small_config())
    for name, p in model.named_parameters():
        if name.endswith(".bias"):
            assert torch.all(p == 0), name
        elif ".ln_" in name or name.startswith("transformer.ln_f"):
            assert torch.all(p == 1), name


# --------------------------------------------------------------------------- FLOPs


def test_flops_per_token_of_a_softmax_model():
    """3 x (2 FLOPs per matmul parameter, wpe excluded, tied embedding once, plus per layer one
    causal attention pass: QK^T and AV over block_size keys, halved for the mask = 2 T C)."""
    model = make_model()
    n, t, c = SMALL["n_layer"], SMALL["block_size"], SMALL["n_embd"]
    assert model.flops_per_token() == 3 * (2 * model.num_parameters(exclude_position_embedding=True) + n * 2 * t * c)


@pytest.mark.parametrize("twicing_layers, twiced", [("all", 3), ("last:1", 1), ([0, 2], 2)])
@pytest.mark.parametrize("attention_impl", ["fused", "triton", "sdpa", "reference"])
def test_twicing_adds_exactly_one_attention_pass_per_twicing_layer(twicing_layers, twiced, attention_impl):
    """Twicing's second pass attn(Q, K, 2V - U) costs one more QK^T and AV: 3 x 2 T C per layer."""
    t, c = SMALL["block_size"], SMALL["n_embd"]
    softmax = make_model(attention_impl=attention_impl)
    twicing = make_model(twicing_layers=twicing_layers, attention_impl=attention_impl)
    assert twicing.num_parameters() == softmax.num_parameters()
    assert twicing.flops_per_token() - softmax.flops_per_token() == twiced * 3 * 2 * t * c


# --------------------------------------------------------------------------- optimizer groups


@pytest.mark.parametrize("bias", [True, False])
def test_optimizer_groups_decay_matrices_only_and_partition_the_parameters(bias):
    model = GPT(small_config(bias=bias))
    decay, no_decay = model.optimizer_groups(weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    decayed = {id(p) for p in decay["params"]}
    not_decayed = {id(p) for p in no_decay["params"]}
    all_ids = [id(p) for p in decay["params"] + no_decay["params"]]
    assert len(all_ids) == len(set(all_ids)) == len(list(model.parameters()))  # each exactly once
    assert set(all_ids) == {id(p) for p in model.parameters()}
    for name, p in model.named_parameters():
        is_matrix = name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight", "wte.weight", "wpe.weight"))
        assert (id(p) in decayed) == is_matrix, name
        assert (id(p) in not_decayed) == (not is_matrix), name
    torch.optim.AdamW(model.optimizer_groups(0.1), lr=1e-3)  # refuses a parameter in two groups


# --------------------------------------------------------------------------- the Llama layout

LLAMA = dict(arch="llama", vocab_size=97, block_size=16, n_layer=2, n_head=8, n_kv_head=2, n_embd=32, d_ff=48)


def test_the_llama_layout_is_hugging_faces_llama_name_for_name_and_logit_for_logit():
    """RoPE (rotate_half order), RMSNorm, SwiGLU and grouped-query attention as transformers computes them."""
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=16,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    model = GPT(ModelConfig(**LLAMA)).eval()
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in hf.state_dict().items()}
    model.load_state_dict(hf.state_dict())
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model(ids)[0] - hf(ids).logits).abs().max() <= 1e-5


@pytest.mark.parametrize("tied", [True, False])
def test_flops_count_every_matmul_weight_and_not_an_untied_embedding_lookup(tied):
    """Grouped-query attention and SwiGLU show up through the weights; attention costs n_head heads."""
    model = GPT(ModelConfig(**LLAMA, tie_embeddings=tied))
    c = model.config
    lookups = 0 if tied else c.vocab_size * c.n_embd
    attention = c.n_layer * 2 * c.block_size * c.n_embd
    assert model.flops_per_token() == 3 * (2 * (model.num_parameters() - lookups) + attention)
    kv = 2 * c.n_embd * c.n_kv_head * c.head_dim
    assert model.num_parameters() == (
        c.vocab_size * c.n_embd * (1 if tied else 2)
        + c.n_layer * (2 * c.n_embd * c.n_embd + kv + 3 * c.n_embd * c.ffn_dim + 2 * c.n_embd)
        + c.n_embd
    )


def test_llama_norm_gains_are_not_decayed_and_start_at_one():
    from lm.initialization import initialize

    model = GPT(ModelConfig(**LLAMA))
    initialize(model, model.config, seed=1)
    _, no_decay = model.optimizer_groups(0.1)
    names = {name for name, p in model.named_parameters() if any(p is q for q in no_decay["params"])}
    assert names == {
        f"model.layers.{i}.{n}.weight" for i in range(2) for n in ("input_layernorm", "post_attention_layernorm")
    } | {"model.norm.weight"}
    assert all(torch.equal(p, torch.ones_like(p)) for p in no_decay["params"])
    # the projections that write into the residual stream start smaller, as in GPT-2
    std = model.model.layers[0].mlp.down_proj.weight.std().item()
    assert std == pytest.approx(0.02 / math.sqrt(4), rel=0.2)


def test_swiglu_in_gpt2s_layout_gates_with_the_first_half_of_c_fc():
    model = GPT(small_config(mlp="swiglu")).double()
    mlp, x = model.transformer.h[0].mlp, torch.randn(2, 5, 32, dtype=torch.float64)
    gate, up = F.linear(x, mlp.c_fc.weight, mlp.c_fc.bias).chunk(2, dim=-1)
    expected = F.linear(F.silu(gate) * up, mlp.c_proj.weight, mlp.c_proj.bias)
    assert relative_error(mlp(x), expected) <= 1e-12
