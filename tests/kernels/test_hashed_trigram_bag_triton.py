"""The Triton aa::hashed_trigram_bag kernels: the in-kernel fast-mode hash bit for bit against
the spec's `hashing.fast_slots`, forward / backward against the float64 reference.

Without CUDA the kernels run in the Triton interpreter on CPU tensors (TRITON_INTERPRET must be
set before the kernel module is imported). Every trigram costs tens of milliseconds there, so
the problems are tiny and the example counts low.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

import hypothesis.strategies as st
import numpy as np
from aa_compile.kernels.hashed_trigram_bag import reference, triton_kernel
from hypothesis import given, settings

from aa_compile.models.tfree import hashing

from .test_hashed_trigram_bag_cpu import (
    WWB,
    HashedProblem,
    bag_problems,
    check_backward,
    check_forward,
    hash_params,
    trigram_id,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SMALL = {"dtypes": DTYPES, "max_words": 4, "max_trigrams": 3, "hs": (1, 17, 300),
         "max_v": 3000, "max_m": 10}


@settings(max_examples=8, deadline=None)
@given(st.lists(trigram_id(), min_size=1, max_size=6), hash_params(max_m=10))
def test_in_kernel_hash_is_bit_identical_to_spec(ids, params):
    v, m, k = params
    got = triton_kernel.trigram_slots(torch.tensor(ids, device=DEVICE), v, m, k)
    want = hashing.fast_slots(np.array(ids, dtype=np.int64), v, m, k)
    np.testing.assert_array_equal(got.cpu().numpy(), want)


def test_in_kernel_hash_collisions_variants_and_whole_words():
    """Small v (retries; v == m: every trigram retries), case variants ("Hel", "HEL") and their
    pattern sharing some / all slots, whole-word rows, int32 ids, the largest id 2**24 - 1."""
    ids = [0x6C6548, 0x6C6568, WWB + 1, WWB - 1, 0x4C4548, WWB]
    wws = torch.tensor([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]], dtype=torch.int32, device=DEVICE)
    for v, m, k in ((5, 5, 2), (12, 5, 2), (1000, 5, 2), (1000, 5, 5)):
        t = torch.tensor(ids, dtype=torch.int32, device=DEVICE)
        got = triton_kernel.trigram_slots(t, v, m, k, wws)
        assert torch.equal(got.cpu(), reference.slots(t.cpu(), v, m, k, wws.cpu()))


@settings(max_examples=6, deadline=None)
@given(bag_problems(**SMALL))
def test_forward_matches_float64_reference(p):
    weight, ids, offsets, wws, grad = p.make(DEVICE)
    got = triton_kernel.hashed_trigram_bag_fwd(weight, ids, offsets, p.m, p.k_lower, wws)
    check_forward(p, got, weight, ids.cpu(), offsets, wws, grad)


WORDS = ((0x6C6548, 0x6C6568, WWB), (), (WWB + 1, 0x414141, 12345), (0x4C4548,))


@pytest.mark.parametrize(("v", "m", "k_lower"), [(40, 4, 2), (7, 6, 3)])
def test_forward_with_case_variants_and_whole_words(v, m, k_lower):
    p = HashedProblem(v, 19, m, k_lower, WORDS, 2, torch.float32, torch.int64, 1)
    weight, ids, offsets, wws, grad = p.make(DEVICE)
    got = triton_kernel.hashed_trigram_bag_fwd(weight, ids, offsets, p.m, p.k_lower, wws)
    check_forward(p, got, weight, ids.cpu(), offsets, wws, grad)


@pytest.mark.parametrize("deterministic", [True, False])
def test_backward_matches_float64_reference(deterministic):
    words = WORDS
    for dtype in (torch.float32, torch.bfloat16):
        p = HashedProblem(40, 19, 4, 2, words, 2, dtype, torch.int64, 1)
        weight, ids, offsets, wws, grad = p.make(DEVICE)
        got = triton_kernel.hashed_trigram_bag_bwd(grad, weight, ids, offsets, p.m, p.k_lower,
                                                   wws, deterministic)
        check_backward(p, got, weight, ids.cpu(), offsets, wws, grad)


def test_large_m_falls_back_to_materialized_slots(monkeypatch):
    monkeypatch.setattr(triton_kernel, "MAX_FUSED_M", 2)
    p = HashedProblem(50, 5, 3, 1, ((0x6C6548, 7), (), (WWB,)), 1, torch.float32, torch.int64, 2)
    weight, ids, offsets, wws, grad = p.make(DEVICE)
    got = triton_kernel.hashed_trigram_bag_fwd(weight, ids, offsets, p.m, p.k_lower, wws)
    check_forward(p, got, weight, ids.cpu(), offsets, wws, grad)
    assert torch.equal(triton_kernel.trigram_slots(ids, p.v, p.m, p.k_lower, wws).cpu(),
                       reference.slots(ids.cpu(), p.v, p.m, p.k_lower, wws.cpu()))


def test_empty_cases():
    w = torch.randn(7, 3, device=DEVICE)
    none = torch.zeros(0, dtype=torch.int64, device=DEVICE)
    offsets = torch.zeros(3, dtype=torch.int64, device=DEVICE)
    out = triton_kernel.hashed_trigram_bag_fwd(w, none, offsets[:1], 2, 1)
    assert out.shape == (0, 3)
    assert torch.equal(triton_kernel.hashed_trigram_bag_fwd(w, none, offsets, 2, 1),
                       torch.zeros(2, 3, device=DEVICE))
    for det in (True, False):
        dw = triton_kernel.hashed_trigram_bag_bwd(w[:2], w, none, offsets, 2, 1, None, det)
        assert torch.equal(dw, torch.zeros_like(w))


def test_float64_is_refused_naming_weight():
    w = torch.randn(7, 3, dtype=torch.float64, device=DEVICE)
    ids = torch.tensor([5], device=DEVICE)
    with pytest.raises(ValueError, match=r"^hashed_trigram_bag_fwd: weight: torch.float64"):
        triton_kernel.hashed_trigram_bag_fwd(w, ids, torch.tensor([0, 1], device=DEVICE), 2, 0)
