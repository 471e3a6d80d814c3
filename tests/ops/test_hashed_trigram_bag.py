"""`aa::hashed_trigram_bag` (forward and backward): the fast-mode hash of every kernel (the torch
hash of the CPU path, the in-kernel Triton hash in the interpreter without a GPU) bit for bit
against the spec's numpy `tfree_hashing.fast_slots`; every kernel (CPU, Triton, the reference)
against the float64 reference over odd shapes, empty inputs and every dtype it claims; the op:
equal to aa::trigram_bag on the tokenizer's slots for real text, autograd, gradcheck,
determinism, bad inputs (ValueError naming the argument), the value-check switch, compiling it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import given, settings

import aa_compile.ops.hashed_trigram_bag as op_module
from aa_compile.kernels import tfree_hashing
from aa_compile.kernels.hashed_trigram_bag import cpu, reference
from aa_compile.kernels.trigram_bag import cpu as bag_cpu
from aa_compile.models.tfree import TrigramTokenizer

from .test_trigram_bag import check, eager_embedding_bag, references, run_examples

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
if HAS_TRITON:
    from aa_compile.kernels.hashed_trigram_bag import triton_kernel

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
OP = torch.ops.aa.hashed_trigram_bag
BAG = torch.ops.aa.trigram_bag
WWB = reference.WHOLE_WORD_BASE
#: bytes that make case variants of [a-z ]^3 patterns (and their patterns), plus a non-letter
_CASE_BYTES = b"aAzZhHeElL @[`{"


# --- strategies, problems, checks -------------------------------------------------------------

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
    """``got`` vs the float64 reference (error bounds of `test_trigram_bag.check`)."""
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


# --- the kernels, side by side --------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Kernel:
    """``fwd(weight, ids, offsets, m, k_lower, wws)``, ``bwd(grad, weight, ids, offsets, m,
    k_lower, wws)``, ``slots(ids, v, m, k_lower, wws)``; the device, the problems it takes and
    how many examples (hash, forward, backward)."""

    fwd: Callable
    bwd: Callable
    slots: Callable
    device: str = "cpu"
    sizes: dict = dataclasses.field(default_factory=dict)
    examples: tuple[int, int, int] = (40, 25, 20)


def _triton_bwd(deterministic):
    def bwd(grad, weight, ids, offsets, m, k_lower, wws=None):
        return triton_kernel.hashed_trigram_bag_bwd(grad, weight, ids, offsets, m, k_lower, wws,
                                                    deterministic)
    return bwd


# Every trigram costs tens of milliseconds in the interpreter: tiny problems, few examples.
_TRITON_SIZES = {"dtypes": (torch.float32, torch.float16, torch.bfloat16), "max_words": 4,
                 "max_trigrams": 3, "hs": (1, 17, 300), "max_v": 3000, "max_m": 10}


def kernel(name: str) -> Kernel:
    if name == "cpu":
        return Kernel(cpu.hashed_trigram_bag_fwd, cpu.hashed_trigram_bag_bwd,
                      cpu.materialize_slots)
    if name == "reference":
        return Kernel(reference.hashed_trigram_bag, reference.hashed_trigram_bag_backward,
                      reference.slots, examples=(0, 10, 10))
    if name.startswith("triton"):
        if not HAS_TRITON:
            pytest.skip("triton is not installed")
        return Kernel(triton_kernel.hashed_trigram_bag_fwd,
                      _triton_bwd(name != "triton_atomic"), triton_kernel.trigram_slots,
                      DEVICE, _TRITON_SIZES, (8, 6, 0))
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["cpu", "triton"])
def test_hash_is_bit_identical_to_spec(name):
    """The CPU path's torch hash (each id once with ``unique``, or all) and the in-kernel
    Triton hash equal the spec's numpy hash."""
    k = kernel(name)
    if name == "cpu":
        strategy = st.tuples(st.lists(trigram_id(), max_size=60), hash_params(), st.booleans())
    else:
        strategy = st.tuples(st.lists(trigram_id(), min_size=1, max_size=6),
                             hash_params(max_m=10), st.just(None))

    def run(example):
        ids, (v, m, k_lower), unique = example
        want = tfree_hashing.fast_slots(np.array(ids, dtype=np.int64), v, m, k_lower)
        if unique is None:
            got = k.slots(torch.tensor(ids, device=k.device), v, m, k_lower)
        else:
            got = k.slots(hash_ids(ids), v, m, k_lower, None, unique=unique)
        assert got.dtype == torch.int64
        np.testing.assert_array_equal(got.cpu().numpy(), want.reshape(len(ids), m))

    run_examples(strategy, k.examples[0], run)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, WWB - 1), min_size=1, max_size=20),
       st.integers(0, 2**16 - 1), st.integers(0, 2**23 - 1), st.integers(1, 2**31 - 1))
def test_cpu_candidates_match_spec_over_key_range(ids, k, j, v):
    """The whole key range (k < 2**16, large j): shifts, signs and the int64 wrap-around."""
    want = tfree_hashing.fast_candidates(np.array(ids), k, np.full(len(ids), j), v)
    got = cpu.candidates(hash_ids(ids), k, j, v)
    np.testing.assert_array_equal(got.numpy(), want)


def test_cpu_lowercase_partner_matches_spec():
    ids = np.arange(0, WWB, 4099, dtype=np.int64)
    ids = np.concatenate([ids, [0x6C6548, 0x204548, 0x5A5A5A, 0x7B6161, 0x406161]])
    np.testing.assert_array_equal(cpu.lowercase_partner(torch.from_numpy(ids)).numpy(),
                                  tfree_hashing.lowercase_partner(ids))


def test_cpu_collision_rows_take_the_retry_path():
    """v = m: every trigram's slots are a permutation of range(v), so nearly every row retries."""
    ids = hash_ids(range(0, 3000, 7))
    got = cpu.fast_slots(ids, 6, 6, 0)
    assert torch.equal(got, torch.arange(6).expand(len(ids), 6))
    np.testing.assert_array_equal(cpu.fast_slots(ids, 7, 6, 3).numpy(),
                                  tfree_hashing.fast_slots(ids.numpy(), 7, 6, 3))


def _many_words(dtype=torch.float32):
    words = tuple(tuple((w * 7919 + t * 104729) % WWB for t in range(w % 9)) for w in range(300))
    words += ((0x6C6548, 0x6C6568, 0x6C6548), (WWB, WWB + 1, WWB))
    return HashedProblem(61, 33, 5, 2, words, 2, dtype, torch.int64, 3)


@pytest.mark.parametrize("name", ["cpu", "cpu_all_ids", "triton"])
def test_slots_with_collisions_variants_and_whole_words(name):
    """Small v (retries; v == m: every trigram retries), case variants ("Hel", "HEL") and their
    pattern sharing some / all slots, whole-word rows, int32 ids, the largest id 2**24 - 1; on
    CPU also a few hundred words (each distinct id hashed once, or every id)."""
    k = kernel("cpu" if name.startswith("cpu") else name)
    slots = k.slots
    if name.startswith("cpu"):
        def slots(*args, unique=name == "cpu"):
            return cpu.materialize_slots(*args, unique=unique)
    ids = [0x6C6548, 0x6C6568, WWB + 1, WWB - 1, 0x4C4548, WWB]
    wws = torch.tensor([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]], dtype=torch.int32, device=k.device)
    for v, m, k_lower in ((5, 5, 2), (12, 5, 2), (1000, 5, 2), (1000, 5, 5)):
        t = torch.tensor(ids, dtype=torch.int32, device=k.device)
        got = slots(t, v, m, k_lower, wws)
        assert torch.equal(got.cpu(), reference.slots(t.cpu(), v, m, k_lower, wws.cpu()))
    if name.startswith("cpu"):
        p = _many_words()
        _, ids, _, wws, _ = p.make()
        got = slots(ids, p.v, p.m, p.k_lower, wws)
        assert torch.equal(got, reference.slots(ids, p.v, p.m, p.k_lower, wws))


@pytest.mark.parametrize("name", ["cpu", "triton", "reference"])
def test_forward_matches_float64_reference(name):
    k = kernel(name)

    def run(p):
        weight, ids, offsets, wws, grad = p.make(k.device)
        got = k.fwd(weight, ids, offsets, p.m, p.k_lower, wws)
        check_forward(p, got, weight, ids.cpu(), offsets, wws, grad)
        if name == "cpu":  # and it *is* the trigram bag on the materialized slots, bit for bit
            idx, offs = slot_csr(p, ids, offsets, wws)
            assert torch.equal(got, bag_cpu.trigram_bag_fwd(weight, idx, offs))

    run_examples(bag_problems(**k.sizes), k.examples[1], run)


@pytest.mark.parametrize("name", ["cpu", "reference"])
def test_backward_matches_float64_reference(name):
    k = kernel(name)

    def run(p):
        weight, ids, offsets, wws, grad = p.make(k.device)
        got = k.bwd(grad, weight, ids, offsets, p.m, p.k_lower, wws)
        check_backward(p, got, weight, ids, offsets, wws, grad)

    run_examples(bag_problems(**k.sizes), k.examples[2], run)


WORDS = ((0x6C6548, 0x6C6568, WWB), (), (WWB + 1, 0x414141, 12345), (0x4C4548,))


@pytest.mark.parametrize(("v", "m", "k_lower"), [(40, 4, 2), (7, 6, 3)])
@pytest.mark.parametrize("name", ["cpu", "triton"])
def test_forward_with_case_variants_and_whole_words(name, v, m, k_lower):
    k = kernel(name)
    p = HashedProblem(v, 19, m, k_lower, WORDS, 2, torch.float32, torch.int64, 1)
    weight, ids, offsets, wws, grad = p.make(k.device)
    got = k.fwd(weight, ids, offsets, p.m, p.k_lower, wws)
    check_forward(p, got, weight, ids.cpu(), offsets, wws, grad)


@pytest.mark.parametrize("name", ["cpu", "triton", "triton_atomic"])
def test_backward_with_case_variants_and_whole_words(name):
    """The Triton ``dweight`` both deterministic and with float atomics."""
    k = kernel(name)
    for dtype in (torch.float32, torch.bfloat16):
        p = HashedProblem(40, 19, 4, 2, WORDS, 2, dtype, torch.int64, 1)
        weight, ids, offsets, wws, grad = p.make(k.device)
        got = k.bwd(grad, weight, ids, offsets, p.m, p.k_lower, wws)
        check_backward(p, got, weight, ids.cpu(), offsets, wws, grad)


def test_cpu_backward_is_deterministic():
    p = _many_words()
    weight, ids, offsets, wws, grad = p.make()
    first = cpu.hashed_trigram_bag_bwd(grad, weight, ids, offsets, p.m, p.k_lower, wws)
    for _ in range(2):
        again = cpu.hashed_trigram_bag_bwd(grad, weight, ids, offsets, p.m, p.k_lower, wws)
        assert torch.equal(first, again)


@pytest.mark.parametrize("name", ["cpu", "triton"])
def test_empty_cases(name):
    """No words, only empty words (zero gradients, deterministic or not), h == 0."""
    k = kernel(name)
    w = torch.randn(7, 3, device=k.device)
    none = torch.zeros(0, dtype=torch.int64, device=k.device)
    offsets = torch.zeros(3, dtype=torch.int64, device=k.device)
    assert k.fwd(w, none, offsets[:1], 2, 1, None).shape == (0, 3)
    assert torch.equal(k.fwd(w, none, offsets, 2, 1, None), torch.zeros(2, 3, device=k.device))
    for bwd in ((k.bwd,) if name == "cpu" else (_triton_bwd(True), _triton_bwd(False))):
        dw = bwd(torch.randn(2, 3, device=k.device), w, none, offsets, 2, 1, None)
        assert torch.equal(dw, torch.zeros_like(w))
    assert k.fwd(torch.randn(7, 0, device=k.device), hash_ids([5]).to(k.device),
                 torch.tensor([0, 1], device=k.device), 2, 0, None).shape == (1, 0)


@needs_triton
def test_triton_large_m_falls_back_to_materialized_slots(monkeypatch):
    monkeypatch.setattr(triton_kernel, "MAX_FUSED_M", 2)
    p = HashedProblem(50, 5, 3, 1, ((0x6C6548, 7), (), (WWB,)), 1, torch.float32, torch.int64, 2)
    weight, ids, offsets, wws, grad = p.make(DEVICE)
    got = triton_kernel.hashed_trigram_bag_fwd(weight, ids, offsets, p.m, p.k_lower, wws)
    check_forward(p, got, weight, ids.cpu(), offsets, wws, grad)
    assert torch.equal(triton_kernel.trigram_slots(ids, p.v, p.m, p.k_lower, wws).cpu(),
                       reference.slots(ids.cpu(), p.v, p.m, p.k_lower, wws.cpu()))


@needs_triton
def test_triton_float64_is_refused_naming_weight():
    w = torch.randn(7, 3, dtype=torch.float64, device=DEVICE)
    ids = torch.tensor([5], device=DEVICE)
    with pytest.raises(ValueError, match=r"^hashed_trigram_bag_fwd: weight: torch.float64"):
        triton_kernel.hashed_trigram_bag_fwd(w, ids, torch.tensor([0, 1], device=DEVICE), 2, 0)


# --- the op ------------------------------------------------------------------------------------

TEXTS = [
    "Hello hello HELLO world! The THE the tHe; Straße, Größe und Fräulein <|endoftext|>",
    "",
    "  Zwei  Leerzeichen\n\n und Zahlen 2024 -- <|endoftext|>The end (see HEL hel Hel).",
    "<|no_ws|>aAa AAA aaa ZZZ zzz 42_x x_42 ümlaut ÜMLAUT",
]


def _run(fn, weight, *args, grad):
    w = weight.detach().clone().requires_grad_(True)
    out = fn(w, *args)
    out.backward(grad)
    return out.detach(), w.grad


@pytest.mark.parametrize(("v", "m", "k_lower"), [(32000, 10, 2), (997, 4, 0), (50, 6, 6),
                                                 (8, 8, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_op_equals_trigram_bag_on_tokenizer_slots(v, m, k_lower, dtype):
    """Real text through `TrigramTokenizer(hash_mode="fast")`: the op on trigram ids is bit-equal
    to aa::trigram_bag on the tokenizer's slot list, forward and weight gradient."""
    tok = TrigramTokenizer(vocab_size=v, m=m, k_lower=k_lower, hash_mode="fast")
    batch = tok.encode(TEXTS)
    assert batch.whole_words and "<|endoftext|>" in batch.whole_words
    assert (batch.trigram_ids >= WWB).any()
    g = torch.Generator().manual_seed(v)
    weight = torch.randn(v, 24, generator=g).to(dtype)
    grad = torch.randn(batch.n_words, 24, generator=g).to(dtype)
    got = _run(OP, weight, batch.trigram_ids, batch.trigram_offsets, m, k_lower,
               batch.whole_word_slots, grad=grad)
    want = _run(BAG, weight, batch.indices, batch.offsets, grad=grad)
    assert torch.equal(got[0], want[0])
    assert torch.equal(got[1], want[1])


def test_op_empty_words_and_case_variants_share_slots():
    """An empty word is a zero row; "Hel" with k_lower = m takes all of "hel"'s slots."""
    tok = TrigramTokenizer(vocab_size=300, m=3, k_lower=3)
    hel, hel_upper = 0x6C6568, 0x6C6548
    assert torch.equal(tok.trigram_slots(torch.tensor([hel])),
                       tok.trigram_slots(torch.tensor([hel_upper])))
    weight = torch.randn(300, 5, dtype=torch.float64)
    ids = torch.tensor([hel, hel_upper])
    out = OP(weight, ids, torch.tensor([0, 0, 1, 1, 2, 2]), 3, 3)
    zero = torch.zeros(5, dtype=torch.float64)
    for r in (0, 2, 4):
        assert torch.equal(out[r], zero)
    assert torch.equal(out[1], out[3])
    assert not torch.equal(out[1], OP(weight, ids, torch.tensor([0, 1, 2]), 3, 2)[1])


@settings(max_examples=10, deadline=None)
@given(bag_problems())
def test_op_autograd_matches_float64_reference(p):
    weight, ids, offsets, wws, grad = p.make()
    out, dw = _run(OP, weight, ids, offsets, p.m, p.k_lower, wws, grad=grad)
    check_forward(p, out, weight, ids, offsets, wws, grad)
    check_backward(p, dw, weight, ids, offsets, wws, grad)


def _words():
    return ((0x6C6548, 0x6C6568, 77), (), (WWB, 0x414141), (WWB + 1, WWB, 5, 6, 7, 8, 9))


def test_op_gradcheck_float64():
    weight, ids, offsets, wws, _ = HashedProblem(13, 3, 4, 2, _words(), 2, torch.float64,
                                                 torch.int64, 0).make()
    weight.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda w: OP(w, ids, offsets, 4, 2, wws), (weight,))
    assert torch.autograd.gradcheck(lambda w: OP(w, ids.int(), offsets.int(), 4, 1, wws.int()),
                                    (weight,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_op_every_claimed_dtype(dtype):
    p = HashedProblem(97, 33, 5, 2, _words() * 5, 2, dtype, torch.int64, 4)
    weight, ids, offsets, wws, grad = p.make()
    out, dw = _run(OP, weight, ids, offsets, p.m, p.k_lower, wws, grad=grad)
    assert out.dtype == dw.dtype == dtype
    check_forward(p, out, weight, ids, offsets, wws, grad)
    check_backward(p, dw, weight, ids, offsets, wws, grad)


def test_op_default_backward_is_bitwise_deterministic():
    p = HashedProblem(23, 64, 10, 2, _words() * 30, 2, torch.float32, torch.int64, 5)
    weight, ids, offsets, wws, grad = p.make()
    first = _run(OP, weight, ids, offsets, 10, 2, wws, grad=grad)
    for _ in range(2):
        again = _run(OP, weight, ids, offsets, 10, 2, wws, grad=grad)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


def test_op_no_words_and_no_weight_grad():
    w = torch.randn(4, 3, requires_grad=True)
    out = OP(w, torch.zeros(0, dtype=torch.int64), torch.zeros(1, dtype=torch.int64), 2, 1)
    assert out.shape == (0, 3)
    out.sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w))
    out = OP(w.detach(), torch.tensor([5]), torch.tensor([0, 1]), 2, 1)
    assert not out.requires_grad


def test_op_compiles_fullgraph_with_autograd():
    weight, ids, offsets, wws, grad = HashedProblem(31, 8, 4, 2, _words(), 2, torch.float32,
                                                    torch.int64, 6).make()

    def fn(w, i, o, s):
        return OP(w, i, o, 4, 2, s) * 2

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    w1, w2 = (weight.clone().requires_grad_(True) for _ in range(2))
    compiled(w1, ids, offsets, wws).backward(grad)
    fn(w2, ids, offsets, wws).backward(grad)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=0, atol=0)


W = torch.randn(11, 3)
IDS = torch.tensor([0x6C6548, 5, WWB])
OFFS = torch.tensor([0, 1, 3])
WWS = torch.tensor([[1, 2, 3, 4]])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((W.int(), IDS, OFFS, 4, 2, WWS), "weight must be a float16/bfloat16/float32/float64"),
        ((W[0], IDS, OFFS, 4, 2, WWS), "weight must be 2-D"),
        ((W, IDS, OFFS, 0, 0, None), r"m must be in \[1, min\(v, 2\*\*16\)\].*got m = 0"),
        ((W, IDS, OFFS, 12, 2, None), r"m must be .*cannot exceed v = weight.shape\[0\] = 11"),
        ((torch.randn(2**16 + 1, 1), IDS, OFFS, 2**16 + 1, 2, None), r"m must be .*m <= 65536"),
        ((W, IDS, OFFS, 4, 5, WWS), r"k_lower must be in \[0, m\] = \[0, 4\], got 5"),
        ((W, IDS, OFFS, 4, -1, WWS), r"k_lower must be in \[0, m\]"),
        ((W, IDS.float(), OFFS, 4, 2, WWS), "trigram_ids must be an int64 or int32"),
        ((W, IDS.view(3, 1), OFFS, 4, 2, WWS), "trigram_ids must be 1-D"),
        ((W, IDS, OFFS.float(), 4, 2, WWS), "trigram_offsets must be an int64 or int32"),
        ((W, IDS, torch.zeros(0, dtype=torch.int64), 4, 2, WWS), "trigram_offsets must be 1-D"),
        ((W, IDS, OFFS, 4, 2, WWS.float()), "whole_word_slots must be an int64 or int32"),
        ((W, IDS, OFFS, 4, 2, WWS[:, :3]), r"whole_word_slots must be 2-D \[n_whole, m\]"),
        ((W, IDS, OFFS, 4, 2, WWS[0]), r"whole_word_slots must be 2-D"),
        ((W, IDS, OFFS, 4, 2, None),
         r"trigram_ids must lie in \[0, 2\*\*24\).*pass whole_word_slots.*found 16777216"),
        ((W, torch.tensor([0, 5, WWB + 1]), OFFS, 4, 2, WWS),
         r"trigram_ids must lie in .*\[2\*\*24, 2\*\*24 \+ 1\).*found 16777217"),
        ((W, torch.tensor([0, -3, 2]), OFFS, 4, 2, WWS), r"trigram_ids must lie.*found -3"),
        ((W, IDS, torch.tensor([1, 1, 3]), 4, 2, WWS), "trigram_offsets must start at 0"),
        ((W, IDS, torch.tensor([0, 2, 1, 3]), 4, 2, WWS), "trigram_offsets must be non-decr"),
        ((W, IDS, torch.tensor([0, 1, 2]), 4, 2, WWS), r"trigram_offsets must end at .* 3"),
        ((W, IDS, OFFS, 4, 2, torch.tensor([[1, 2, 11, 0]])),
         r"whole_word_slots must lie in \[0, 11\).*found 11"),
        ((W, IDS, OFFS, 4, 2, torch.tensor([[1, -2, 1, 0]])), r"whole_word_slots must lie.*-2"),
        ((W, IDS.to("meta"), OFFS, 4, 2, WWS), "trigram_ids is on meta, but weight is on cpu"),
        ((W, IDS, OFFS.to("meta"), 4, 2, WWS), "trigram_offsets is on meta"),
        ((W, IDS, OFFS, 4, 2, WWS.to("meta")), "whole_word_slots is on meta"),
    ],
)
def test_op_bad_inputs_raise_value_error_naming_the_argument(args, message):
    with pytest.raises(ValueError, match=message):
        OP(*args)


@pytest.mark.parametrize(
    ("grad", "message"),
    [
        (torch.randn(3, 3), r"grad must have shape \(2, 3\)"),
        (torch.randn(6), r"grad must have shape \(2, 3\)"),
        (torch.randn(2, 3, dtype=torch.float64), "grad must have weight's dtype"),
    ],
)
def test_backward_op_checks_grad_and_inputs(grad, message):
    bwd = torch.ops.aa.hashed_trigram_bag_backward
    with pytest.raises(ValueError, match=message):
        bwd(grad, W, IDS, OFFS, 4, 2, WWS)
    with pytest.raises(ValueError, match=r"trigram_ids must lie"):
        bwd(torch.randn(2, 3), W, IDS, OFFS, 4, 2, None)


def test_check_indices_switch_gates_value_checks_off_cpu(monkeypatch):
    """Off the CPU the values are read only with trigram_bag.CHECK_INDICES (meta tensors stand
    in for a GPU); the CPU always reads them; the fake impl never does."""
    seen = []
    monkeypatch.setattr(reference, "check_inputs",
                        lambda *a, check_values, **k: seen.append(check_values))
    meta = [t.to("meta") for t in (W, IDS, OFFS)]
    for flag in (False, True):
        monkeypatch.setattr(op_module.trigram_bag_op, "CHECK_INDICES", flag)
        op_module.check_inputs(*meta, 4, 2, None, values=True, op="x")
        op_module.check_inputs(W, IDS, OFFS, 4, 2, WWS, values=True, op="x")
        op_module.check_inputs(W, IDS, OFFS, 4, 2, WWS, values=False, op="x")
    assert seen == [False, True, False, True, True, False]
