"""Specification of sharded initialisation: each rank draws only its own slice of the model, one
parameter at a time, and every tensor-parallel layout starts as the exact slice of the TP = 1 model."""

import pytest
import torch

from lm.config import ModelConfig
from lm.initialization import initial_value, initialize, parameter_seed
from lm.model import GPT
from lm.parallel import ParallelGroups, merge_state_dicts, shard_model
from tensor_probes import LargestTensorSeen

CONFIG = ModelConfig(vocab_size=96, block_size=16, n_layer=2, n_head=4, n_embd=32, d_ff=128, twicing_layers="last:1")
SEED = 7


def tp_slice(tp: int, rank: int) -> GPT:
    """TP rank `rank`'s model as lm.train builds it: on the meta device, sliced, then materialised."""
    with torch.device("meta"):
        model = GPT(CONFIG)
    model = shard_model(model, ParallelGroups(tp, rank, None, 1, 0, None))  # building slices needs no group
    initialize(model, CONFIG, SEED)
    return model


def test_the_weights_follow_gpt2s_initialisation():
    model = tp_slice(1, 0)
    weights = dict(model.named_parameters())
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied after materialising
    for name, w in weights.items():
        if name.endswith(".bias"):
            assert torch.all(w == 0), name
        elif ".ln_" in name:
            assert torch.all(w == 1), name
        else:
            expected = (
                CONFIG.init_std / (2 * CONFIG.n_layer) ** 0.5 if name.endswith("c_proj.weight") else CONFIG.init_std
            )
            assert w.std().item() == pytest.approx(expected, rel=0.2), name


def test_each_parameter_has_a_stream_of_its_own():
    first = initial_value("transformer.h.0.attn.c_attn.weight", torch.Size([96, 32]), CONFIG, SEED)
    assert torch.equal(first, initial_value("transformer.h.0.attn.c_attn.weight", torch.Size([96, 32]), CONFIG, SEED))
    assert not torch.equal(
        first, initial_value("transformer.h.1.attn.c_attn.weight", torch.Size([96, 32]), CONFIG, SEED)
    )
    assert not torch.equal(
        first, initial_value("transformer.h.0.attn.c_attn.weight", torch.Size([96, 32]), CONFIG, SEED + 1)
    )
    assert parameter_seed(SEED, "x") == parameter_seed(SEED, "x") != parameter_seed(SEED, "y")


@pytest.mark.parametrize("tp", [2, 4])
def test_every_tensor_parallel_layout_starts_as_the_exact_slice_of_the_tp1_model(tp):
    whole = {k: v for k, v in tp_slice(1, 0).state_dict().items()}
    merged = merge_state_dicts([tp_slice(tp, rank).state_dict() for rank in range(tp)], CONFIG)
    assert whole.keys() == merged.keys()
    for name in whole:
        assert torch.equal(whole[name], merged[name]), name


@pytest.mark.parametrize("tp", [1, 2])
def test_building_a_rank_never_allocates_more_than_one_full_parameter(tp):
    largest_parameter = max(p.numel() for p in GPT(CONFIG).parameters())
    with LargestTensorSeen() as seen:
        model = tp_slice(tp, 0)
    assert seen.largest == largest_parameter  # the full token embedding, drawn before it is sliced
    full = dict(GPT(CONFIG).named_parameters())
    for name, p in model.named_parameters():  # and only this rank's slice of each is kept
        assert p.numel() == full[name].numel() // (tp if hasattr(p, "full_index") else 1), name
