"""`aa::trigram_bag` family (``aa::trigram_bag[_backward]``, ``aa::trigram_bag_cpu``,
``aa::tfree_words_to_csr``): every kernel (CPU, Triton in the interpreter without a GPU, the
reference) against the float64 reference over odd shapes, empty inputs and every dtype it
claims; the native AVX2 forward (ATen bit-equality, threads, its own checks, the ATen fallback);
the CPU kernel's chunked large outputs, huge pages and numpy bookkeeping; the op (autograd,
gradcheck, determinism, bad inputs naming the argument, the CHECK_INDICES switch) and its
compiled paths (the inductor decomposition to the lean ``aa::trigram_bag_cpu``).

The helpers here (`Problem`, `problems`, `references`, `eager_embedding_bag`, `check`) are shared
with the ``aa::hashed_trigram_bag`` tests.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
import threading
from collections.abc import Callable

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings

import aa_compile.ops.trigram_bag as trigram_bag_op
from aa_compile.kernels.trigram_bag import cpu, cpu_avx2, huge_pages, reference

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
if HAS_TRITON:
    from aa_compile.kernels.trigram_bag import triton_kernel

needs_native = pytest.mark.skipif(not cpu_avx2.available(),
                                  reason="no AVX2/FMA or no C compiler here")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
OP = torch.ops.aa.trigram_bag
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
HS = [1, 3, 17, 64, 129]


# --- problems, float64 references and the error bound -------------------------------------------

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


def run_examples(strategy, max_examples: int, test: Callable) -> None:
    """``test(example)`` for ``max_examples`` hypothesis examples of ``strategy`` (per-kernel
    example counts inside one parametrized test)."""
    settings(max_examples=max_examples, deadline=None)(given(strategy)(test))()


# --- the kernels, side by side --------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Kernel:
    """One implementation of the forward / backward: ``fwd(weight, indices, offsets, psw)``,
    ``bwd(grad, weight, indices, offsets, psw, need_w, need_psw)`` -> ``(dw | None, dpsw |
    None)``, the device it runs on, the problems it takes and how many examples it gets."""

    fwd: Callable
    bwd: Callable
    device: str = "cpu"
    sizes: dict = dataclasses.field(default_factory=dict)
    examples: tuple[int, int] = (25, 25)  # forward, backward


def _reference_bwd(grad, weight, indices, offsets, psw, need_w=True, need_psw=True):
    dw, dpsw = reference.trigram_bag_backward(grad, weight, indices, offsets, psw)
    return (dw if need_w else None), (dpsw if need_psw else None)


def _cpu_bwd(grad, weight, indices, offsets, psw, need_w=True, need_psw=True):
    return cpu.trigram_bag_bwd(grad, weight, indices, offsets, psw, need_w, need_psw)


def _triton_bwd(deterministic):
    def bwd(grad, weight, indices, offsets, psw, need_w=True, need_psw=True):
        return triton_kernel.trigram_bag_bwd(grad, weight, indices, offsets, psw, need_w,
                                             need_psw, deterministic)
    return bwd


# Small in the interpreter (every program runs in Python); h = 300 spans two column blocks.
_TRITON_SIZES = dict(dtypes=(torch.float32, torch.float16, torch.bfloat16), max_bags=30,
                     max_v=80, hs=(1, 3, 17, 64, 129, 300))


def kernel(name: str) -> Kernel:
    if name == "cpu":
        return Kernel(cpu.trigram_bag_fwd, _cpu_bwd)
    if name == "reference":
        return Kernel(reference.trigram_bag, _reference_bwd, examples=(10, 10))
    if name.startswith("triton"):
        if not HAS_TRITON:
            pytest.skip("triton is not installed")
        atomic = name == "triton_atomic"
        return Kernel(triton_kernel.trigram_bag_fwd, _triton_bwd(not atomic), DEVICE,
                      _TRITON_SIZES, (20, 6 if atomic else 15))
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["cpu", "triton", "reference"])
def test_forward_matches_float64_reference(name):
    k = kernel(name)

    def run(p):
        weight, indices, offsets, psw, grad = p.make(k.device)
        (want, _, _), (scale, _, _) = references(weight, indices, offsets, psw, grad)
        eager = eager_embedding_bag(weight, indices, offsets, psw, grad)[0]
        check(k.fwd(weight, indices, offsets, psw), want, scale, p.dtype, eager)

    run_examples(problems(**k.sizes), k.examples[0], run)


@pytest.mark.parametrize("name", ["cpu", "triton", "triton_atomic", "reference"])
def test_backward_matches_float64_reference(name):
    """Both gradients; the Triton ``dweight`` both deterministic and with float atomics."""
    k = kernel(name)

    def run(p):
        weight, indices, offsets, psw, grad = p.make(k.device)
        (_, dw64, dpsw64), (_, dw_s, dpsw_s) = references(weight, indices, offsets, psw, grad)
        _, dw_e, dpsw_e = eager_embedding_bag(weight, indices, offsets, psw, grad)
        dw, dpsw = k.bwd(grad, weight, indices, offsets, psw, True, True)
        check(dw, dw64, dw_s, p.dtype, dw_e)
        if psw is None:
            assert dpsw is None
        else:
            check(dpsw, dpsw64, dpsw_s, p.dtype, dpsw_e)

    run_examples(problems(**k.sizes), k.examples[1], run)


@pytest.mark.parametrize("name", ["cpu", "triton"])
def test_gradients_not_asked_for_are_none(name):
    k = kernel(name)
    p = Problem(7, 5, (2, 0, 3), False, torch.float32, torch.int64, True, 0)
    weight, indices, offsets, psw, grad = p.make(k.device)
    assert k.bwd(grad, weight, indices, offsets, psw, False, False) == (None, None)
    dw, dpsw = k.bwd(grad, weight, indices, offsets, psw, False, True)
    assert dw is None and dpsw.shape == (5,)


def _big_problem(dtype=torch.float32, psw=True):
    """Long runs of equal index (4000 entries over 37 slots), so summation order matters."""
    sizes = tuple((i * 7) % 61 for i in range(130))
    return Problem(37, 129, sizes, False, dtype, torch.int64, psw, 1).make()


def _runs_problem(dtype=torch.float32):
    """Long runs of equal index (hot slots) and bags longer than one Triton BLOCK_N step."""
    sizes = (0, 37, 5, 0, 19, 40, 1)
    return Problem(5, 129, sizes, True, dtype, torch.int64, True, 3).make(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["cpu", "triton"])
def test_default_backward_is_deterministic(name, dtype):
    """The same bits run after run (no atomics); on CPU also for every thread count."""
    k = kernel(name)
    weight, indices, offsets, psw, grad = (_big_problem(dtype) if name == "cpu"
                                           else _runs_problem(dtype))
    first = k.bwd(grad, weight, indices, offsets, psw, True, True)
    threads = torch.get_num_threads()
    try:
        for n in ((1, max(2, threads)) if name == "cpu" else (threads,)):
            torch.set_num_threads(n)
            for _ in range(2):
                again = k.bwd(grad, weight, indices, offsets, psw, True, True)
                assert torch.equal(again[0], first[0])
                assert torch.equal(again[1], first[1])
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("name", ["cpu", "triton"])
def test_empty_and_zero_bag_cases(name):
    """No bags, only empty bags, no entries (zero gradients, deterministic or not), h == 0."""
    k = kernel(name)
    w = torch.randn(4, 3, device=k.device)
    none = torch.zeros(0, dtype=torch.int64, device=k.device)
    out = k.fwd(w, none, torch.zeros(1, dtype=torch.int64, device=k.device), None)
    assert out.shape == (0, 3)
    offsets = torch.zeros(3, dtype=torch.int64, device=k.device)
    assert torch.equal(k.fwd(w, none, offsets, None), torch.zeros_like(w[:2]))
    for bwd in ((k.bwd,) if name == "cpu" else (_triton_bwd(True), _triton_bwd(False))):
        dw, _ = bwd(torch.randn(2, 3, device=k.device), w, none, offsets, None, True, True)
        assert torch.equal(dw, torch.zeros_like(w))
    w0 = torch.randn(4, 0, device=k.device)
    idx = torch.tensor([1, 2], device=k.device)
    assert k.fwd(w0, idx, torch.tensor([0, 2], device=k.device), None).shape == (1, 0)


@pytest.mark.parametrize("v", [32767, 32768, 70000])  # int16 / int32 sort keys
def test_cpu_backward_large_vocab(v):
    p = Problem(v, 3, (40, 0, 25), False, torch.float32, torch.int64, True, 9)
    weight, indices, offsets, psw, grad = p.make()
    indices[:3] = torch.tensor([v - 1, 0, v - 1])
    (_, dw64, _), (_, dw_s, _) = references(weight, indices, offsets, psw, grad)
    dw, _ = cpu.trigram_bag_bwd(grad, weight, indices, offsets, psw, True, False)
    eager = eager_embedding_bag(weight, indices, offsets, psw, grad)[1]
    check(dw, dw64, dw_s, torch.float32, eager)


@pytest.mark.parametrize("call", ["cpu", "op"])
def test_semantics_equal_embedding_bag_in_float64(call):
    """Same function as F.embedding_bag(offsets[:-1]) (include_last_offset=False)."""
    fwd = cpu.trigram_bag_fwd if call == "cpu" else OP
    for weight, indices, offsets, psw, _ in (
            _big_problem(torch.float64),
            Problem(50, 17, (5, 0, 9, 0), False, torch.float64, torch.int32, True, 4).make()):
        want = F.embedding_bag(indices, weight, offsets[:-1], mode="sum", per_sample_weights=psw)
        torch.testing.assert_close(fwd(weight, indices, offsets, psw), want)


# --- the Triton kernels: set-up, argument checks ----------------------------------------------

@needs_triton
@pytest.mark.parametrize("v", [300, 32767, 32768, 70000])  # int16 / int32 sort keys
def test_triton_backward_segments_for_large_vocab(v, monkeypatch):
    """The sorted-segment set-up the dweight kernel gets (the kernel itself would run v
    programs, too slow for the interpreter at this v): rows = bags in slot order, boundaries
    = cumsum of the slot counts."""
    p = Problem(v, 3, (40, 0, 25), False, torch.float32, torch.int64, True, 9)
    weight, indices, offsets, psw, grad = p.make(DEVICE)
    indices[:3] = torch.tensor([v - 1, 0, v - 1], device=DEVICE)
    seen = {}
    monkeypatch.setattr(
        triton_kernel, "_launch_bag_sum",
        lambda table, idx, seg, scale, out: seen.update(idx=idx, seg=seg, scale=scale) or out,
    )
    triton_kernel.weight_grad(grad, weight, indices, offsets, psw)
    counts = torch.bincount(indices.cpu(), minlength=v)
    assert torch.equal(seen["seg"].cpu(), torch.cat([counts.new_zeros(1), counts.cumsum(0)]))
    order = torch.argsort(indices.cpu(), stable=True)
    bags = torch.repeat_interleave(torch.arange(3), offsets.diff().cpu())
    assert torch.equal(seen["idx"].cpu(), bags[order])
    assert torch.equal(seen["scale"].cpu(), psw.cpu()[order])


def _args(**over):
    a = dict(
        weight=torch.randn(5, 3, device=DEVICE),
        indices=torch.tensor([0, 4, 2], device=DEVICE),
        offsets=torch.tensor([0, 1, 3], device=DEVICE),
        per_sample_weights=None,
    )
    a.update(over)
    return a


@needs_triton
@pytest.mark.parametrize(
    ("over", "name"),
    [
        (dict(weight=torch.randn(5, 3, dtype=torch.float64)), "weight: float64"),
        (dict(weight=torch.ones(5, 3, dtype=torch.int32)), "weight"),
        (dict(indices=torch.tensor([0.0, 4.0, 2.0])), "indices"),
        (dict(offsets=torch.tensor([[0, 1, 3]])), "offsets"),
        (dict(per_sample_weights=torch.ones(2)), "per_sample_weights"),
    ],
)
def test_triton_bad_input_raises_naming_argument(over, name):
    over = {k: v.to(DEVICE) for k, v in over.items()}
    with pytest.raises(ValueError, match=rf"^trigram_bag_fwd: {name}"):
        triton_kernel.trigram_bag_fwd(**_args(**over))


@needs_triton
@pytest.mark.parametrize("grad_shape", [(3, 3), (2, 4), (6,)])
def test_triton_backward_checks_grad_shape(grad_shape):
    a = _args()
    grad = torch.randn(grad_shape, device=DEVICE)
    with pytest.raises(ValueError, match=r"^trigram_bag_bwd: grad must have shape \(2, 3\)"):
        triton_kernel.trigram_bag_bwd(grad, *a.values())


# --- the native AVX2 float32 forward (kernels/trigram_bag/cpu_avx2.py) ------------------------

F32 = (torch.float32,)
AVX_HS = (1, 3, 7, 8, 9, 17, 47, 64, 129)  # every tail length of the 8-lane loop


def _aten(weight, indices, offsets, psw):
    return torch.ops.aten._embedding_bag_forward_only(weight, indices, offsets, False, 0, False,
                                                      psw, True)[0]


@needs_native
@settings(max_examples=60, deadline=None)
@given(problems(dtypes=F32, hs=AVX_HS, max_bags=30), st.sampled_from([1, 2, 3]))
def test_native_matches_float64_reference_and_aten_bits(p, threads):
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


@needs_native
@pytest.mark.parametrize("h", [1, 64, 1000])
def test_native_many_bags_on_threads_same_bits(h, monkeypatch):
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


@needs_native
def test_native_empty_inputs():
    w = torch.randn(5, 9)
    none = torch.zeros(0, dtype=torch.int64)
    assert cpu_avx2.bag_sum(w, none, torch.zeros(1, dtype=torch.int64), None).shape == (0, 9)
    out = cpu_avx2.bag_sum(w, none, torch.zeros(4, dtype=torch.int32), None)
    assert torch.equal(out, torch.zeros(3, 9))
    out = cpu_avx2.bag_sum(torch.randn(5, 0), torch.tensor([1, 2]), torch.tensor([0, 1, 2]), None)
    assert out.shape == (2, 0)


@needs_native
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("bad", [-1, 7, 2**31 - 1])
def test_native_out_of_range_index_raises(idx_dtype, bad):
    w = torch.randn(7, 16)
    indices = torch.tensor([1, 2, 3, bad, 4, 5], dtype=idx_dtype)
    offsets = torch.tensor([0, 2, 6])
    with pytest.raises(RuntimeError, match=rf"indices must lie in \[0, 7\).*found {bad}"):
        cpu_avx2.bag_sum(w, indices, offsets, None, threads=2)
    with pytest.raises(ValueError, match=rf"indices must lie in \[0, 7\).*found {bad}"):
        OP(w, indices, offsets)
    with pytest.raises(RuntimeError, match=r"indices must lie in \[0, 7\)"):
        torch.ops.aa.trigram_bag_cpu(w, indices, offsets)


@needs_native
@pytest.mark.parametrize("offsets", [[1, 3, 6], [0, 3, 5], [0, 4, 3, 6], [0, 3, 7]])
def test_native_malformed_offsets_raise(offsets):
    w, indices = torch.randn(7, 16), torch.tensor([1, 2, 3, 4, 5, 6])
    for o in (torch.tensor(offsets), torch.tensor(offsets, dtype=torch.int32)):
        with pytest.raises(RuntimeError, match="offsets must start at 0, be non-decreasing"):
            cpu_avx2.bag_sum(w, indices, o, None)
        with pytest.raises(RuntimeError, match="offsets must start at 0, be non-decreasing"):
            torch.ops.aa.trigram_bag_cpu(w, indices, o)
    with pytest.raises(RuntimeError, match="offsets must start at 0"):  # checked with h == 0
        cpu_avx2.bag_sum(torch.randn(7, 0), indices, torch.tensor(offsets), None)


@pytest.mark.parametrize("psw", [False, True])
def test_native_off_falls_back_to_aten(monkeypatch, psw):
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


# --- the CPU kernel: chunked large outputs, huge pages, numpy segments -------------------------

def _chunk_sizes(p, draw_bytes):
    """A few ``chunk_bytes`` to try: tiny (one row per chunk), a few rows, the whole output."""
    row = max(1, p.h * torch.empty(0, dtype=p.dtype).element_size())
    return sorted({1, row * draw_bytes, 1 << 40})


@settings(max_examples=40, deadline=None)
@given(problems(max_v=80), st.integers(1, 7))
def test_chunked_outputs_are_bit_identical_and_match_the_reference(p, rows_per_chunk):
    """Forward and dweight written in chunks of bags / slots (the large-output path, forced
    here with a small ``chunk_bytes``) give the same bits as one kernel call, for every dtype,
    empty bags (and chunks with no entries at all), psw or not; and match float64."""
    weight, indices, offsets, psw, grad = p.make()
    sizes = _chunk_sizes(p, rows_per_chunk)
    fwd = [cpu.trigram_bag_fwd(weight, indices, offsets, psw, chunk_bytes=c) for c in sizes]
    dws = [cpu.weight_grad(grad, weight, indices, offsets, psw, chunk_bytes=c) for c in sizes]
    for out in fwd[1:]:
        assert torch.equal(out, fwd[0])
    for dw in dws[1:]:
        assert torch.equal(dw, dws[0])
    (want, dw64, _), (scale, dw_s, _) = references(weight, indices, offsets, psw, grad)
    eager = eager_embedding_bag(weight, indices, offsets, psw, grad)
    check(fwd[0], want, scale, p.dtype, eager[0])
    check(dws[0], dw64, dw_s, p.dtype, eager[1])


@settings(max_examples=40, deadline=None)
@given(problems(max_v=300), st.sampled_from([None, 2**15 - 1, 2**15, 2**16, 70000]))
def test_numpy_segments_equal_the_torch_ones(p, v_override):
    """The CPU bookkeeping of the backward (numpy radix argsort, bincount) equals the ATen one
    that other devices use, including at the 16-bit key limits."""
    _, indices, offsets, _, _ = p.make()
    v = p.v if v_override is None else v_override
    if v_override is not None and indices.numel():
        indices = indices.clone()
        indices[0] = v - 1  # the largest slot the key must hold
    got = cpu.segments(indices, offsets, v)
    want = cpu.segments_torch(indices, offsets, v)
    for a, b in zip(got, want):
        assert a.dtype == torch.int64 and torch.equal(a, b)
    if v <= 2**16:
        for a, b in zip(cpu.segments_numpy(indices, offsets, v), want):
            assert torch.equal(a, b)


def test_segments_of_empty_input():
    none = torch.zeros(0, dtype=torch.int64)
    for offsets in (torch.zeros(1, dtype=torch.int64), torch.zeros(4, dtype=torch.int32)):
        perm, rows, seg = cpu.segments(none, offsets, 5)
        assert perm.numel() == rows.numel() == 0 and torch.equal(seg, torch.zeros(6).long())


def _threads(n, fn):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(old)


@settings(max_examples=15, deadline=None)
@given(problems(max_v=60, max_bags=60), st.integers(1, 5))
def test_chunked_backward_is_deterministic_across_runs_and_thread_counts(p, rows_per_chunk):
    weight, indices, offsets, psw, grad = p.make()
    for c in _chunk_sizes(p, rows_per_chunk):
        def run(c=c):
            return (cpu.trigram_bag_bwd(grad, weight, indices, offsets, psw, True, True),
                    cpu.weight_grad(grad, weight, indices, offsets, psw, chunk_bytes=c),
                    cpu.trigram_bag_fwd(weight, indices, offsets, psw, chunk_bytes=c))
        first = _threads(1, run)
        for again in (_threads(2, run), _threads(2, run), _threads(1, run)):
            (dw, dpsw), dwc, out = again
            assert torch.equal(dw, first[0][0]) and torch.equal(dwc, first[1])
            assert torch.equal(out, first[2])
            assert (dpsw is None) == (first[0][1] is None)
            if dpsw is not None:
                assert torch.equal(dpsw, first[0][1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_output_huge_pages_same_bits(monkeypatch, dtype):
    """A dweight above the huge-page threshold (the real large-output path: chunks copied into
    a huge-page advised buffer) equals one kernel call, with and without the advice."""
    p = Problem(4096, 1024, tuple((i * 13) % 40 for i in range(600)), False, dtype,
                torch.int64, True, 11)
    weight, indices, offsets, psw, grad = p.make()
    one_call = cpu.weight_grad(grad, weight, indices, offsets, psw, chunk_bytes=1 << 40)
    chunked = cpu.weight_grad(grad, weight, indices, offsets, psw, chunk_bytes=1 << 20)
    assert torch.equal(chunked, one_call)
    out = cpu.trigram_bag_fwd(weight, indices, offsets, psw, chunk_bytes=1 << 40)
    assert torch.equal(cpu.trigram_bag_fwd(weight, indices, offsets, psw, chunk_bytes=1 << 16),
                       out)
    monkeypatch.setattr(huge_pages, "HUGE_PAGES", False)
    assert torch.equal(cpu.weight_grad(grad, weight, indices, offsets, psw,
                                       chunk_bytes=1 << 20), one_call)


def test_advise_huge_pages_is_only_a_hint(monkeypatch):
    big = torch.empty((huge_pages.HUGE_PAGE_MIN_BYTES + (4 << 20)) // 4, dtype=torch.float32)
    assert not huge_pages.advise_huge_pages(torch.empty(8))  # below the threshold
    assert not huge_pages.advise_huge_pages(big.to("meta"))  # not CPU memory
    advised = huge_pages.advise_huge_pages(big)
    assert advised == sys.platform.startswith("linux")
    big.fill_(3.0)
    assert bool((big == 3.0).all())
    monkeypatch.setattr(huge_pages, "HUGE_PAGES", False)
    assert not huge_pages.advise_huge_pages(big)


# --- the op: autograd, argument checks, value checks ------------------------------------------

def _run_op(weight, indices, offsets, psw, grad, **kwargs):
    """Forward and backward through the op: ``(out, dweight, dpsw)``."""
    w = weight.detach().clone().requires_grad_(True)
    p = None if psw is None else psw.detach().clone().requires_grad_(True)
    out = OP(w, indices, offsets, p, **kwargs)
    out.backward(grad)
    return out.detach(), w.grad, (None if p is None else p.grad)


@settings(max_examples=15, deadline=None)
@given(problems())
def test_op_autograd_matches_float64_reference(p):
    weight, indices, offsets, psw, grad = p.make()
    wants, scales = references(weight, indices, offsets, psw, grad)
    eagers = eager_embedding_bag(weight, indices, offsets, psw, grad)
    gots = _run_op(weight, indices, offsets, psw, grad)
    for got, want, scale, eager in zip(gots, wants, scales, eagers):
        if want is None:
            assert got is None
        else:
            check(got, want, scale, p.dtype, eager)


def test_op_gradcheck_float64():
    weight, indices, offsets, psw, _ = Problem(
        6, 3, (2, 0, 4, 1), False, torch.float64, torch.int64, True, 0
    ).make()
    indices[1] = indices[0]  # a slot twice in one bag
    weight.requires_grad_(True)
    psw.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda w, s: OP(w, indices, offsets, s), (weight, psw))
    assert torch.autograd.gradcheck(lambda w: OP(w, indices.int(), offsets), (weight,))


def test_op_only_requested_gradients():
    weight, indices, offsets, psw, grad = Problem(
        9, 5, (3, 1, 4), False, torch.float32, torch.int64, True, 2
    ).make()
    w = weight.clone().requires_grad_(True)
    OP(w, indices, offsets, psw).backward(grad)  # psw without requires_grad
    dw64 = reference.trigram_bag_backward(grad.double(), weight.double(), indices, offsets,
                                          psw.double())[0]
    torch.testing.assert_close(w.grad.double(), dw64)
    p = psw.clone().requires_grad_(True)
    OP(weight, indices, offsets, p).backward(grad)  # weight without requires_grad
    assert p.grad.shape == psw.shape


def test_op_default_backward_is_bitwise_deterministic():
    sizes = tuple((i * 11) % 57 for i in range(90))
    weight, indices, offsets, psw, grad = Problem(
        23, 64, sizes, False, torch.float32, torch.int64, True, 5
    ).make()
    first = _run_op(weight, indices, offsets, psw, grad)
    for _ in range(2):
        again = _run_op(weight, indices, offsets, psw, grad)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


def test_op_empty_bags_and_no_bags():
    w = torch.randn(4, 3, requires_grad=True)
    out = OP(w, torch.tensor([2, 2]), torch.tensor([0, 0, 2, 2]))
    assert torch.equal(out[0], torch.zeros(3)) and torch.equal(out[2], torch.zeros(3))
    torch.testing.assert_close(out[1], 2 * w[2])
    out = OP(w, torch.zeros(0, dtype=torch.int64), torch.zeros(1, dtype=torch.int64))
    assert out.shape == (0, 3)
    out.sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w))


@pytest.mark.parametrize("h", [4, 0])
@pytest.mark.parametrize("n_bags", [0, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("psw", [False, True])
def test_op_weight_without_rows_and_no_indices_matches_embedding_bag(h, n_bags, dtype, psw):
    """``v == 0`` is valid when nothing indexes the table: zeros, as ``F.embedding_bag`` gives,
    and zero (empty) gradients."""
    offsets = torch.zeros(n_bags + 1, dtype=torch.int64)
    indices = torch.zeros(0, dtype=torch.int64)
    grad = torch.randn(n_bags, h).to(dtype)
    results = []
    for fn in (OP, lambda w, i, o, p: F.embedding_bag(i, w, o[:-1], mode="sum",
                                                      per_sample_weights=p)):
        w = torch.zeros(0, h, dtype=dtype, requires_grad=True)
        p = torch.zeros(0, dtype=dtype, requires_grad=True) if psw else None
        out = fn(w, indices, offsets, p)
        out.backward(grad)
        results.append((out.detach(), w.grad, None if p is None else p.grad))
    for got, want in zip(*results):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert results[0][0].shape == (n_bags, h)
    dw, dpsw = torch.ops.aa.trigram_bag_backward(grad, torch.zeros(0, h, dtype=dtype), indices,
                                                 offsets, None, True, False)
    assert dw.shape == (0, h) and dpsw.numel() == 0


def test_op_weight_without_rows_still_rejects_an_index():
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 0\) \(weight has 0 rows\), "
                                         r"found 0"):
        OP(torch.zeros(0, 4), torch.tensor([0]), torch.tensor([0, 1]))


W = torch.randn(5, 3)
IDX = torch.tensor([0, 4, 2])
OFFS = torch.tensor([0, 1, 3])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((W.int(), IDX, OFFS), "weight must be a float16/bfloat16/float32/float64"),
        ((W[0], IDX, OFFS), r"weight must be 2-D"),
        ((W.view(5, 3, 1), IDX, OFFS), r"weight must be 2-D"),
        ((W, IDX.float(), OFFS), "indices must be int64 or int32"),
        ((W, IDX.view(3, 1), OFFS), "indices must be 1-D"),
        ((W, torch.tensor([0, 5, 2]), OFFS), r"indices must lie in \[0, 5\).*found 5"),
        ((W, torch.tensor([0, -1, 2]), OFFS), r"indices must lie in \[0, 5\).*found -1"),
        ((W, IDX, OFFS.float()), "offsets must be int64 or int32"),
        ((W, IDX, torch.zeros(0, dtype=torch.int64)), "offsets must be 1-D"),
        ((W, IDX, OFFS.view(3, 1)), "offsets must be 1-D"),
        ((W, IDX, torch.tensor([1, 2, 3])), "offsets must start at 0"),
        ((W, IDX, torch.tensor([0, 2, 1, 3])), "offsets must be non-decreasing"),
        ((W, IDX, torch.tensor([0, 1, 2])), r"offsets must end at nnz .* 3"),
        ((W, IDX, torch.tensor([0, 1, 4])), r"offsets must end at nnz"),
        ((W, IDX, OFFS, torch.ones(2)), r"per_sample_weights must have shape \(3,\)"),
        ((W, IDX, OFFS, torch.ones(3, dtype=torch.float64)), "per_sample_weights must have"),
        ((W, IDX.to("meta"), OFFS), "indices is on meta, but weight is on cpu"),
        ((W, IDX, OFFS.to("meta")), "offsets is on meta, but weight is on cpu"),
        ((W, IDX, OFFS, torch.ones(3, device="meta")), "per_sample_weights is on meta"),
    ],
)
def test_op_bad_inputs_raise_value_error_naming_the_argument(args, message):
    with pytest.raises(ValueError, match=message):
        OP(*args)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("psw", [False, True])
@pytest.mark.parametrize("idx_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("bad", [-1, 5, 1000])
def test_op_out_of_range_index_raises_for_every_dtype(dtype, psw, idx_dtype, bad):
    """On CPU the forward leaves the range check to the kernel and converts its error."""
    w = W.to(dtype)
    p = torch.ones(3, dtype=dtype) if psw else None
    idx = torch.tensor([0, bad, 2], dtype=idx_dtype)
    with pytest.raises(ValueError, match=rf"indices must lie in \[0, 5\).*found {bad}"):
        OP(w, idx, OFFS.to(idx_dtype), p)


def test_op_out_of_range_index_with_zero_width_weight():
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 5\)"):
        OP(torch.randn(5, 0), torch.tensor([0, 7, 2]), OFFS)


@pytest.mark.parametrize(
    ("grad", "message"),
    [
        (torch.randn(3, 3), r"grad must have shape \(2, 3\)"),
        (torch.randn(2, 4), r"grad must have shape \(2, 3\)"),
        (torch.randn(6), r"grad must have shape \(2, 3\)"),
        (torch.randn(2, 3, dtype=torch.float64), "grad must have weight's dtype"),
    ],
)
def test_backward_op_checks_grad(grad, message):
    with pytest.raises(ValueError, match=message):
        torch.ops.aa.trigram_bag_backward(grad, W, IDX, OFFS, None, True, False)


def test_backward_op_checks_inputs_too():
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 5\)"):
        torch.ops.aa.trigram_bag_backward(
            torch.randn(2, 3), W, torch.tensor([0, 9, 2]), OFFS, None, True, False
        )


@pytest.mark.parametrize("with_indices", [False, True])
@pytest.mark.parametrize(
    ("indices", "offsets"),
    [([3, -2, 9], [0, 2, 1, 3]), ([0, 1], [0, 2]), ([4], [1, 1]), ([], [0, 0, 0]), ([7], [0])],
)
def test_value_stats_on_device_equal_the_cpu_ones(indices, offsets, with_indices):
    """The GPU route of the value checks (tensor ops + one sync), run on CPU tensors."""
    i = torch.tensor(indices, dtype=torch.int32)
    o = torch.tensor(offsets)
    with_indices = with_indices and len(indices) > 0
    assert reference._value_stats_torch(i, o, with_indices) == reference._value_stats(
        i, o, with_indices
    )


def test_check_indices_switch_gates_value_checks_off_cpu(monkeypatch):
    """Off CPU, index / offset values (a device sync to read) are checked only with
    CHECK_INDICES; CPU always checks. Meta tensors stand in for a GPU here."""
    seen = []

    def spy(*args, check_values, **kwargs):
        seen.append(check_values)

    monkeypatch.setattr(reference, "check_inputs", spy)
    meta = [t.to("meta") for t in (W, IDX, OFFS)]
    for flag in (False, True):
        monkeypatch.setattr(trigram_bag_op, "CHECK_INDICES", flag)
        trigram_bag_op.check_inputs(*meta, None, values=True, op="x")
        trigram_bag_op.check_inputs(W, IDX, OFFS, None, values=True, op="x")
        trigram_bag_op.check_inputs(W, IDX, OFFS, None, values=False, op="x")  # fake impl
    assert seen == [False, True, False, True, True, False]


# --- the op compiled ---------------------------------------------------------------------------

def test_op_compiles_fullgraph_with_autograd():
    weight, indices, offsets, psw, grad = Problem(
        12, 8, (3, 0, 6, 2), False, torch.float32, torch.int64, True, 6
    ).make()

    def fn(w, i, o, s):
        return OP(w, i, o, s) * 2

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    w1, p1 = weight.clone().requires_grad_(True), psw.clone().requires_grad_(True)
    w2, p2 = weight.clone().requires_grad_(True), psw.clone().requires_grad_(True)
    compiled(w1, indices, offsets, p1).backward(grad)
    fn(w2, indices, offsets, p2).backward(grad)
    torch.testing.assert_close(w1.grad, w2.grad)
    torch.testing.assert_close(p1.grad, p2.grad)


def _count_calls(monkeypatch, calls: dict, name: str) -> None:
    """Count the calls of ``cpu.<name>`` (the op's CPU kernels look it up per call)."""
    fn = getattr(cpu, name)

    def counted(*args, **kwargs):
        calls[name] = calls.get(name, 0) + 1
        return fn(*args, **kwargs)

    monkeypatch.setattr(cpu, name, counted)


def test_inductor_decomposes_the_cpu_forward_but_keeps_our_backward(monkeypatch):
    """Under backend="aa" (inductor) the CPU forward is a direct call from the generated code
    (``aa::trigram_bag_cpu`` with the native kernel, else ATen's embedding bag: the op's
    Python kernel never runs), exactly equal to F.embedding_bag; the backward is still our op,
    and the value checks survive (RuntimeError with the op's message)."""
    calls = {}
    _count_calls(monkeypatch, calls, "trigram_bag_fwd")
    _count_calls(monkeypatch, calls, "trigram_bag_bwd")
    weight, indices, offsets, _, grad = Problem(
        12, 8, (3, 0, 6, 2), False, torch.float32, torch.int64, False, 7
    ).make()
    compiled = torch.compile(lambda w, i, o: OP(w, i, o) * 2, backend="aa")
    w1 = weight.clone().requires_grad_(True)
    w2 = weight.clone().requires_grad_(True)
    out = compiled(w1, indices, offsets)
    out.backward(grad)
    want = F.embedding_bag(indices, w2, offsets, mode="sum", include_last_offset=True) * 2
    want.backward(grad)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    torch.testing.assert_close(out, (OP(weight, indices, offsets) * 2))
    torch.testing.assert_close(w1.grad, w2.grad)
    # forward: the eager OP call above only
    assert calls == {"trigram_bag_fwd": 1, "trigram_bag_bwd": 1}
    bad_index = indices.clone()
    bad_index[2] = 12
    # ATen's own check ("... not in the valid range [0, 12)") or the native kernel's; the
    # second spelling is also what a graph compiled by an older version of the decomposition
    # (an inductor assert) says, which inductor's FX graph cache may still hold: its key does
    # not cover decompositions
    with pytest.raises(RuntimeError, match=r"valid range \[0, 12\)|indices must lie in \[0, 12\)"):
        compiled(w1, bad_index, offsets)
    # a wrong last offset and decreasing offsets: our asserts; offsets[0] != 0: ATen's own
    # check (its message); never a silent result
    for bad, message in (([0, 3, 3, 9, 10], "offsets must start at 0, be non-decreasing"),
                         ([0, 3, 2, 9, 11], "offsets must start at 0, be non-decreasing"),
                         ([0, 9, 3, 3, 11], "offsets must start at 0, be non-decreasing"),
                         ([1, 3, 3, 9, 11], r"offsets\[0\] has to be 0|start at 0")):
        with pytest.raises(RuntimeError, match=message):
            compiled(w1, indices, torch.tensor(bad))


def test_inductor_leaves_large_forward_outputs_to_the_chunked_kernel(monkeypatch):
    """An output known to exceed CHUNK_BYTES is not decomposed into a direct call: the op's
    chunked kernel runs inside the compiled graph, with the same result."""
    calls = {}
    _count_calls(monkeypatch, calls, "trigram_bag_fwd")
    monkeypatch.setattr(cpu, "CHUNK_BYTES", 64)  # 16 float32 columns x 1 bag
    weight, indices, offsets, _, grad = Problem(
        13, 16, (3, 0, 6, 2, 5), False, torch.float32, torch.int64, False, 8
    ).make()
    with torch._inductor.config.patch(fx_graph_cache=False):
        torch._dynamo.reset()
        compiled = torch.compile(lambda w, i, o: OP(w, i, o) * 2, backend="aa")
        w = weight.clone().requires_grad_(True)
        out = compiled(w, indices, offsets)
        out.backward(grad)
    assert calls == {"trigram_bag_fwd": 1}
    want = F.embedding_bag(indices, weight, offsets, mode="sum", include_last_offset=True) * 2
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(w.grad, 2 * reference.trigram_bag_backward(
        grad, weight, indices, offsets)[0])
    torch._dynamo.reset()


# --- aa::tfree_words_to_csr ----------------------------------------------------------------------

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
