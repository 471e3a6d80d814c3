"""Property tests: the Triton guide-add kernels (plain and fused with RMSNorm) against the
float64 reference. Without CUDA they run in the Triton interpreter on CPU tensors, so sizes and
example counts are small."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from aa_compile.kernels.guide_add import triton_kernel
from hypothesis import given, settings
from hypothesis import strategies as st

from .test_guide_add_cpu import Problem, check_fused, check_plain, problems

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHORT = st.one_of(st.integers(1, 6), st.sampled_from([0, 1, 9, 17]))


def _on_device(fn):
    def call(*args):
        moved = [a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args]
        out = fn(*moved)
        if isinstance(out, tuple):
            return tuple(None if o is None else o.cpu() for o in out)
        return out.cpu()
    return call


FWD, BWD = _on_device(triton_kernel.guide_add_fwd), _on_device(triton_kernel.guide_add_bwd)
NFWD = _on_device(triton_kernel.guide_add_rms_norm_fwd)
NBWD = _on_device(triton_kernel.guide_add_rms_norm_bwd)


@settings(max_examples=8, deadline=None)
@given(problems(dtypes=DTYPES, max_words=6, lengths=SHORT))
def test_plain_matches_float64_reference(p):
    check_plain(FWD, BWD, p)


@settings(max_examples=8, deadline=None)
@given(problems(dtypes=DTYPES, max_words=6, lengths=SHORT))
def test_fused_matches_float64_reference(p):
    check_fused(NFWD, NBWD, p)


@pytest.mark.parametrize("lengths", [(), (0,), (0, 3, 0), (100,)])
def test_edge_words(lengths):
    p = Problem(lengths, 33, torch.float32, torch.float32, None, 1e-6, 1)
    check_plain(FWD, BWD, p)
    check_fused(NFWD, NBWD, p)


@pytest.mark.parametrize("grads", [("y",), ("normed",)])
def test_fused_backward_with_missing_gradients(grads):
    p = Problem((3, 0, 5, 1), 17, torch.bfloat16, torch.float32, None, 1e-6, 4)
    check_fused(NFWD, NBWD, p, grads)


def test_more_words_than_backward_programs():
    """Each backward program owns a range of several words (8 programs off a GPU)."""
    p = Problem(tuple(i % 5 for i in range(20)), 24, torch.float32,
                torch.float32, None, 1e-6, 6)
    check_fused(NFWD, NBWD, p)
    x, g, offsets, w, gy, gn = p.make()
    y, _ = NFWD(x, g, offsets, w, 1e-6, None)
    first, second = NBWD(gy, gn, y, w, offsets, 1e-6), NBWD(gy, gn, y, w, offsets, 1e-6)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_wide_rows_fall_back_to_unfused(monkeypatch):
    monkeypatch.setattr(triton_kernel, "MAX_FUSED_D", 16)
    p = Problem((3, 1, 0, 4), 33, torch.float32, torch.float32, None, 1e-6, 8)
    check_fused(NFWD, NBWD, p)


@pytest.mark.parametrize("call, match", [
    (lambda: triton_kernel.guide_add_fwd(torch.randn(3, 4).double(), torch.randn(1, 4).double(),
                                         torch.tensor([0, 3])), "x: float64"),
    (lambda: triton_kernel.guide_add_fwd(torch.randn(3, 4), torch.randn(2, 4),
                                         torch.tensor([0, 3])), "g must have one row per word"),
    (lambda: triton_kernel.guide_add_fwd(torch.randn(3, 4), torch.randn(1, 5),
                                         torch.tensor([0, 3])), "g must be as wide as x"),
    (lambda: triton_kernel.guide_add_rms_norm_fwd(torch.randn(3, 4), torch.randn(1, 4),
                                                  torch.tensor([0, 3]), torch.randn(5), 1e-6),
     r"weight must have shape \(4,\)"),
])
def test_bad_input_raises_naming_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()
