"""The AVX2 float32 CPU forward of aa::trigram_bag (``kernels/trigram_bag/cpu_avx2.py``): float64
reference and ATen bit-equality over odd shapes, empty bags / input, per-sample weights, thread
counts; its own value checks; the ATen fallback (``ENABLED`` off); the plain
``aa::trigram_bag_cpu`` op that compiled graphs call; and the numpy presorted CSR conversion."""

from __future__ import annotations

import threading

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from aa_compile.kernels.trigram_bag import cpu, cpu_avx2, reference
from hypothesis import given, settings

import aa_compile  # noqa: F401  (defines torch.ops.aa.*)

from .kernels.test_trigram_bag_cpu import Problem, check, eager_embedding_bag, problems, references

needs_kernel = pytest.mark.skipif(not cpu_avx2.available(),
                                  reason="no AVX2/FMA or no C compiler here")
F32 = (torch.float32,)
HS = (1, 3, 7, 8, 9, 17, 47, 64, 129)  # every tail length of the 8-lane loop


def _aten(weight, indices, offsets, psw):
    return torch.ops.aten._embedding_bag_forward_only(weight, indices, offsets, False, 0, False,
                                                      psw, True)[0]


@needs_kernel
@settings(max_examples=60, deadline=None)
@given(problems(dtypes=F32, hs=HS, max_bags=30), st.sampled_from([1, 2, 3]))
def test_matches_float64_reference_and_aten_bits(p, threads):
    """Any shape, empty bags, repeated slots, psw, int32/int64: within the float64 bound, the
    same bits as ATen's kernel (same operations in the same order), for every thread count."""
    weight, indices, offsets, psw, grad = p.make()
    out = cpu_avx2.bag_sum(weight, indices, offsets, psw, threads=threads)
    (want, _, _), (scale, _, _) = references(weight, indices, offsets, psw, grad)
    check(out, want, scale, torch.float32, eager_embedding_bag(weight, indices, offsets, psw,
                                                               grad)[0])
    if offsets.numel() > 1 and indices.numel():
        assert torch.equal(out, _aten(weight, indices, offsets, psw))
    for t in (1, 4):
        assert torch.equal(cpu_avx2.bag_sum(weight, indices, offsets, psw, threads=t), out)
    # the op's CPU path runs this kernel for float32
    assert torch.equal(cpu.trigram_bag_fwd(weight, indices, offsets, psw), out)


@needs_kernel
@pytest.mark.parametrize("h", [1, 64, 1000])
def test_many_bags_on_threads_same_bits(h, monkeypatch):
    """Enough work for several chunks per thread (nnz-balanced splits of very uneven bags), a
    large output (huge-page advised), a strided weight; also two Python threads at once (the
    second runs serially while the pool is busy)."""
    monkeypatch.setattr(cpu_avx2, "PARALLEL_GRAIN", 1)
    sizes = tuple((i * 37) % 97 if i % 13 else 0 for i in range(1200 if h == 1000 else 600))
    weight, indices, offsets, psw, _ = Problem(300, h, sizes, False, torch.float32,
                                               torch.int64, True, 3).make()
    want = _aten(weight, indices, offsets, psw)
    for t in (1, 2, 3):
        assert torch.equal(cpu_avx2.bag_sum(weight, indices, offsets, psw, threads=t), want)
    wide = torch.zeros(300, h + 5)
    wide[:, 2:h + 2] = weight  # rows h + 5 apart, not contiguous as a whole
    assert torch.equal(cpu_avx2.bag_sum(wide[:, 2:h + 2], indices, offsets, psw, threads=2), want)
    results = []

    def work():
        results.extend(cpu_avx2.bag_sum(weight, indices, offsets, psw, threads=2)
                       for _ in range(3))

    workers = [threading.Thread(target=work) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert len(results) == 6 and all(torch.equal(r, want) for r in results)


@needs_kernel
def test_empty_inputs():
    w = torch.randn(5, 9)
    none = torch.zeros(0, dtype=torch.int64)
    assert cpu_avx2.bag_sum(w, none, torch.zeros(1, dtype=torch.int64), None).shape == (0, 9)
    out = cpu_avx2.bag_sum(w, none, torch.zeros(4, dtype=torch.int32), None)
    assert torch.equal(out, torch.zeros(3, 9))
    out = cpu_avx2.bag_sum(torch.randn(5, 0), torch.tensor([1, 2]), torch.tensor([0, 1, 2]), None)
    assert out.shape == (2, 0)


@needs_kernel
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("bad", [-1, 7, 2**31 - 1])
def test_out_of_range_index_raises(idx_dtype, bad):
    w = torch.randn(7, 16)
    indices = torch.tensor([1, 2, 3, bad, 4, 5], dtype=idx_dtype)
    offsets = torch.tensor([0, 2, 6])
    with pytest.raises(RuntimeError, match=rf"indices must lie in \[0, 7\).*found {bad}"):
        cpu_avx2.bag_sum(w, indices, offsets, None, threads=2)
    with pytest.raises(ValueError, match=rf"indices must lie in \[0, 7\).*found {bad}"):
        torch.ops.aa.trigram_bag(w, indices, offsets)
    with pytest.raises(RuntimeError, match=r"indices must lie in \[0, 7\)"):
        torch.ops.aa.trigram_bag_cpu(w, indices, offsets)


@needs_kernel
@pytest.mark.parametrize("offsets", [[1, 3, 6], [0, 3, 5], [0, 4, 3, 6], [0, 3, 7]])
def test_malformed_offsets_raise(offsets):
    w, indices = torch.randn(7, 16), torch.tensor([1, 2, 3, 4, 5, 6])
    for o in (torch.tensor(offsets), torch.tensor(offsets, dtype=torch.int32)):
        with pytest.raises(RuntimeError, match="offsets must start at 0, be non-decreasing"):
            cpu_avx2.bag_sum(w, indices, o, None)
        with pytest.raises(RuntimeError, match="offsets must start at 0, be non-decreasing"):
            torch.ops.aa.trigram_bag_cpu(w, indices, o)
    with pytest.raises(RuntimeError, match="offsets must start at 0"):  # checked with h == 0
        cpu_avx2.bag_sum(torch.randn(7, 0), indices, torch.tensor(offsets), None)


@pytest.mark.parametrize("psw", [False, True])
def test_fallback_to_aten_when_disabled(monkeypatch, psw):
    """``ENABLED = False``: every path runs ATen's kernel, with the same results (bits, where
    the kernel is available to compare) and the same errors from the plain op."""
    weight, indices, offsets, p, grad = Problem(40, 33, (5, 0, 17, 3, 0, 9), False,
                                                torch.float32, torch.int32, psw, 9).make()
    native = cpu_avx2.available()
    got = cpu.trigram_bag_fwd(weight, indices, offsets, p)
    lean = torch.ops.aa.trigram_bag_cpu(weight, indices, offsets, p)
    monkeypatch.setattr(cpu_avx2, "ENABLED", False)
    assert not cpu_avx2.available() and not cpu.native(weight)
    with pytest.raises(RuntimeError, match="not available"):
        cpu_avx2.bag_sum(weight, indices, offsets, p)
    want = cpu.trigram_bag_fwd(weight, indices, offsets, p)
    assert torch.equal(want, _aten(weight, indices, offsets, p))
    assert torch.equal(torch.ops.aa.trigram_bag_cpu(weight, indices, offsets, p), want)
    if native:
        assert torch.equal(got, want) and torch.equal(lean, want)
    (want64, _, _), (scale, _, _) = references(weight, indices, offsets, p, grad)
    check(want, want64, scale, torch.float32)
    with pytest.raises(RuntimeError, match="offsets must start at 0, be non-decreasing"):
        torch.ops.aa.trigram_bag_cpu(weight, indices, torch.tensor([0, 5, 5, 22, 25, 25, 35]))
    bad = indices.clone()
    bad[3] = 40
    with pytest.raises(RuntimeError, match=r"valid range \[0, 40\)"):
        torch.ops.aa.trigram_bag_cpu(weight, bad, offsets, p)


def test_compiled_forward_calls_the_plain_op():
    """Under backend="aa" the float32 CPU forward is ``aa::trigram_bag_cpu`` (kernel or ATen
    fallback), with the op's gradient, equal to F.embedding_bag."""
    weight, indices, offsets, _, grad = Problem(30, 24, (3, 0, 6, 2, 9), False, torch.float32,
                                                torch.int64, False, 12).make()
    torch._dynamo.reset()
    compiled = torch.compile(lambda w, i, o: torch.ops.aa.trigram_bag(w, i, o) + 1, backend="aa")
    w1, w2 = weight.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    out = compiled(w1, indices, offsets)
    out.backward(grad)
    want = F.embedding_bag(indices, w2, offsets, mode="sum", include_last_offset=True) + 1
    want.backward(grad)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    torch.testing.assert_close(w1.grad, w2.grad)
    torch._dynamo.reset()


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 30), st.integers(1, 4), st.integers(0, 6),
       st.sampled_from([torch.int32, torch.int64]), st.integers(0, 2**31 - 1))
def test_presorted_words_to_csr_matches_the_reference(n, m, extra_words, dtype, seed):
    """The numpy path for word ids in order (binary-searched offsets): the reference CSR, with
    words without trigrams in the middle and at the end."""
    g = torch.Generator().manual_seed(seed)
    n_words = extra_words + (int(torch.randint(1, 8, (1,), generator=g)) if n else 0)
    slots = torch.randint(0, 50, (n, m), generator=g).to(dtype)
    word = torch.sort(torch.randint(0, max(n_words, 1), (n,), generator=g)).values.to(dtype)
    got = torch.ops.aa.tfree_words_to_csr(slots, word, n_words)
    want = reference.words_to_csr(slots, word, n_words)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and torch.equal(a, b)
    direct = cpu.words_to_csr(slots, word, n_words, presorted=True)
    assert all(torch.equal(a, b) for a, b in zip(direct, want))
