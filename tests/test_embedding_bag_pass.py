"""The embedding-bag rewrite: F.embedding_bag / nn.EmbeddingBag (sum) -> aa::trigram_bag."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import aa_compile

EAGER = {"inner_compiler": "eager"}


def bags(n_bags=6, v=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(0, 7, (n_bags,), generator=g)
    sizes[1] = 0  # an empty bag
    indices = torch.randint(0, v, (int(sizes.sum()),), generator=g)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])
    return indices, offsets


class Functional(nn.Module):
    def __init__(self, v=50, h=9, **kwargs):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(v, h))
        self.kwargs = kwargs

    def forward(self, indices, offsets, psw=None):
        return F.embedding_bag(indices, self.weight, offsets, per_sample_weights=psw,
                               **self.kwargs)


@pytest.mark.parametrize("inner", ["eager", "inductor"])
@pytest.mark.parametrize("with_psw", [False, True])
@pytest.mark.parametrize("last", [False, True])
def test_rewrite_fires_and_matches_eager(inner, with_psw, last):
    torch.manual_seed(0)
    m = Functional(mode="sum", include_last_offset=last)
    indices, offsets = bags()
    offs = offsets if last else offsets[:-1]
    psw = torch.randn(indices.numel(), requires_grad=True) if with_psw else None
    rep = aa_compile.report(m, indices, offs, psw, options={"inner_compiler": inner})
    assert rep.rewrites["embedding_bag"] == 1
    torch._dynamo.reset()
    compiled = torch.compile(m, backend="aa", options={"inner_compiler": inner})
    got = compiled(indices, offs, psw)
    want = m(indices, offs, psw)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(got[1], torch.zeros_like(got[1]))  # the empty bag
    g = torch.randn_like(want)
    grads = torch.autograd.grad(got, [m.weight] + ([psw] if with_psw else []), g)
    grads_e = torch.autograd.grad(want, [m.weight] + ([psw] if with_psw else []), g)
    for a, b in zip(grads, grads_e):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_nn_embedding_bag_module_is_rewritten():
    m = nn.EmbeddingBag(50, 8, mode="sum")
    indices, offsets = bags()
    assert aa_compile.report(m, indices, offsets[:-1], options=EAGER).rewrites[
        "embedding_bag"] == 1


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        ({"mode": "mean"}, "mode='mean'"),
        ({"mode": "sum", "max_norm": 1.0}, "max_norm is set"),
        ({"mode": "sum", "padding_idx": 0}, "padding_idx is set"),
        ({"mode": "sum", "scale_grad_by_freq": True}, "scale_grad_by_freq"),
        ({"mode": "sum", "sparse": True}, "sparse=True"),
    ],
)
def test_guards_leave_the_call_and_say_why(kwargs, reason):
    m = Functional(**kwargs)
    indices, offsets = bags()
    rep = aa_compile.report(m, indices, offsets[:-1], options=EAGER)
    assert rep.rewrites["embedding_bag"] == 0
    assert any(reason in r for p, _, r in rep.skipped if p == "embedding_bag"), rep.skipped
    torch._dynamo.reset()
    got = torch.compile(m, backend="aa", options=EAGER)(indices, offsets[:-1])
    torch.testing.assert_close(got, m(indices, offsets[:-1]))


@pytest.mark.parametrize("inner", ["eager", "inductor"])
@pytest.mark.parametrize("with_psw", [False, True])
def test_two_dimensional_fixed_size_bags_are_rewritten(inner, with_psw):
    """2-D input [B, L] without offsets: B bags of L entries (CSR offsets arange(B + 1) * L)."""
    torch.manual_seed(0)
    m = Functional(mode="sum")
    x = torch.randint(0, 50, (5, 3))
    psw = torch.randn(5, 3, requires_grad=True) if with_psw else None
    rep = aa_compile.report(lambda i, p: m(i, None, p), x, psw, options={"inner_compiler": inner})
    assert rep.rewrites["embedding_bag"] == 1, rep.skipped
    torch._dynamo.reset()
    compiled = torch.compile(lambda i, p: m(i, None, p), backend="aa",
                             options={"inner_compiler": inner})
    got, want = compiled(x, psw), m(x, None, psw)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    wrt = [m.weight] + ([psw] if with_psw else [])
    g = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(got, wrt, g), torch.autograd.grad(want, wrt, g)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_two_dimensional_input_with_include_last_offset_is_left_alone():
    m = Functional(mode="sum", include_last_offset=True)
    x = torch.randint(0, 50, (4, 3))
    rep = aa_compile.report(lambda i: m(i, None), x, options=EAGER)
    assert rep.rewrites["embedding_bag"] == 0
    assert any("include_last_offset=True with 2-D" in r for _, _, r in rep.skipped)
