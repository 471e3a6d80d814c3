"""aa::window_attention as an op: autograd against the float64 reference, gradcheck, the HAT
model's mask, T = 0, and bad inputs (ValueError naming the argument)."""

from __future__ import annotations

import pytest
import torch
from aa_compile.kernels.window_attention import reference
from hypothesis import given, settings

from aa_compile.models.hat import sliding_window_mask
from aa_compile.ops.window_attention import attention

from .kernels.test_window_attention_cpu import _one_thread, problems, run_and_check  # noqa: F401

OP = torch.ops.aa.window_attention


def _op_forward(q, k, v, offs, window, scale):
    leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]
    out, lse = OP(*leaves, offs, window, scale)
    _op_forward.last = (leaves, out, lse)
    return out.detach(), lse.detach()


def _op_backward(grad, grad_lse, q, k, v, out, lse, offs, window, scale):
    """The gradients autograd computes through the op for the forward just run."""
    leaves, out, lse = _op_forward.last
    outputs, grads = [out], [grad]
    if grad_lse is not None:
        outputs.append(lse)
        grads.append(grad_lse)
    if out.numel() == 0:
        return [torch.zeros_like(x) for x in leaves]
    return torch.autograd.grad(outputs, leaves, grads)


@settings(max_examples=15)
@given(problems(max_t=70))
def test_autograd_matches_float64_reference(p):
    run_and_check(p, _op_forward, _op_backward)


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(4, 9, 3, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 9, 3, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 9, 3, generator=g, dtype=torch.float64, requires_grad=True)
    offs = torch.tensor([0, 1, 1, 6, 9])
    assert torch.autograd.gradcheck(lambda a, b, c: OP(a, b, c, offs, 3, None), (q, k, v))


def test_same_mask_as_the_hat_model():
    """The op's mask is the one `aa_compile.models.hat` builds from byte documents/positions."""
    offs = torch.tensor([0, 5, 5, 6, 30])
    doc = reference.doc_ids(offs, 30, "cpu")
    pos = torch.arange(30) - offs[doc]
    for window in (1, 4, 30):
        assert torch.equal(reference.mask(offs, 30, window, "cpu"),
                           sliding_window_mask(doc, pos, window))


def test_attention_helper_and_partial_grads():
    q, k, v = (torch.randn(2, 3, 9, 4) for _ in range(3))
    k.requires_grad_(True)
    out = attention(q, k, v, None, 4)
    want, _ = reference.window_attention(q, k.detach(), v, None, 4)
    torch.testing.assert_close(out, want)
    out.sum().backward()
    assert k.grad is not None and k.grad.shape == k.shape


def test_empty_sequence():
    q = torch.randn(3, 0, 8, requires_grad=True)
    k = torch.randn(1, 0, 8, requires_grad=True)
    out, lse = OP(q, k, k, torch.tensor([0]), 5, None)
    assert out.shape == (3, 0, 8) and lse.shape == (3, 0)
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape


def _f(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


_OFFS = torch.tensor([0, 3, 6])


@pytest.mark.parametrize(
    "args, message",
    [
        ((_f(2, 6, 4, dtype=torch.int64), _f(2, 6, 4), _f(2, 6, 4), _OFFS, 2), "q must be"),
        ((_f(6, 4), _f(6, 4), _f(6, 4), _OFFS, 2), r"q must be \[..., H, T, D\]"),
        ((_f(2, 6, 4), _f(2, 6, 4).double(), _f(2, 6, 4), _OFFS, 2), "k must have q's dtype"),
        ((_f(2, 6, 4), _f(2, 6, 4), _f(2, 5, 4), _OFFS, 2), "v must have k's shape"),
        ((_f(2, 6, 4), _f(2, 6, 3), _f(2, 6, 3), _OFFS, 2), "k must be"),
        ((_f(1, 2, 6, 4), _f(2, 2, 6, 4), _f(2, 2, 6, 4), _OFFS, 2), "k must be"),
        ((_f(3, 6, 4), _f(2, 6, 4), _f(2, 6, 4), _OFFS, 2), "multiple of k's head count"),
        ((_f(2, 6, 0), _f(2, 6, 0), _f(2, 6, 0), _OFFS, 2), "non-empty head dimension"),
        ((_f(2, 6, 4), _f(2, 6, 4), _f(2, 6, 4), _OFFS, 0), "window must be an int >= 1"),
        ((_f(2, 6, 4), _f(2, 6, 4), _f(2, 6, 4), _OFFS.float(), 2), "doc_offsets must be an int"),
        ((_f(2, 6, 4), _f(2, 6, 4), _f(2, 6, 4), _OFFS[None], 2), r"doc_offsets must be 1-D"),
        ((_f(2, 6, 4), _f(2, 6, 4), _f(2, 6, 4), torch.tensor([1, 6]), 2), "start at 0"),
        ((_f(2, 6, 4), _f(2, 6, 4), _f(2, 6, 4), torch.tensor([0, 5]), 2), "end at T=6"),
        ((_f(2, 6, 4), _f(2, 6, 4), _f(2, 6, 4), torch.tensor([0, 4, 2, 6]), 2),
         "non-decreasing"),
    ],
)
def test_bad_inputs(args, message):
    with pytest.raises(ValueError, match=message):
        OP(*args)


def test_bad_scale():
    x = _f(2, 6, 4)
    with pytest.raises(ValueError, match="scale must be a finite"):
        OP(x, x, x, None, 2, float("nan"))


def test_backward_checks_lse():
    q = _f(2, 6, 4)
    out, lse = OP(q, q, q, None, 2, None)
    with pytest.raises(ValueError, match="lse must be"):
        torch.ops.aa.window_attention_backward(out, None, q, q, q, out, lse[:, :5], None, 2, None)


def test_projection_layout_inputs():
    """q, k, v as ``[B, T, H, D].transpose(1, 2)`` views (what projections give) work as is."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 30, 4, 8, generator=g).transpose(1, 2).requires_grad_(True)
    k = torch.randn(2, 30, 2, 8, generator=g).transpose(1, 2).requires_grad_(True)
    v = torch.randn(2, 30, 2, 8, generator=g).transpose(1, 2).requires_grad_(True)
    offs = torch.tensor([0, 11, 30])
    out = attention(q, k, v, offs, 6)
    grad = torch.randn(out.shape, generator=g)
    out.backward(grad)
    leaves = [x.detach().double().requires_grad_(True) for x in (q, k, v)]
    want, _ = reference.window_attention(*leaves, offs, 6)
    want.backward(grad.double())
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    for got, ref in zip((q, k, v), leaves):
        torch.testing.assert_close(got.grad.double(), ref.grad, atol=1e-5, rtol=1e-5)
