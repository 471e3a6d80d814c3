"""Property tests: the Triton word-pool kernels against the float64 padded reference.

Without CUDA the kernels run in the Triton interpreter on CPU tensors (TRITON_INTERPRET is set
by tests/conftest.py before the kernel module is imported), so sizes and example counts are
kept small: one program per (word, head) is one Python call there.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from aa_compile.kernels.word_pool import triton_kernel
from aa_compile.ops import OPS
from hypothesis import given, settings
from hypothesis import strategies as st

from ..strategies import check_layout_invariance, op_calls
from .test_word_pool_cpu import Problem, check_all, problems

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHORT = st.one_of(st.integers(1, 6), st.sampled_from([0, 1, 17]))


def _on_device(fn):
    def call(*args):
        moved = [a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args]
        out = fn(*moved)
        return tuple(o.cpu() for o in out) if isinstance(out, tuple) else out.cpu()
    return call


FWD = _on_device(triton_kernel.word_pool_fwd)
BWD = _on_device(triton_kernel.word_pool_bwd)


@settings(max_examples=6, deadline=None)
@given(problems(dtypes=DTYPES, max_words=4, lengths=SHORT))
def test_triton_matches_float64_reference(p):
    check_all(FWD, BWD, p)


@pytest.mark.parametrize("lengths, heads, shared", [
    ((), (2, 2), True), ((0,), (2, 1), False), ((0, 3, 0), (4, 2), True),
    ((100,), (2, 1), True), ((1, 16, 17, 33), (2, 2), False),
])
def test_edge_words(lengths, heads, shared):
    """Empty words, no words, a word at the byte limit, tile boundaries (BLOCK_L = 16)."""
    check_all(FWD, BWD, Problem(lengths, *heads, 5, shared, torch.float32, None, 1.0, 7))


def test_backward_is_deterministic():
    p = Problem((3, 9, 1, 20), 2, 1, 8, True, torch.float32, None, 1.0, 3)
    q, k, v, offsets, grad = p.make()
    first = BWD(grad, q, k, v, offsets, None)
    second = BWD(grad, q, k, v, offsets, None)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def _args(t=5, h=2, hkv=2, d=4, w=2, dtype=torch.float32):
    offsets = torch.tensor([0, 2, t]) if w == 2 else torch.tensor([0, t])
    return (torch.randn(w, h, d, dtype=dtype), torch.randn(t, hkv, d, dtype=dtype),
            torch.randn(t, hkv, d, dtype=dtype), offsets)


@pytest.mark.parametrize("bad, name", [
    (lambda a: (a[0].double(), a[1].double(), a[2].double(), a[3]), "q: float64"),
    (lambda a: (a[0], a[1][:, :, :3], a[2][:, :, :3], a[3]), "k's head dimension"),
    (lambda a: (a[0], a[1], a[2][:4], a[3]), "v must have k's shape"),
    (lambda a: (a[0][:1, :1], a[1], a[2], a[3]), "q's head count 1"),
    (lambda a: (a[0], a[1], a[2], a[3].float()), "word_offsets must be an int64"),
    (lambda a: (torch.randn(3, 2, 4), a[1], a[2], a[3]), "q must have one query per word"),
])
def test_bad_input_raises_naming_argument(bad, name):
    with pytest.raises(ValueError, match=name):
        triton_kernel.word_pool_fwd(*bad(_args()))


@settings(max_examples=8, deadline=None)
@given(data=st.data())
def test_any_input_layout(data):
    """Strided / transposed / permuted / expanded q, k, v and grad give what contiguous ones
    give (the offsets keep their values: the kernels trust them)."""
    samples = [s for s in OPS["aa::word_pool_backward"].samples(DEVICE)
               if DEVICE != "cpu" or s[0][1].dtype == torch.float32]
    call = data.draw(op_calls(samples, keep_values=(4,)), label="call")
    check_layout_invariance(triton_kernel.word_pool_bwd, call, "word_pool_bwd")
    fwd = data.draw(op_calls([(a[1:], k) for a, k in samples], keep_values=(3,)), label="fwd")
    check_layout_invariance(triton_kernel.word_pool_fwd, fwd, "word_pool_fwd")
