"""Property tests of the CPU path of aa::guide_add and aa::guide_add_rms_norm against the
float64 reference: random word lengths (1-byte words, 100-byte words, empty words), W = 0 /
T = 0, odd widths, every dtype, weight or none, out_dtype."""

from __future__ import annotations

import dataclasses

import hypothesis.strategies as st
import pytest
import torch
from aa_compile.kernels.guide_add import cpu, reference
from hypothesis import given

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
#: max error / max(1, max |float64 answer|) (2 ulps of the output for half types: the kernels
#: round once)
REL_TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2 * 2**-8,
           torch.float16: 2 * 2**-11}
word_lengths = st.one_of(st.integers(1, 12), st.sampled_from([0, 1, 1, 100]))


@dataclasses.dataclass(frozen=True)
class Problem:
    lengths: tuple[int, ...]
    dim: int
    dtype: torch.dtype
    weight_dtype: torch.dtype | None  # None: no weight
    out_dtype: torch.dtype | None
    eps: float
    seed: int

    def make(self):
        """``(x, g, offsets, weight, grad_y, grad_normed)``."""
        gen = torch.Generator().manual_seed(self.seed)
        offsets = torch.zeros(len(self.lengths) + 1, dtype=torch.int64)
        offsets[1:] = torch.tensor(self.lengths, dtype=torch.int64).cumsum(0)
        t = int(offsets[-1])

        def randn(*shape, dtype=self.dtype, shift=0.0):
            return (torch.randn(*shape, generator=gen, dtype=torch.float64) + shift).to(dtype)

        x, g = randn(t, self.dim), randn(len(self.lengths), self.dim)
        w = None if self.weight_dtype is None else randn(self.dim, dtype=self.weight_dtype,
                                                          shift=1.0)
        return (x, g, offsets, w, randn(t, self.dim),
                randn(t, self.dim, dtype=self.out_dtype or self.dtype))


@st.composite
def problems(draw, dtypes=DTYPES, max_words=12, lengths=word_lengths):
    dtype = draw(st.sampled_from(dtypes))
    return Problem(
        lengths=tuple(draw(st.lists(lengths, min_size=0, max_size=max_words))),
        dim=draw(st.sampled_from([1, 3, 16, 33, 200])),
        dtype=dtype,
        weight_dtype=draw(st.sampled_from([None, dtype, torch.float32])),
        out_dtype=draw(st.sampled_from([None, torch.float32] if dtype != torch.float64
                                       else [None])),
        eps=draw(st.sampled_from([1e-6, 1e-5, 0.1])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def check(got, want, dtype, name=""):
    assert got.dtype == dtype, (name, got.dtype, dtype)
    assert got.shape == want.shape, (name, got.shape, want.shape)
    assert not got.isnan().any(), name
    if got.numel() == 0:
        return
    err = (got.double() - want).abs().max().item()
    bound = REL_TOL[dtype] * max(1.0, want.abs().max().item())
    assert err <= bound, (name, err, bound)


def _d(t):
    return None if t is None else t.double()


def check_plain(fwd, bwd, p: Problem):
    x, g, offsets, _, grad, _ = p.make()
    check(fwd(x, g, offsets), reference.guide_add(x.double(), g.double(), offsets), p.dtype, "y")
    dg = bwd(grad, offsets)
    check(dg, reference.guide_add_backward(grad.double(), offsets), p.dtype, "dg")
    empty = torch.tensor([n == 0 for n in p.lengths], dtype=torch.bool)
    assert (dg[empty] == 0).all()


def check_fused(fwd, bwd, p: Problem, grads=("y", "normed")):
    x, g, offsets, w, gy, gn = p.make()
    y, normed = fwd(x, g, offsets, w, p.eps, p.out_dtype)
    y64, n64 = reference.guide_add_rms_norm(x.double(), g.double(), offsets, _d(w), p.eps)
    check(y, y64, p.dtype, "y")
    # normalize the rounded y in float64: the op's definition (y is rounded first)
    n64 = reference.rms_reference.rms_norm(y.double(), _d(w), p.eps)
    check(normed, n64, p.out_dtype or p.dtype, "normed")
    gy = gy if "y" in grads else None
    gn = gn if "normed" in grads else None
    dx, dg, dw = bwd(gy, gn, y, w, offsets, p.eps)
    want = reference.guide_add_rms_norm_backward(_d(gy), _d(gn), y.double(), _d(w), offsets,
                                                 p.eps)
    check(dx, want[0], p.dtype, "dx")
    check(dg, want[1], p.dtype, "dg")
    if w is None:
        assert dw is None
    else:  # a sum over all T rows: scale the half-type bound by sqrt(T)
        assert dw.dtype == w.dtype
        _check_loose(dw, want[2], REL_TOL[w.dtype] * (1 + y.shape[0] ** 0.5))


def _check_loose(got, want, tol):
    if got.numel():
        err = (got.double() - want).abs().max().item()
        assert err <= tol * max(1.0, want.abs().max().item()), (err, tol)


@given(problems())
def test_guide_add_matches_float64_reference(p):
    check_plain(cpu.guide_add_fwd, cpu.guide_add_bwd, p)


@given(problems())
def test_fused_matches_float64_reference(p):
    check_fused(cpu.guide_add_rms_norm_fwd, cpu.guide_add_rms_norm_bwd, p)


@pytest.mark.parametrize("grads", [("y",), ("normed",), ()])
def test_fused_backward_with_missing_gradients(grads):
    p = Problem((3, 0, 5, 1), 17, torch.float32, torch.float32, None, 1e-6, 4)
    check_fused(cpu.guide_add_rms_norm_fwd, cpu.guide_add_rms_norm_bwd, p, grads)


@pytest.mark.parametrize("lengths", [(), (0,), (0, 0)])
def test_no_words_and_no_bytes(lengths):
    p = Problem(lengths, 8, torch.float32, torch.float32, None, 1e-6, 0)
    check_plain(cpu.guide_add_fwd, cpu.guide_add_bwd, p)
    check_fused(cpu.guide_add_rms_norm_fwd, cpu.guide_add_rms_norm_bwd, p)


def test_float32_forward_is_exact():
    """float32: ``y`` is the exactly rounded sum, bit for bit what eager ``x + g[idx]`` gives."""
    p = Problem((4, 1, 7), 33, torch.float32, None, None, 1e-6, 9)
    x, g, offsets, *_ = p.make()
    idx = torch.repeat_interleave(torch.arange(3), torch.tensor(p.lengths))
    assert torch.equal(cpu.guide_add_fwd(x, g, offsets), x + g[idx])


def test_backward_does_not_alias_or_modify_grads():
    p = Problem((3, 2), 8, torch.float32, torch.float32, None, 1e-6, 2)
    x, g, offsets, w, gy, _ = p.make()
    y, _ = cpu.guide_add_rms_norm_fwd(x, g, offsets, w, 1e-6)
    before = gy.clone()
    dx, _, _ = cpu.guide_add_rms_norm_bwd(gy, None, y, w, offsets, 1e-6)
    assert dx.data_ptr() != gy.data_ptr()
    dx.add_(1)
    assert torch.equal(gy, before)
