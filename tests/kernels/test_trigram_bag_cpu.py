"""Property tests of the CPU path of aa::trigram_bag (forward and both gradients) vs float64.

The helpers here (`problems`, `Problem`, `check`) are shared with the Triton and op tests.
"""

from __future__ import annotations

import dataclasses

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given

from aa_compile.kernels.trigram_bag import cpu, reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
HS = [1, 3, 17, 64, 129]


@dataclasses.dataclass(frozen=True)
class Problem:
    v: int
    h: int
    sizes: tuple[int, ...]
    hot: bool  # indices from a few slots only: long runs of equal index in the backward
    dtype: torch.dtype
    idx_dtype: torch.dtype
    has_psw: bool
    seed: int

    def make(self, device="cpu"):
        """``(weight, indices, offsets, psw or None, grad)`` on ``device``."""
        g = torch.Generator().manual_seed(self.seed)
        weight = torch.randn(self.v, self.h, generator=g, dtype=torch.float64).to(self.dtype)
        offsets = torch.zeros(len(self.sizes) + 1, dtype=torch.int64)
        offsets[1:] = torch.tensor(self.sizes, dtype=torch.int64).cumsum(0)
        nnz = int(offsets[-1])
        hi = min(self.v, 3) if self.hot else self.v
        indices = torch.randint(0, hi, (nnz,), generator=g).to(self.idx_dtype)
        psw = None
        if self.has_psw:
            psw = (torch.rand(nnz, generator=g, dtype=torch.float64) * 4 - 2).to(self.dtype)
        grad = torch.randn(len(self.sizes), self.h, generator=g, dtype=torch.float64)
        grad = grad.to(self.dtype)
        return tuple(
            None if t is None else t.to(device) for t in (weight, indices, offsets, psw, grad)
        )


@st.composite
def problems(draw, dtypes=tuple(DTYPES), max_bags=40, max_v=300, hs=tuple(HS)):
    v = draw(st.integers(1, max_v))
    h = draw(st.sampled_from(hs))
    n_bags = draw(st.integers(0, max_bags))
    size = st.one_of(st.just(0), st.integers(1, 12), st.integers(13, 60))  # 0: empty bag
    sizes = tuple(draw(st.lists(size, min_size=n_bags, max_size=n_bags)))
    return Problem(
        v=v,
        h=h,
        sizes=sizes,
        hot=draw(st.booleans()),
        dtype=draw(st.sampled_from(dtypes)),
        idx_dtype=draw(st.sampled_from([torch.int32, torch.int64])),
        has_psw=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _d(t):
    return None if t is None else t.double()


def _abs(t):
    return None if t is None else t.double().abs()


def references(weight, indices, offsets, psw, grad):
    """float64 answers and their error scales: ``(out, dweight, dpsw), (scales...)``.

    The scale of an output element is ``n * sum(|terms|)`` over its ``n`` summed products: any
    summation order in a precision with unit roundoff ``eps / 2`` is within ``eps * scale``
    (the classic ``gamma_n`` bound of recursive summation, with the product's rounding).
    """
    indices, offsets = indices.cpu(), offsets.cpu()
    w, g = _d(weight).cpu(), _d(grad).cpu()
    p = None if psw is None else _d(psw).cpu()
    out = reference.trigram_bag(w, indices, offsets, p)
    dw, dpsw = reference.trigram_bag_backward(g, w, indices, offsets, p)
    aw, ap, ag = w.abs(), None if p is None else p.abs(), g.abs()
    out_s = reference.trigram_bag(aw, indices, offsets, ap)
    dw_s, dpsw_s = reference.trigram_bag_backward(ag, aw, indices, offsets, ap)
    out_s *= offsets.diff().double().unsqueeze(1)
    dw_s *= torch.bincount(indices.long(), minlength=w.shape[0]).double().unsqueeze(1)
    if dpsw_s is not None:
        dpsw_s *= w.shape[1]
    return (out, dw, dpsw), (out_s, dw_s, dpsw_s)


def eager_embedding_bag(weight, indices, offsets, psw, grad):
    """``F.embedding_bag`` (eager ATen) in the input dtype: ``(out, dweight, dpsw)``."""
    w = weight.detach().clone().requires_grad_(True)
    p = None if psw is None else psw.detach().clone().requires_grad_(True)
    out = F.embedding_bag(indices, w, offsets, mode="sum", per_sample_weights=p,
                          include_last_offset=True)
    out.backward(grad)
    return out.detach(), w.grad, (None if p is None else p.grad)


def check(got, want64, scale64, dtype, eager=None):
    """``got`` is close to the float64 answer ``want64`` (``scale64``: see `references`).

    float32 / float64: within 4x the error of eager ``F.embedding_bag`` in the same dtype
    (``eager``) plus the rounding-error bound ``eps * scale`` of each element. float16 /
    bfloat16: one rounding step of the output (``eps * |want|``, or a subnormal spacing) plus
    the bound of float32 accumulation (``eps32 * scale``), i.e. accumulated in float32 and
    rounded once.
    """
    assert got.dtype == dtype, (got.dtype, dtype)
    assert tuple(got.shape) == tuple(want64.shape), (got.shape, want64.shape)
    if got.numel() == 0:
        return
    got64 = got.detach().double().cpu()
    assert torch.isfinite(got64).all()
    err = (got64 - want64).abs()
    fin = torch.finfo(dtype)
    if dtype in (torch.float32, torch.float64):
        eager_err = 0.0
        if eager is not None:
            eager_err = (eager.detach().double().cpu() - want64).abs().max().item()
        bound = 4 * eager_err + fin.eps * scale64
    else:
        eps32 = torch.finfo(torch.float32).eps
        bound = fin.eps * want64.abs() + eps32 * scale64 + fin.smallest_normal * fin.eps
    bad = err > bound
    assert not bad.any(), (
        f"{int(bad.sum())} of {err.numel()} elements off; worst excess "
        f"{(err - bound).max().item():.3g} (err {err.max().item():.3g})"
    )


@given(problems())
def test_forward_matches_float64_reference(p):
    weight, indices, offsets, psw, grad = p.make()
    (want, _, _), (scale, _, _) = references(weight, indices, offsets, psw, grad)
    eager = eager_embedding_bag(weight, indices, offsets, psw, grad)[0]
    check(cpu.trigram_bag_fwd(weight, indices, offsets, psw), want, scale, p.dtype, eager)


@given(problems())
def test_backward_matches_float64_reference(p):
    weight, indices, offsets, psw, grad = p.make()
    (_, dw64, dpsw64), (_, dw_s, dpsw_s) = references(weight, indices, offsets, psw, grad)
    _, dw_e, dpsw_e = eager_embedding_bag(weight, indices, offsets, psw, grad)
    dw, dpsw = cpu.trigram_bag_bwd(grad, weight, indices, offsets, psw, True, True)
    check(dw, dw64, dw_s, p.dtype, dw_e)
    if psw is None:
        assert dpsw is None
    else:
        check(dpsw, dpsw64, dpsw_s, p.dtype, dpsw_e)


@pytest.mark.parametrize("v", [32767, 32768, 70000])  # int16 / int32 sort keys
def test_backward_large_vocab(v):
    p = Problem(v, 3, (40, 0, 25), False, torch.float32, torch.int64, True, 9)
    weight, indices, offsets, psw, grad = p.make()
    indices[:3] = torch.tensor([v - 1, 0, v - 1])
    (_, dw64, _), (_, dw_s, _) = references(weight, indices, offsets, psw, grad)
    dw, _ = cpu.trigram_bag_bwd(grad, weight, indices, offsets, psw, True, False)
    eager = eager_embedding_bag(weight, indices, offsets, psw, grad)[1]
    check(dw, dw64, dw_s, torch.float32, eager)


def test_gradients_not_asked_for_are_none():
    p = Problem(7, 5, (2, 0, 3), False, torch.float32, torch.int64, True, 0)
    weight, indices, offsets, psw, grad = p.make()
    assert cpu.trigram_bag_bwd(grad, weight, indices, offsets, psw, False, False) == (None, None)
    dw, dpsw = cpu.trigram_bag_bwd(grad, weight, indices, offsets, psw, False, True)
    assert dw is None and dpsw.shape == (5,)


def _big_problem(dtype=torch.float32, psw=True):
    """Long runs of equal index (4000 entries over 37 slots), so summation order matters."""
    sizes = tuple((i * 7) % 61 for i in range(130))
    return Problem(37, 129, sizes, False, dtype, torch.int64, psw, 1).make()


def test_backward_is_deterministic_across_runs_and_thread_counts():
    weight, indices, offsets, psw, grad = _big_problem()
    first = cpu.trigram_bag_bwd(grad, weight, indices, offsets, psw, True, True)
    threads = torch.get_num_threads()
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            for _ in range(2):
                again = cpu.trigram_bag_bwd(grad, weight, indices, offsets, psw, True, True)
                assert torch.equal(again[0], first[0])
                assert torch.equal(again[1], first[1])
    finally:
        torch.set_num_threads(threads)


def test_forward_equals_embedding_bag_semantics_in_float64():
    """Same function as F.embedding_bag(offsets[:-1]) (include_last_offset=False)."""
    weight, indices, offsets, psw, _ = _big_problem(torch.float64)
    want = F.embedding_bag(indices, weight, offsets[:-1], mode="sum", per_sample_weights=psw)
    torch.testing.assert_close(cpu.trigram_bag_fwd(weight, indices, offsets, psw), want)


def test_empty_cases():
    w = torch.randn(4, 3)
    none = torch.zeros(0, dtype=torch.int64)
    out = cpu.trigram_bag_fwd(w, none, torch.zeros(1, dtype=torch.int64))
    assert out.shape == (0, 3)
    out = cpu.trigram_bag_fwd(w, none, torch.zeros(3, dtype=torch.int64))
    assert torch.equal(out, torch.zeros(2, 3))
    dw, _ = cpu.trigram_bag_bwd(torch.randn(2, 3), w, none, torch.zeros(3, dtype=torch.int64))
    assert torch.equal(dw, torch.zeros(4, 3))
    w0 = torch.randn(4, 0)
    idx = torch.tensor([1, 2])
    assert cpu.trigram_bag_fwd(w0, idx, torch.tensor([0, 2])).shape == (1, 0)
