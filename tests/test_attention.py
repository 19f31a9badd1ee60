"""Specification of the attention variants in lm.attention: their math, their registry and the
facts it records (twices, passes, the cached form), and how the config picks one per layer."""

import json
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch

from conftest import relative_error
from lm import attention, fastest
from lm.attention import (
    causal_attention_matrix,
    softmax_attention,
    softmax_attention_reference,
    twicing_attention,
    twicing_attention_reference,
)
from lm.config import ATTENTION_VARIANTS, ModelConfig
from tensor_probes import LargestTensorSeen

REPO_ROOT = Path(__file__).resolve().parents[1]


def random_qkv(b=2, h=3, t=17, d=8, dtype=torch.float64, seed=0, requires_grad=False, kv_heads=None):
    """q of h heads; k and v of kv_heads heads (grouped-query attention), h by default."""
    g = torch.Generator().manual_seed(seed)
    heads = (h, kv_heads or h, kv_heads or h)
    return [torch.randn(b, n, t, d, generator=g, dtype=dtype).requires_grad_(requires_grad) for n in heads]


def grouped_reference(name: str, q, k, v) -> torch.Tensor:
    """What a variant must give under grouped-query attention: its math with every kv head repeated
    for the query heads of its group (h reads h // group), materialised."""
    group = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    a = causal_attention_matrix(q, k)
    return (2 * a - a @ a) @ v if attention.ATTENTION[name].twices else a @ v


def test_variants_are_registered_by_name():
    assert attention.ATTENTION["softmax"].attend is softmax_attention
    assert attention.ATTENTION["twicing"].attend is twicing_attention
    assert attention.ATTENTION["softmax_reference"].attend is softmax_attention_reference
    assert attention.ATTENTION["twicing_reference"].attend is twicing_attention_reference
    with pytest.raises(ValueError, match="unknown attention"):
        attention.get_attention("twicng")


@pytest.mark.parametrize("t", [1, 2, 17, 64])
def test_twicing_equals_explicit_two_a_minus_a_squared_in_float64(t):
    q, k, v = random_qkv(t=t)
    a = causal_attention_matrix(q, k)
    explicit = (2 * a - a @ a) @ v
    assert relative_error(twicing_attention(q, k, v), explicit) <= 1e-10
    assert relative_error(twicing_attention_reference(q, k, v), explicit) <= 1e-10


def test_softmax_fused_equals_reference_in_float64():
    q, k, v = random_qkv()
    assert relative_error(softmax_attention(q, k, v), softmax_attention_reference(q, k, v)) <= 1e-10


def test_twicing_kernel_rows_sum_to_one_and_stay_causal():
    q, k, _ = random_qkv(t=12)
    a = causal_attention_matrix(q, k)
    kernel = 2 * a - a @ a
    torch.testing.assert_close(kernel.sum(-1), torch.ones_like(kernel.sum(-1)), rtol=0, atol=1e-12)
    assert torch.all(kernel.triu(1) == 0)


@pytest.mark.parametrize("fn", [softmax_attention, twicing_attention, twicing_attention_reference])
def test_changing_future_tokens_never_changes_earlier_outputs(fn):
    q, k, v = random_qkv(t=20)
    before = fn(q, k, v)
    cut = 11
    q2, k2, v2 = (x.clone() for x in (q, k, v))
    for x in (q2, k2, v2):
        x[:, :, cut:] = torch.randn_like(x[:, :, cut:]) * 5
    after = fn(q2, k2, v2)
    assert torch.equal(before[:, :, :cut], after[:, :, :cut])
    assert not torch.allclose(before[:, :, cut:], after[:, :, cut:])


@pytest.mark.parametrize("fn", [twicing_attention, softmax_attention])
def test_gradcheck_on_tiny_shapes(fn):
    q, k, v = random_qkv(b=1, h=2, t=5, d=3, requires_grad=True)
    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_twicing_gradients_equal_the_explicit_formula():
    q, k, v = random_qkv(t=9, requires_grad=True)
    grads_fused = torch.autograd.grad(twicing_attention(q, k, v).square().sum(), (q, k, v))
    grads_ref = torch.autograd.grad(twicing_attention_reference(q, k, v).square().sum(), (q, k, v))
    for g, r in zip(grads_fused, grads_ref):
        assert relative_error(g, r) <= 1e-10


def largest_tensor_in_forward_and_backward(fn, t):
    q, k, v = random_qkv(b=1, h=1, t=t, d=16, dtype=torch.float32, requires_grad=True)
    with LargestTensorSeen() as seen:
        fn(q, k, v).sum().backward()
    return seen.largest


def test_twicing_never_allocates_a_t_by_t_tensor():
    t = 4096
    fused = largest_tensor_in_forward_and_backward(twicing_attention, t)
    reference = largest_tensor_in_forward_and_backward(twicing_attention_reference, t)
    # The fused path only ever holds (T, head_dim)-sized tensors; the reference holds T x T ones.
    assert fused <= t * 16
    assert reference >= t * t


# --------------------------------------------------------------------------- the registry


@pytest.mark.parametrize("name", list(attention.ATTENTION))
def test_every_variant_computes_what_its_facts_say(name):
    """A variant that twices computes (2A - A^2) V in two passes; the others A V in one."""
    variant = attention.get_attention(name)
    assert variant is attention.ATTENTION[name] and variant.name == name
    q, k, v = random_qkv()
    a = causal_attention_matrix(q, k)
    expected = (2 * a - a @ a) @ v if variant.twices else a @ v
    assert relative_error(variant.attend(q, k, v), expected) <= 1e-10
    assert variant.passes == (2 if variant.twices else 1)


@pytest.mark.parametrize("name", list(attention.ATTENTION))
@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["multi-head", "grouped", "multi-query"])
def test_every_variant_with_fewer_kv_heads_reads_kv_head_h_over_group(name, kv_heads):
    q, k, v = random_qkv(h=4, kv_heads=kv_heads)
    assert relative_error(attention.ATTENTION[name].attend(q, k, v), grouped_reference(name, q, k, v)) <= 1e-10


def test_grouped_twicing_keeps_no_key_copy_per_query_head_for_backward():
    """The second pass has keys per kv head and values 2V - U per query head; it runs on K itself."""
    q, k, v = random_qkv(h=8, kv_heads=2, t=16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        out = attention.twicing_attention_sdpa(q, k, v)
    expanded_k = k.detach().repeat_interleave(4, dim=1)
    assert not any(x.shape == expanded_k.shape and torch.equal(x, expanded_k) for x in saved)
    out.sum().backward()
    assert k.grad.shape == k.shape and v.grad.shape == v.shape


@pytest.mark.parametrize("name", list(attention.ATTENTION))
@pytest.mark.parametrize("kv_heads", [3, 1], ids=["multi-head", "multi-query"])
def test_cached_attention_equals_the_uncached_token_by_token(name, kv_heads):
    """A prompt into an empty cache, then one token per call, gives the rows of the whole sequence."""
    variant = attention.ATTENTION[name]
    q, k, v = random_qkv(t=12, kv_heads=kv_heads)
    whole = variant.attend(q, k, v)
    cache, prompt = attention.LayerCache(), 5
    rows = [variant.attend_cached(q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt], cache)]
    for i in range(prompt, 12):
        rows.append(variant.attend_cached(q[:, :, i : i + 1], k[:, :, i : i + 1], v[:, :, i : i + 1], cache))
    assert cache.length == 12
    assert relative_error(torch.cat(rows, dim=-2), whole) <= 1e-10
    if variant.twices:  # U = A V of every token so far, one row per query head: the first pass the cache keeps
        assert relative_error(cache.u, softmax_attention(q, k, v)) <= 1e-10
        assert cache.u.shape == q.shape and cache.k.shape == k.shape


@pytest.mark.parametrize("name", ["softmax", "twicing"])
def test_after_the_prompt_the_cache_takes_one_token_at_a_time(name):
    q, k, v = random_qkv(t=6)
    cache = attention.LayerCache()
    attention.ATTENTION[name].attend_cached(q[:, :, :4], k[:, :, :4], v[:, :, :4], cache)
    with pytest.raises(ValueError, match="one token at a time"):
        attention.ATTENTION[name].attend_cached(q[:, :, 4:], k[:, :, 4:], v[:, :, 4:], cache)


def test_only_twicing_asks_for_the_kernel_and_the_log_says_how_each_runs_on_a_cpu():
    cpu = torch.device("cpu")
    kernel = {name: variant.kernel for name, variant in attention.ATTENTION.items() if variant.kernel != "never"}
    assert kernel == {"twicing": "if fastest", "twicing_triton": "always"}
    assert {name: variant.runs_on(cpu, 64) for name, variant in attention.ATTENTION.items()} == {
        "softmax": "one SDPA pass",
        "twicing": "two SDPA passes",
        "twicing_triton": "two SDPA passes",
        "twicing_sdpa": "two SDPA passes",
        "softmax_reference": "materialised A (reference)",
        "twicing_reference": "materialised A (reference)",
    }


# --------------------------------------------------------------------------- the config's choice


@pytest.mark.parametrize(
    "impl, softmax, twicing",
    [
        ("fused", "softmax", "twicing"),
        ("triton", "softmax", "twicing_triton"),
        ("sdpa", "softmax", "twicing_sdpa"),
        ("reference", "softmax_reference", "twicing_reference"),
    ],
)
def test_each_layer_kind_and_attention_impl_picks_a_registered_variant_of_that_kind(impl, softmax, twicing):
    config = ModelConfig(n_layer=2, twicing_layers=[1], attention_impl=impl)
    assert config.layer_kinds() == ["softmax", "twicing"]
    assert config.layer_attention() == [softmax, twicing]
    assert [attention.ATTENTION[name].twices for name in config.layer_attention()] == [False, True]


def test_every_attention_impl_the_config_accepts_has_a_variant_for_each_layer_kind():
    impls = typing.get_args(typing.get_type_hints(ModelConfig)["attention_impl"])
    assert set(ATTENTION_VARIANTS) == {(kind, impl) for kind in ("softmax", "twicing") for impl in impls}
    for (kind, _), name in ATTENTION_VARIANTS.items():
        assert attention.ATTENTION[name].twices == (kind == "twicing")


def test_the_config_names_variants_without_importing_torch():
    """lm.config holds names only; the variants (and torch) are lm.attention's, imported by the model."""
    code = "import sys, lm.config; assert 'torch' not in sys.modules, 'lm.config imported torch'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------- fused: the measured-fastest


def record_with(tmp_path, gpu="H200", head_dim="64", attention_x=None, tokens_per_s=None) -> dict:
    """The shipped record, with the kernel's figures for one GPU class and head size set (a copy)."""
    record = fastest.load_record()
    entry = record["gpus"].setdefault(gpu, {}).setdefault(head_dim, {})
    entry.setdefault("attention_fwd_bwd_x_softmax", {"sdpa": 1.72})["triton"] = attention_x
    entry.setdefault("training_tokens_per_s", {"sdpa": 226000})["triton"] = tokens_per_s
    path = tmp_path / "measured_fastest.json"
    path.write_text(json.dumps(record))
    return fastest.load_record(path)


def test_fused_twicing_is_two_sdpa_passes_wherever_the_kernel_was_not_measured_faster():
    record = fastest.load_record()
    for gpu, head_dim in [
        ("NVIDIA H200", 64),
        ("NVIDIA H200", 128),
        ("NVIDIA H100 80GB HBM3", 64),
        ("NVIDIA A100", 64),
    ]:
        assert fastest.fastest_twicing(gpu, head_dim, record) == "sdpa", (gpu, head_dim)
    assert fastest.fastest_twicing("NVIDIA H200", 64, {}) == "sdpa"  # no record file: the measured path


def test_the_choice_follows_the_recorded_figures_not_a_preference(tmp_path):
    """Record the kernel faster in both benchmarks and fused picks it, for that GPU class and head size only."""
    faster = record_with(tmp_path, attention_x=1.55, tokens_per_s=240000)
    assert fastest.fastest_twicing("NVIDIA H200", 64, faster) == "triton"
    assert fastest.fastest_twicing("NVIDIA H200", 128, faster) == "sdpa"  # another head size: not measured
    assert fastest.fastest_twicing("NVIDIA H100 80GB HBM3", 64, faster) == "sdpa"  # another class of GPU
    # Faster in one benchmark only is not enough; slower or equal is not faster.
    assert (
        fastest.fastest_twicing("NVIDIA H200", 64, record_with(tmp_path, attention_x=1.55, tokens_per_s=200000))
        == "sdpa"
    )
    assert (
        fastest.fastest_twicing("NVIDIA H200", 64, record_with(tmp_path, attention_x=1.9, tokens_per_s=240000))
        == "sdpa"
    )
    assert (
        fastest.fastest_twicing("NVIDIA H200", 64, record_with(tmp_path, attention_x=1.72, tokens_per_s=226000))
        == "sdpa"
    )


def test_a_gpu_class_is_found_inside_the_device_name():
    record = {"gpus": {"H100": {}, "H100 NVL": {}, "A100": {}}}
    assert fastest.gpu_class("NVIDIA H100 NVL", record) == "H100 NVL"  # the longest match
    assert fastest.gpu_class("NVIDIA H100 80GB HBM3", record) == "H100"
    assert fastest.gpu_class("NVIDIA L4", record) is None


def test_the_record_copies_the_figures_benchmarks_results_md_holds():
    """measured_fastest.json is RESULTS.md's figures in a form the code reads: each entry names its
    section, which must hold the same numbers (and RESULTS.md points at the file)."""
    results = (REPO_ROOT / "benchmarks" / "RESULTS.md").read_text()
    assert "measured_fastest.json" in results
    for gpu in fastest.load_record()["gpus"].values():
        for entry in gpu.values():
            title = entry["source"].removeprefix("RESULTS.md: ")
            section = results.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
            passes = entry["attention_fwd_bwd_x_softmax"]["sdpa"]
            assert f"| twicing, two SDPA passes | {passes}×" in section
            assert f"{entry['training_tokens_per_s']['sdpa'] // 1000}k" in section


def test_fused_on_a_gpu_asks_the_record_once_per_gpu_and_head_size(monkeypatch, tmp_path):
    """What the model runs: kernel_is_fastest reads the GPU's name and the record (here both stand-ins)."""
    monkeypatch.setattr(attention, "_FASTEST", {})
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: "NVIDIA H200")
    faster = record_with(tmp_path, attention_x=1.5, tokens_per_s=250000)
    monkeypatch.setattr(fastest, "load_record", lambda: faster)
    assert attention.kernel_is_fastest(0, 64) and not attention.kernel_is_fastest(0, 128)
    monkeypatch.setattr(fastest, "load_record", lambda: {})  # read once: the answer stays
    assert attention.kernel_is_fastest(0, 64)


def test_attention_impl_triton_is_refused_for_training_where_no_gpu_can_run_the_kernel():
    from core.errors import UserError
    from lm.config import RunConfig
    from lm.initialization import build_gpt

    model = dict(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32, twicing_layers="last:1")
    with pytest.raises(UserError, match="attention_impl: triton needs a CUDA GPU with Triton.*use fused"):
        build_gpt(RunConfig.from_dict({"model": {**model, "attention_impl": "triton"}}), "cpu")
    build_gpt(RunConfig.from_dict({"model": {**model, "attention_impl": "fused"}}), "cpu")  # runs everywhere
    no_twicing = {**model, "attention_impl": "triton", "twicing_layers": "none"}
    build_gpt(RunConfig.from_dict({"model": no_twicing}), "cpu")  # nothing asks for the kernel


def test_attention_impl_triton_runs_two_sdpa_passes_where_the_kernel_does_not_take_the_inputs():
    """Off a GPU (eval or generation of a GPU run on a CPU, say), and on a GPU for fp32 or other head sizes."""
    q, k, v = random_qkv(t=9)
    assert relative_error(attention.twicing_attention_kernel(q, k, v), twicing_attention_reference(q, k, v)) <= 1e-10


def test_the_model_imports_no_triton_on_a_cpu():
    """The kernel (and torch.compile's machinery) load only where a GPU can run them."""
    code = "import sys, lm.model; assert not {'triton', 'torch._dynamo'} & set(sys.modules), 'imported on a CPU'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
