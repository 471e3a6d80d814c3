"""Property tests of the CPU path of aa::dictionary_score (scores and top-k) vs float64.

The helpers here (`problems`, `Problem`, `check_scores`, `check_topk`) are shared with the
Triton and op tests.
"""

from __future__ import annotations

import dataclasses

import hypothesis.strategies as st
import pytest
import torch
from aa_compile.kernels.dictionary_score import cpu, reference
from hypothesis import given

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@dataclasses.dataclass(frozen=True)
class Problem:
    v: int
    b: int
    m: int
    sizes: tuple[int, ...]  # entries per word (0: a word without entries)
    ties: int  # this many copies of word 0's pattern appended: exactly tied scores
    dtype: torch.dtype
    idx_dtype: torch.dtype
    seed: int

    def make(self, device="cpu"):
        """``(probs, word_offsets, slots, slot_weights, n_trigrams, m)`` on ``device``."""
        g = torch.Generator().manual_seed(self.seed)
        sizes = list(self.sizes) + [self.sizes[0]] * self.ties if self.sizes else []
        offsets = torch.zeros(len(sizes) + 1, dtype=torch.int64)
        offsets[1:] = torch.tensor(sizes, dtype=torch.int64).cumsum(0)
        nnz = int(offsets[-1])
        slots = torch.randint(0, self.v, (nnz,), generator=g)
        edge = torch.rand(1, generator=g).item()
        weights = torch.where(torch.rand(nnz, generator=g) < 0.3, edge, 1.0)
        n_tri = torch.randint(0, 9, (len(sizes),), generator=g)
        if self.ties and self.sizes:
            n0 = self.sizes[0]
            for c in range(1, self.ties + 1):
                start = int(offsets[len(self.sizes) + c - 1])
                slots[start:start + n0] = slots[:n0]
                weights[start:start + n0] = weights[:n0]
                n_tri[len(self.sizes) + c - 1] = n_tri[0]
        probs = torch.rand(self.b, self.v, generator=g, dtype=torch.float64).to(self.dtype)
        out = (probs, offsets.to(self.idx_dtype), slots.to(self.idx_dtype), weights, n_tri)
        return (*(t.to(device) for t in out), self.m)

    @property
    def n_words(self) -> int:
        return len(self.sizes) + (self.ties if self.sizes else 0)


@st.composite
def problems(draw, dtypes=tuple(DTYPES), max_words=40, max_v=300, max_b=5):
    n = draw(st.integers(0, max_words))
    size = st.one_of(st.just(0), st.integers(1, 12), st.integers(13, 80))
    return Problem(
        v=draw(st.integers(1, max_v)),
        b=draw(st.integers(1, max_b)),
        m=draw(st.integers(1, 10)),
        sizes=tuple(draw(st.lists(size, min_size=n, max_size=n))),
        ties=draw(st.sampled_from([0, 0, 2, 5])),
        dtype=draw(st.sampled_from(dtypes)),
        idx_dtype=draw(st.sampled_from([torch.int32, torch.int64])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def references(probs, offsets, slots, weights, n_tri, m):
    """float64 scores and their error scale (see `check_scores`)."""
    args = [t.cpu() for t in (probs, offsets, slots, weights, n_tri)]
    p64 = args[0].double()
    want = reference.scores(p64, *args[1:3], args[3].double(), args[4], m)
    # |S| / on + (|S| + |total|) / off, each sum weighted by its length (gamma_n bound)
    rows = reference.word_ids(args[1], args[2].numel())
    raw = p64.new_zeros(p64.shape[0], args[1].numel() - 1)
    raw.index_add_(1, rows, (p64[:, args[2].long()] * args[3].double()).abs())
    on = (m * args[4]).double()
    off = (p64.shape[1] - on).clamp(min=1)
    total = p64.abs().sum(-1, keepdim=True)
    n = args[1].diff().double()
    scale = (n + 4) * raw / on + ((n + 4) * raw + (p64.shape[1] + 4) * total) / off
    return want, scale.masked_fill(args[4] == 0, 0)


def check_scores(got, want64, scale64, dtype):
    """Within ``eps * scale`` of the float64 answer, ``eps`` of the compute dtype (float32;
    float64 for float64 probs): every summation order and a few roundings of the
    normalisation are inside that bound; -inf exactly where the reference has it."""
    acc = reference.compute_dtype(dtype)
    assert got.dtype == acc, (got.dtype, acc)
    assert tuple(got.shape) == tuple(want64.shape)
    got64 = got.detach().double().cpu()
    inf = torch.isinf(want64)
    assert torch.equal(torch.isinf(got64), inf)
    err = (got64 - want64).abs()[~inf]
    bound = torch.finfo(acc).eps * scale64[~inf]
    bad = err > bound
    assert not bad.any(), f"{int(bad.sum())} scores off; worst err {err.max().item():.3g}"


def check_topk(values, indices, all_scores, want64, scale64, k):
    """Top-k of the kernel's own scores in the documented order (descending, ties by lower
    word index: the reference's stable sort), values close to the float64 scores."""
    assert indices.dtype == torch.int64 and tuple(indices.shape) == (all_scores.shape[0], k)
    ref_v, ref_i = reference.ordered_topk(all_scores.cpu(), k)
    assert torch.equal(indices.cpu(), ref_i)
    assert torch.equal(values.cpu(), ref_v)
    check_scores(values, want64.gather(1, ref_i), scale64.gather(1, ref_i), values.dtype)


def run_and_check(fn, p: Problem, k: int, device="cpu"):
    probs, offsets, slots, weights, n_tri, m = p.make(device)
    want, scale = references(probs, offsets, slots, weights, n_tri, m)
    score, none = fn(probs, offsets, slots, weights, n_tri, m, 0)
    assert none.shape == (p.b, 0) and none.dtype == torch.int64
    check_scores(score, want, scale, p.dtype)
    if k:
        values, indices = fn(probs, offsets, slots, weights, n_tri, m, k)
        check_topk(values, indices, score, want, scale, k)


@given(problems(), st.data())
def test_matches_float64_reference(p, data):
    k = data.draw(st.integers(0, p.n_words))
    run_and_check(cpu.dictionary_score, p, k)


@pytest.mark.parametrize("b", [1, 2, 8])
def test_large_vocab_fbgemm_path(b):
    """v = 32000 and a few thousand realistic words (the B = 1 padding included)."""
    sizes = tuple(int(s) for s in torch.randint(20, 90, (3000,),
                                                generator=torch.Generator().manual_seed(b)))
    p = Problem(32000, b, 10, sizes, 3, torch.float32, torch.int64, b)
    run_and_check(cpu.dictionary_score, p, 50)


def test_ties_are_ordered_by_word_index():
    p = Problem(50, 3, 2, (5, 3, 7), 6, torch.float32, torch.int64, 0)
    probs, offsets, slots, weights, n_tri, m = p.make()
    n_tri[0] = 2
    n_tri[3:] = 2
    _, indices = cpu.dictionary_score(probs, offsets, slots, weights, n_tri, m, 9)
    tied = [0, 3, 4, 5, 6, 7, 8]
    for row in indices.tolist():
        pos = [row.index(w) for w in tied]
        assert pos == sorted(pos) and pos == list(range(pos[0], pos[0] + len(tied)))


def test_words_without_trigrams_are_minus_inf_and_rank_last_by_index():
    p = Problem(20, 2, 3, (4, 2, 0, 3), 0, torch.float32, torch.int64, 1)
    probs, offsets, slots, weights, n_tri, m = p.make()
    n_tri[:] = torch.tensor([0, 2, 0, 1])
    values, indices = cpu.dictionary_score(probs, offsets, slots, weights, n_tri, m, 4)
    assert torch.equal(indices[:, 2:], torch.tensor([[0, 2], [0, 2]]))
    assert torch.isinf(values[:, 2:]).all()


def test_nan_scores_rank_first():
    p = Problem(10, 2, 1, (2, 2, 2, 2), 0, torch.float32, torch.int64, 2)
    probs, offsets, slots, weights, n_tri, m = p.make()
    n_tri[:] = 1
    slots[:] = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])
    probs[0, 4] = float("nan")  # word 2 and the row total
    score, _ = cpu.dictionary_score(probs, offsets, slots, weights, n_tri, m, 0)
    values, indices = cpu.dictionary_score(probs, offsets, slots, weights, n_tri, m, 2)
    assert torch.equal(indices, reference.ordered_topk(score, 2)[1])
    assert torch.isnan(values[0]).all() and indices[0].tolist() == [0, 1]


def test_empty_dictionary_and_empty_batch():
    z = torch.zeros(1, dtype=torch.int64)
    none = torch.zeros(0, dtype=torch.int64)
    s, i = cpu.dictionary_score(torch.rand(2, 7), z, none, torch.zeros(0), none, 1, 0)
    assert s.shape == (2, 0) and i.shape == (2, 0)
    offs = torch.tensor([0, 1])
    s, i = cpu.dictionary_score(torch.rand(0, 7), offs, torch.tensor([3]), torch.ones(1),
                                torch.tensor([1]), 1, 1)
    assert s.shape == (0, 1) and i.shape == (0, 1)
