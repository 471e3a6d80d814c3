"""`aa::dictionary_score` and `aa::csr_offsets`: the kernels parametrized (the CPU kernel, the
Triton kernel: the interpreter on CPU without a GPU, and the plain-PyTorch reference itself in
its compute dtype) against the float64 reference over odd shapes, empty dictionaries and
batches, ties, NaN and every dtype; the ops (bad inputs naming the argument, inference-only
autograd, the CHECK_INDICES switch, compiling, the CSR memo). (opcheck: tests/test_ops.py.)

The helpers (`problems`, `Problem`, `run_and_check`, `check_scores`, `check_topk`) are for other
tests of T-FREE decoding too."""

from __future__ import annotations

import dataclasses
import importlib.util

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

import aa_compile.ops.dictionary_score as op_module
from aa_compile.kernels.dictionary_score import cpu, reference

from ..conftest import DEVICES

HAS_TRITON = importlib.util.find_spec("triton") is not None
if HAS_TRITON:
    from aa_compile.kernels.dictionary_score import triton_kernel

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
#: the kernels, and the dtypes each one takes (Triton: not float64, which the op runs on ``cpu``)
KERNELS = ["cpu", "triton", "reference"]
KERNEL_DTYPES = {"cpu": tuple(DTYPES), "reference": tuple(DTYPES),
                 "triton": (torch.float32, torch.float16, torch.bfloat16)}
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
OP = torch.ops.aa.dictionary_score
CSR = torch.ops.aa.csr_offsets


def kernel(name: str):
    """``(dictionary_score, device)`` of kernel ``name`` (skips where Triton is missing)."""
    if name in ("cpu", "reference"):
        return {"cpu": cpu, "reference": reference}[name].dictionary_score, "cpu"
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    return triton_kernel.dictionary_score, TRITON_DEVICE


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


# --- the kernels ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", KERNELS)
@settings(deadline=None)
@given(data=st.data())
def test_kernel_matches_float64_reference(name, data):
    """Every dtype the kernel takes; in the Triton interpreter (small sizes) words per
    dictionary go past one ``BLOCK_W`` block and entries per word past one ``BLOCK_E`` step."""
    fn, device = kernel(name)
    sizes = {"triton": {"max_words": 70, "max_v": 200, "max_b": 3}}.get(name, {})
    p = data.draw(problems(dtypes=KERNEL_DTYPES[name], **sizes), label="problem")
    k = data.draw(st.integers(0, p.n_words), label="k")
    run_and_check(fn, p, k, device)


@pytest.mark.parametrize("name", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_every_dtype_with_ties_and_long_words(name, dtype):
    if dtype not in KERNEL_DTYPES[name]:
        pytest.skip(f"the {name} kernel does not take {dtype}")
    fn, device = kernel(name)
    sizes = (3, 0, 95, 40, 1, 33, 0, 64) * 5  # 40 words (> BLOCK_W), up to 95 entries
    run_and_check(fn, Problem(129, 2, 10, sizes, 4, dtype, torch.int32, 7), 12, device)


@pytest.mark.parametrize("b", [1, 2, 8])
def test_cpu_large_vocab_fbgemm_path(b):
    """v = 32000 and a few thousand realistic words (the B = 1 padding included)."""
    sizes = tuple(int(s) for s in torch.randint(20, 90, (3000,),
                                                generator=torch.Generator().manual_seed(b)))
    p = Problem(32000, b, 10, sizes, 3, torch.float32, torch.int64, b)
    run_and_check(cpu.dictionary_score, p, 50)


@pytest.mark.parametrize("name", KERNELS)
def test_kernel_ties_are_ordered_by_word_index(name):
    fn, device = kernel(name)
    p = Problem(50, 3, 2, (5, 3, 7), 6, torch.float32, torch.int64, 0)
    probs, offsets, slots, weights, n_tri, m = p.make()
    n_tri[0] = 2
    n_tri[3:] = 2
    args = (t.to(device) for t in (probs, offsets, slots, weights, n_tri))
    _, indices = fn(*args, m, 9)
    tied = [0, 3, 4, 5, 6, 7, 8]
    for row in indices.tolist():
        pos = [row.index(w) for w in tied]
        assert pos == sorted(pos) and pos == list(range(pos[0], pos[0] + len(tied)))


@pytest.mark.parametrize("name", KERNELS)
def test_kernel_words_without_trigrams_are_minus_inf_and_rank_last_by_index(name):
    fn, device = kernel(name)
    p = Problem(20, 2, 3, (4, 2, 0, 3), 0, torch.float32, torch.int64, 1)
    probs, offsets, slots, weights, n_tri, m = p.make()
    n_tri[:] = torch.tensor([0, 2, 0, 1])
    args = (t.to(device) for t in (probs, offsets, slots, weights, n_tri))
    values, indices = fn(*args, m, 4)
    assert torch.equal(indices[:, 2:].cpu(), torch.tensor([[0, 2], [0, 2]]))
    assert torch.isinf(values[:, 2:]).all()


@pytest.mark.parametrize("name", KERNELS)
def test_kernel_nan_scores_rank_first(name):
    fn, device = kernel(name)
    p = Problem(10, 2, 1, (2, 2, 2, 2), 0, torch.float32, torch.int64, 2)
    probs, offsets, slots, weights, n_tri, m = p.make()
    n_tri[:] = 1
    slots[:] = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])
    probs[0, 4] = float("nan")  # word 2 and the row total
    args = [t.to(device) for t in (probs, offsets, slots, weights, n_tri)]
    score, _ = fn(*args, m, 0)
    values, indices = fn(*args, m, 2)
    assert torch.equal(indices.cpu(), reference.ordered_topk(score.cpu(), 2)[1])
    assert torch.isnan(values[0]).all() and indices[0].tolist() == [0, 1]


@pytest.mark.parametrize("name", KERNELS)
def test_kernel_b1_empty_dictionary_and_empty_batch(name):
    fn, device = kernel(name)
    run_and_check(fn, Problem(31, 1, 3, (5, 2, 0, 7), 2, torch.float32, torch.int64, 3), 6,
                  device)
    z = torch.zeros(1, dtype=torch.int64, device=device)
    none = torch.zeros(0, dtype=torch.int64, device=device)
    s, i = fn(torch.rand(2, 7, device=device), z, none, torch.zeros(0, device=device), none, 1,
              0)
    assert s.shape == (2, 0) and i.shape == (2, 0)
    offs = torch.tensor([0, 1], device=device)
    s, i = fn(torch.rand(0, 7, device=device), offs, torch.tensor([3], device=device),
              torch.ones(1, device=device), torch.tensor([1], device=device), 1, 1)
    assert s.shape == (0, 1) and i.shape == (0, 1)


def test_triton_refuses_float64_with_a_pointer_to_the_cpu_kernel():
    _, device = kernel("triton")
    probs = torch.rand(1, 4, dtype=torch.float64, device=device)
    offs = torch.tensor([0, 1], device=device)
    with pytest.raises(ValueError, match="probs: torch.float64 is not supported"):
        triton_kernel.scores(probs, offs, offs[:1], torch.ones(1, device=device), offs[1:], 1)


# --- aa::dictionary_score ------------------------------------------------------------------

P = torch.rand(2, 10)
OFFS = torch.tensor([0, 2, 3, 3])
SLOTS = torch.tensor([1, 9, 4])
W = torch.tensor([1.0, 0.5, 1.0])
NT = torch.tensor([2, 1, 0])


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=10, deadline=None)
@given(p=problems(max_words=20, max_v=100))
def test_op_matches_float64_reference(device, p):
    run_and_check(lambda *a: OP(*a), p, min(p.n_words, 3), device)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((P.int(), OFFS, SLOTS, W, NT, 1, 1), "probs must be a float16/bfloat16/float32/float64"),
        ((P[0], OFFS, SLOTS, W, NT, 1, 1), r"probs must be 2-D \[B, v\]"),
        ((P, OFFS.float(), SLOTS, W, NT, 1, 1), "word_offsets must be an int64 or int32"),
        ((P, OFFS.view(2, 2), SLOTS, W, NT, 1, 1), "word_offsets must be 1-D"),
        ((P, OFFS[:0], SLOTS, W, NT, 1, 0), "word_offsets must have n_words"),
        ((P, OFFS, SLOTS.float(), W, NT, 1, 1), "slots must be an int64 or int32"),
        ((P, OFFS, SLOTS, W.int(), NT, 1, 1), "slot_weights must be a float tensor"),
        ((P, OFFS, SLOTS, W[:2], NT, 1, 1), r"slot_weights must have shape \(3,\)"),
        ((P, OFFS, SLOTS, W, NT[:2], 1, 1), r"n_trigrams must have shape \(3,\)"),
        ((P, OFFS, SLOTS, W, NT.float(), 1, 1), "n_trigrams must be an int64 or int32"),
        ((P, OFFS, SLOTS, W, NT, 0, 1), "m .* must be an int >= 1"),
        ((P, OFFS, SLOTS, W, NT, 1, 4), r"k must be an int in \[0, n_words\] = \[0, 3\]"),
        ((P, OFFS, SLOTS, W, NT, 1, -1), r"k must be an int in \[0, n_words\]"),
        ((P, torch.tensor([1, 2, 3, 3]), SLOTS, W, NT, 1, 1), "word_offsets must start at 0"),
        ((P, torch.tensor([0, 3, 2, 3]), SLOTS, W, NT, 1, 1), "word_offsets must be non-decr"),
        ((P, torch.tensor([0, 1, 2, 2]), SLOTS, W, NT, 1, 1), "word_offsets must end at nnz"),
        ((P, OFFS, torch.tensor([1, 10, 4]), W, NT, 1, 1), r"slots must lie in \[0, 10\).*10"),
        ((P, OFFS, torch.tensor([1, -1, 4]), W, NT, 1, 1), r"slots must lie in \[0, 10\).*-1"),
        ((P, OFFS, SLOTS, W, torch.tensor([2, -1, 0]), 1, 1), "n_trigrams must be >= 0"),
        ((P, OFFS.to("meta"), SLOTS, W, NT, 1, 1), "word_offsets is on meta, but probs is on cpu"),
        ((P, OFFS, SLOTS, W.to("meta"), NT, 1, 1), "slot_weights is on meta"),
    ],
)
def test_op_bad_inputs_raise_value_error_naming_the_argument(args, message):
    with pytest.raises(ValueError, match=message):
        OP(*args)


def test_op_k0_returns_all_scores_and_topk_agrees():
    scores, none = OP(P, OFFS, SLOTS, W, NT, 2, 0)
    assert scores.shape == (2, 3) and none.shape == (2, 0)
    assert torch.isinf(scores[:, 2]).all()
    values, indices = OP(P, OFFS, SLOTS, W, NT, 2, 3)
    assert torch.equal(values, scores.gather(1, indices))


def test_op_inference_only_outputs_are_non_differentiable():
    p = P.clone().requires_grad_(True)
    values, indices = OP(p, OFFS, SLOTS, W, NT, 1, 2)
    assert not values.requires_grad and not indices.requires_grad
    with pytest.raises(RuntimeError, match="does not require grad"):
        values.sum().backward()


def test_op_compiles_fullgraph():
    def fn(p):
        values, indices = OP(p.sigmoid(), OFFS, SLOTS, W, NT, 1, 2)
        return values * 2, indices

    got = torch.compile(fn, backend="aot_eager", fullgraph=True)(P)
    want = fn(P)
    torch.testing.assert_close(got, want)


def test_op_check_indices_switch_gates_value_checks_off_cpu(monkeypatch):
    seen = []
    monkeypatch.setattr(op_module.reference, "check_inputs",
                        lambda *a, check_values, **k: seen.append(check_values))
    meta = [t.to("meta") for t in (P, OFFS, SLOTS, W, NT)]
    for flag in (False, True):
        monkeypatch.setattr(op_module, "CHECK_INDICES", flag)
        op_module.check(*meta, 1, 1)
        op_module.check(P, OFFS, SLOTS, W, NT, 1, 1)
    assert seen == [False, True, True, True]


def test_op_value_checks_rerun_after_an_in_place_change():
    slots = SLOTS.clone()
    OP(P, OFFS, slots, W, NT, 1, 1)  # validated (and remembered)
    OP(P, OFFS, slots, W, NT, 1, 1)
    slots[1] = 10
    with pytest.raises(ValueError, match=r"slots must lie in \[0, 10\)"):
        OP(P, OFFS, slots, W, NT, 1, 1)


def test_op_out_of_range_slot_after_a_write_through_data_names_slots():
    slots = SLOTS.clone()
    OP(P, OFFS, slots, W, NT, 1, 1)  # valid (and, once, remembered as such)
    slots.data[1] = 10
    with pytest.raises(ValueError, match=r"slots must lie in \[0, 10\) \(probs has 10 columns\), "
                                         r"found 10"):
        OP(P, OFFS, slots, W, NT, 1, 1)
    slots.data[1] = -1
    with pytest.raises(ValueError, match=r"slots must lie in \[0, 10\).*found -1"):
        OP(P.double(), OFFS, slots, W, NT, 1, 1)


def test_op_bad_trigram_counts_after_a_write_through_data():
    nt = NT.clone()
    OP(P, OFFS, SLOTS, W, nt, 1, 1)
    nt.data[0] = -1
    with pytest.raises(ValueError, match="n_trigrams must be >= 0, found -1"):
        OP(P, OFFS, SLOTS, W, nt, 1, 1)


# --- aa::csr_offsets -----------------------------------------------------------------------


def test_csr_offsets_of_sorted_ids():
    ids = torch.tensor([0, 0, 2, 2, 2, 4])
    assert CSR(ids, 6).tolist() == [0, 2, 2, 5, 5, 6, 6]
    assert CSR(ids.int(), 5).tolist() == [0, 2, 2, 5, 5, 6]
    assert CSR(torch.zeros(0, dtype=torch.int64), 2).tolist() == [0, 0, 0]


@pytest.mark.parametrize(
    ("ids", "n", "message"),
    [
        (torch.tensor([0, 2, 1]), 3, "row_ids must be non-decreasing"),
        (torch.tensor([0, 3]), 3, r"row_ids must lie in \[0, 3\), found 3"),
        (torch.tensor([-1, 0]), 3, r"row_ids must lie in \[0, 3\), found -1"),
        (torch.tensor([0.0]), 3, "row_ids must be an int64 or int32"),
        (torch.tensor([[0]]), 3, "row_ids must be 1-D"),
        (torch.tensor([0]), -1, "n_rows must be an int >= 0"),
    ],
)
def test_csr_offsets_bad_inputs(ids, n, message):
    with pytest.raises(ValueError, match=message):
        CSR(ids, n)


def test_csr_offsets_memo_follows_in_place_changes():
    ids = torch.tensor([0, 1, 1, 2])
    first = CSR(ids, 3)
    first.fill_(7)  # the caller owns its result: the memo is not affected
    assert CSR(ids, 3).tolist() == [0, 1, 3, 4]
    ids[1] = 0  # a version bump: recomputed
    assert CSR(ids, 3).tolist() == [0, 2, 3, 4]
    ids[0] = 2
    with pytest.raises(ValueError, match="non-decreasing"):
        CSR(ids, 3)


def test_csr_offsets_fresh_after_a_write_through_data():
    """``.data`` writes do not bump the tensor's version counter: the memo must not serve the
    offsets of the old contents."""
    ids = torch.tensor([0, 1, 1, 2])
    assert CSR(ids, 3).tolist() == [0, 1, 3, 4]
    version = ids._version
    ids.data[:] = torch.tensor([0, 0, 2, 2])
    assert ids._version == version  # what makes a version-keyed memo stale
    assert CSR(ids, 3).tolist() == [0, 2, 2, 4]
    ids.data[1:3] = torch.tensor([2, 1])
    with pytest.raises(ValueError, match="non-decreasing"):
        CSR(ids, 3)
    ids.data[:] = torch.tensor([0, 1, 1, 3])
    with pytest.raises(ValueError, match=r"row_ids must lie in \[0, 3\), found 3"):
        CSR(ids, 3)


def _two_id_lists(n_rows: int):
    return st.integers(0, 12).flatmap(lambda n: st.tuples(
        *[st.lists(st.integers(0, n_rows - 1), min_size=n, max_size=n).map(sorted)] * 2))


@settings(max_examples=25, deadline=None)
@given(_two_id_lists(7))
def test_csr_offsets_memo_never_stale(lists):
    """Whatever sorted ids are written through ``.data`` after a memoised call: fresh offsets."""
    first, second = (torch.tensor(x, dtype=torch.int64) for x in lists)
    ids = first.clone()
    CSR(ids, 7)
    ids.data[:] = second
    assert CSR(ids, 7).tolist() == torch.searchsorted(second, torch.arange(8)).tolist()
