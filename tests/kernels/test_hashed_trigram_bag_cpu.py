"""The CPU path of aa::hashed_trigram_bag: the torch fast-mode hash bit for bit against the
spec's numpy `hashing.fast_slots`, and forward / backward against the float64 reference.

The helpers here (`hash_ids`, `bag_problems`, `HashedProblem`, `check_forward`,
`check_backward`) are shared with the Triton and op tests.
"""

from __future__ import annotations

import dataclasses

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from aa_compile.kernels.hashed_trigram_bag import cpu, reference
from aa_compile.kernels.trigram_bag import cpu as bag_cpu
from hypothesis import given, settings

from aa_compile.models.tfree import hashing

from .test_trigram_bag_cpu import check, eager_embedding_bag, references

WWB = reference.WHOLE_WORD_BASE
#: bytes that make case variants of [a-z ]^3 patterns (and their patterns), plus a non-letter
_CASE_BYTES = b"aAzZhHeElL @[`{"


@st.composite
def trigram_id(draw):
    """A byte-trigram id: uniform, or from letters / space (lowercase patterns and their
    case variants, and near misses such as '@', '[', '`', '{' around the letter ranges)."""
    if draw(st.booleans()):
        return draw(st.integers(0, WWB - 1))
    b = [draw(st.sampled_from(_CASE_BYTES)) for _ in range(3)]
    return b[0] | b[1] << 8 | b[2] << 16


@st.composite
def hash_params(draw, max_v=2**31 - 1, max_m=12):
    """``(v, m, k_lower)``: v small (collisions, retries) or large, m <= v, k_lower in 0..m."""
    v = draw(st.one_of(st.integers(1, 40), st.integers(41, max_v)))
    m = draw(st.integers(1, min(v, max_m)))
    return v, m, draw(st.integers(0, m))


def hash_ids(ids) -> torch.Tensor:
    return torch.tensor(ids, dtype=torch.int64)


@settings(max_examples=40, deadline=None)
@given(st.lists(trigram_id(), max_size=60), hash_params(), st.booleans())
def test_torch_hash_is_bit_identical_to_spec(ids, params, unique):
    v, m, k = params
    want = hashing.fast_slots(np.array(ids, dtype=np.int64), v, m, k)
    got = cpu.materialize_slots(hash_ids(ids), v, m, k, None, unique=unique)
    assert got.dtype == torch.int64
    np.testing.assert_array_equal(got.numpy(), want.reshape(len(ids), m))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, WWB - 1), min_size=1, max_size=20),
       st.integers(0, 2**16 - 1), st.integers(0, 2**23 - 1), st.integers(1, 2**31 - 1))
def test_candidates_match_spec_over_key_range(ids, k, j, v):
    """The whole key range (k < 2**16, large j): shifts, signs and the int64 wrap-around."""
    want = hashing.fast_candidates(np.array(ids), k, np.full(len(ids), j), v)
    got = cpu.candidates(hash_ids(ids), k, j, v)
    np.testing.assert_array_equal(got.numpy(), want)


def test_lowercase_partner_matches_spec():
    ids = np.arange(0, WWB, 4099, dtype=np.int64)
    ids = np.concatenate([ids, [0x6C6548, 0x204548, 0x5A5A5A, 0x7B6161, 0x406161]])
    np.testing.assert_array_equal(cpu.lowercase_partner(torch.from_numpy(ids)).numpy(),
                                  hashing.lowercase_partner(ids))


def test_collision_rows_take_the_retry_path():
    """v = m: every trigram's slots are a permutation of range(v), so nearly every row retries."""
    ids = hash_ids(range(0, 3000, 7))
    got = cpu.fast_slots(ids, 6, 6, 0)
    assert torch.equal(got, torch.arange(6).expand(len(ids), 6))
    np.testing.assert_array_equal(cpu.fast_slots(ids, 7, 6, 3).numpy(),
                                  hashing.fast_slots(ids.numpy(), 7, 6, 3))


@dataclasses.dataclass(frozen=True)
class HashedProblem:
    v: int
    h: int
    m: int
    k_lower: int
    words: tuple[tuple[int, ...], ...]  # per word: its ids (>= WWB: whole-word rows)
    n_whole: int
    dtype: torch.dtype
    idx_dtype: torch.dtype
    seed: int

    def make(self, device="cpu"):
        """``(weight, trigram_ids, trigram_offsets, whole_word_slots or None, grad)``."""
        g = torch.Generator().manual_seed(self.seed)
        weight = torch.randn(self.v, self.h, generator=g, dtype=torch.float64).to(self.dtype)
        ids = [i for w in self.words for i in w]
        offsets = np.cumsum([0] + [len(w) for w in self.words])
        wws = None
        if self.n_whole:
            wws = torch.randint(0, self.v, (self.n_whole, self.m), generator=g)
            wws = wws.to(self.idx_dtype).to(device)
        grad = torch.randn(len(self.words), self.h, generator=g, dtype=torch.float64)
        return (weight.to(device), torch.tensor(ids, dtype=self.idx_dtype, device=device),
                torch.tensor(offsets, dtype=self.idx_dtype, device=device), wws,
                grad.to(self.dtype).to(device))


@st.composite
def bag_problems(draw, dtypes=(torch.float32, torch.float16, torch.bfloat16, torch.float64),
                 max_words=12, max_trigrams=8, hs=(1, 3, 17, 64, 129), max_v=5000, max_m=10):
    v, m, k = draw(hash_params(max_v=max_v, max_m=max_m))
    n_whole = draw(st.integers(0, 3))
    entry = trigram_id()
    if n_whole:
        entry = st.one_of(entry, entry, st.integers(WWB, WWB + n_whole - 1))
    words = draw(st.lists(st.lists(entry, max_size=max_trigrams).map(tuple), max_size=max_words))
    return HashedProblem(v=v, h=draw(st.sampled_from(hs)), m=m, k_lower=k, words=tuple(words),
                         n_whole=n_whole, dtype=draw(st.sampled_from(dtypes)),
                         idx_dtype=draw(st.sampled_from([torch.int64, torch.int32])),
                         seed=draw(st.integers(0, 2**31 - 1)))


def slot_csr(p: HashedProblem, ids, offsets, wws):
    """The problem as `aa::trigram_bag` input: (slots [n*m] from the spec, slot offsets)."""
    slots = reference.slots(ids, p.v, p.m, p.k_lower, wws)
    return slots.reshape(-1), offsets.cpu().long() * p.m


def check_forward(p: HashedProblem, got, weight, ids, offsets, wws, grad):
    """``got`` vs the float64 reference (error bounds of `test_trigram_bag_cpu.check`)."""
    idx, offs = slot_csr(p, ids, offsets, wws)
    w, g = weight.cpu(), grad.cpu()
    (want, _, _), (scale, _, _) = references(w, idx, offs, None, g)
    torch.testing.assert_close(
        reference.hashed_trigram_bag(w.double(), ids, offsets.cpu(), p.m, p.k_lower,
                                     None if wws is None else wws.cpu()), want,
        rtol=0, atol=0)
    check(got, want, scale, p.dtype, eager_embedding_bag(w, idx, offs, None, g)[0])


def check_backward(p: HashedProblem, got, weight, ids, offsets, wws, grad):
    idx, offs = slot_csr(p, ids, offsets, wws)
    w, g = weight.cpu(), grad.cpu()
    (_, dw64, _), (_, dw_s, _) = references(w, idx, offs, None, g)
    check(got, dw64, dw_s, p.dtype, eager_embedding_bag(w, idx, offs, None, g)[1])


@settings(max_examples=25, deadline=None)
@given(bag_problems())
def test_forward_matches_float64_reference(p):
    weight, ids, offsets, wws, grad = p.make()
    got = cpu.hashed_trigram_bag_fwd(weight, ids, offsets, p.m, p.k_lower, wws)
    check_forward(p, got, weight, ids, offsets, wws, grad)
    # and it *is* the trigram bag on the materialized slots, bit for bit
    idx, offs = slot_csr(p, ids, offsets, wws)
    assert torch.equal(got, bag_cpu.trigram_bag_fwd(weight, idx, offs))


@settings(max_examples=20, deadline=None)
@given(bag_problems())
def test_backward_matches_float64_reference(p):
    weight, ids, offsets, wws, grad = p.make()
    got = cpu.hashed_trigram_bag_bwd(grad, weight, ids, offsets, p.m, p.k_lower, wws)
    check_backward(p, got, weight, ids, offsets, wws, grad)


def _many_words(dtype=torch.float32):
    words = tuple(tuple((w * 7919 + t * 104729) % WWB for t in range(w % 9)) for w in range(300))
    words += ((0x6C6548, 0x6C6568, 0x6C6548), (WWB, WWB + 1, WWB))
    return HashedProblem(61, 33, 5, 2, words, 2, dtype, torch.int64, 3)


def test_backward_is_deterministic():
    p = _many_words()
    weight, ids, offsets, wws, grad = p.make()
    first = cpu.hashed_trigram_bag_bwd(grad, weight, ids, offsets, p.m, p.k_lower, wws)
    for _ in range(2):
        again = cpu.hashed_trigram_bag_bwd(grad, weight, ids, offsets, p.m, p.k_lower, wws)
        assert torch.equal(first, again)


@pytest.mark.parametrize("unique", [False, True])
def test_materialized_slots_equal_spec_with_whole_words(unique):
    p = _many_words()
    _, ids, _, wws, _ = p.make()
    got = cpu.materialize_slots(ids, p.v, p.m, p.k_lower, wws, unique=unique)
    assert torch.equal(got, reference.slots(ids, p.v, p.m, p.k_lower, wws))


def test_empty_cases():
    w = torch.randn(7, 3)
    none = torch.zeros(0, dtype=torch.int64)
    assert cpu.hashed_trigram_bag_fwd(w, none, torch.zeros(1, dtype=torch.int64), 2, 1).shape \
        == (0, 3)
    zeros = torch.zeros(3, dtype=torch.int64)
    assert torch.equal(cpu.hashed_trigram_bag_fwd(w, none, zeros, 2, 1), torch.zeros(2, 3))
    dw = cpu.hashed_trigram_bag_bwd(torch.randn(2, 3), w, none, zeros, 2, 1)
    assert torch.equal(dw, torch.zeros(7, 3))
    assert cpu.hashed_trigram_bag_fwd(torch.randn(7, 0), hash_ids([5]),
                                      torch.tensor([0, 1]), 2, 0).shape == (1, 0)
