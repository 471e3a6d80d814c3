"""Property tests of the segment (CPU) path of aa::word_pool against the float64 padded
reference: random word-length distributions (1-byte words, words at HAT's 100-byte limit,
empty words), W = 0 / T = 0, odd D, GQA, shared and per-word queries, every dtype."""

from __future__ import annotations

import dataclasses

import hypothesis.strategies as st
import pytest
import torch
from aa_compile.kernels.word_pool import cpu, reference
from hypothesis import given, settings

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
#: max error / max(1, max |float64 answer|): float32 and float64 from accumulation order; half
#: types from the one rounding of the output (2 ulps), nothing from the float32 softmax
REL_TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2 * 2**-8,
           torch.float16: 2 * 2**-11}
HEADS = [(1, 1), (4, 4), (4, 2), (6, 2), (3, 1)]


@dataclasses.dataclass(frozen=True)
class Problem:
    lengths: tuple[int, ...]
    heads: int
    kv_heads: int
    dim: int
    shared_q: bool
    dtype: torch.dtype
    scale: float | None
    magnitude: float
    seed: int

    @property
    def n_words(self) -> int:
        return len(self.lengths)

    def make(self):
        """``(q, k, v, offsets, grad)``: values drawn in float64, then cast."""
        g = torch.Generator().manual_seed(self.seed)
        offsets = torch.zeros(self.n_words + 1, dtype=torch.int64)
        offsets[1:] = torch.tensor(self.lengths, dtype=torch.int64).cumsum(0)
        t = int(offsets[-1])

        def randn(*shape, scale=1.0):
            return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(self.dtype)

        q = randn(1 if self.shared_q else self.n_words, self.heads, self.dim,
                  scale=self.magnitude)
        k = randn(t, self.kv_heads, self.dim, scale=self.magnitude)
        v = randn(t, self.kv_heads, self.dim)
        grad = randn(self.n_words, self.heads, self.dim)
        return q, k, v, offsets, grad


word_lengths = st.one_of(
    st.integers(1, 12),  # mostly short words, as in text
    st.sampled_from([0, 1, 1, 99, 100]),  # empty words, single bytes, the byte limit
)


@st.composite
def problems(draw, dtypes=DTYPES, max_words=12, lengths=word_lengths):
    heads, kv_heads = draw(st.sampled_from(HEADS))
    return Problem(
        lengths=tuple(draw(st.lists(lengths, min_size=0, max_size=max_words))),
        heads=heads, kv_heads=kv_heads,
        dim=draw(st.sampled_from([1, 3, 8, 17, 64])),
        shared_q=draw(st.booleans()),
        dtype=draw(st.sampled_from(dtypes)),
        scale=draw(st.sampled_from([None, 0.25, 1.3])),
        magnitude=draw(st.sampled_from([0.3, 1.0, 4.0])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def references(q, k, v, offsets, grad, scale):
    """float64 ``(out, dq, dk, dv)`` on the (already rounded) inputs."""
    d64 = [t.double() for t in (q, k, v)]
    out = reference.word_pool(*d64, offsets, scale)
    return (out, *reference.word_pool_backward(grad.double(), *d64, offsets, scale))


def check(got, want, dtype, name=""):
    assert got.dtype == dtype, name
    assert got.shape == want.shape, (name, got.shape, want.shape)
    assert not got.isnan().any(), name
    if got.numel() == 0:
        return
    err = (got.double() - want).abs().max().item()
    bound = REL_TOL[dtype] * max(1.0, want.abs().max().item())
    assert err <= bound, (name, err, bound)


def check_all(fwd, bwd, p: Problem):
    q, k, v, offsets, grad = p.make()
    wants = references(q, k, v, offsets, grad, p.scale)
    out = fwd(q, k, v, offsets, p.scale)
    dq, dk, dv = bwd(grad, q, k, v, offsets, p.scale)
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), wants):
        check(got, want, p.dtype, name)
    empty = torch.tensor([n == 0 for n in p.lengths], dtype=torch.bool)
    if empty.any():  # empty words: exact zero rows (and no gradient into a per-word query)
        assert (out[empty] == 0).all()
        if not p.shared_q:
            assert (dq[empty] == 0).all()


@given(problems())
def test_cpu_matches_float64_reference(p):
    check_all(cpu.word_pool_fwd, cpu.word_pool_bwd, p)


@pytest.mark.parametrize("shared", [True, False])
def test_no_words_and_no_bytes(shared):
    for lengths in ((), (0,), (0, 0, 0)):
        check_all(cpu.word_pool_fwd, cpu.word_pool_bwd,
                  Problem(lengths, 4, 2, 5, shared, torch.float32, None, 1.0, 0))


def test_reference_is_sdpa_with_key_mask():
    """The reference is what HAT's WordPooling computes: SDPA over padded words with a key mask
    (``repeat_interleave`` of the key heads for GQA)."""
    p = Problem((3, 1, 7, 2, 100), 4, 2, 8, False, torch.float64, None, 1.0, 3)
    q, k, v, offsets, _ = p.make()
    index, mask = reference.grid(offsets)
    kk = k.repeat_interleave(2, dim=1)[index].transpose(1, 2)  # [W, H, L, D]
    vv = v.repeat_interleave(2, dim=1)[index].transpose(1, 2)
    want = torch.nn.functional.scaled_dot_product_attention(
        q[:, :, None], kk, vv, attn_mask=mask[:, None, None, :])[:, :, 0]
    torch.testing.assert_close(reference.word_pool(q, k, v, offsets), want)
    torch.testing.assert_close(cpu.word_pool_fwd(q, k, v, offsets), want)


def test_large_scores_do_not_overflow():
    """Scores of +-1e4 (exp would overflow without the per-word max) stay finite."""
    p = Problem((5, 1, 30), 2, 2, 4, True, torch.float32, 1.0, 60.0, 1)
    check_all(cpu.word_pool_fwd, cpu.word_pool_bwd, p)


def test_inputs_not_modified():
    p = Problem((4, 2, 9), 4, 2, 6, False, torch.float32, None, 1.0, 5)
    q, k, v, offsets, grad = p.make()
    before = [t.clone() for t in (q, k, v, grad)]
    cpu.word_pool_fwd(q, k, v, offsets)
    cpu.word_pool_bwd(grad, q, k, v, offsets)
    for a, b in zip(before, (q, k, v, grad)):
        assert torch.equal(a, b)


@settings(max_examples=10)
@given(problems(dtypes=[torch.float32], max_words=60,
                lengths=st.integers(1, 9)))
def test_many_short_words(p):
    """Text-like batches: many words of 1..9 bytes."""
    check_all(cpu.word_pool_fwd, cpu.word_pool_bwd, p)
