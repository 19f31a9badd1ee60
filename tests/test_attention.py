"""Specification of the attention variants in lm.attention."""

import pytest
import torch

from conftest import LargestTensorSeen, relative_error
from lm import attention
from lm.attention import (
    causal_attention_matrix,
    softmax_attention,
    softmax_attention_reference,
    twicing_attention,
    twicing_attention_reference,
)


def random_qkv(b=2, h=3, t=17, d=8, dtype=torch.float64, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, t, d, generator=g, dtype=dtype).requires_grad_(requires_grad) for _ in range(3)]


def test_variants_are_registered_by_name():
    assert attention.ATTENTION["softmax"] is softmax_attention
    assert attention.ATTENTION["twicing"] is twicing_attention
    assert attention.ATTENTION["softmax_reference"] is softmax_attention_reference
    assert attention.ATTENTION["twicing_reference"] is twicing_attention_reference
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
