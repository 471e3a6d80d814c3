"""aa::hashed_trigram_bag as an op: equal to aa::trigram_bag on the tokenizer's materialized
slots for real text (whole-hashed words, case variants, empty words), autograd against the
float64 reference, gradcheck, determinism, bad inputs (ValueError naming the argument), the
value-check switch, and compiling it."""

from __future__ import annotations

import pytest
import torch
from aa_compile.kernels.hashed_trigram_bag import reference
from hypothesis import given, settings

import aa_compile.ops.hashed_trigram_bag as op_module
from aa_compile.models.tfree import TrigramTokenizer

from .kernels.test_hashed_trigram_bag_cpu import (
    WWB,
    HashedProblem,
    bag_problems,
    check_backward,
    check_forward,
)

OP = torch.ops.aa.hashed_trigram_bag
BAG = torch.ops.aa.trigram_bag

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
def test_equals_trigram_bag_on_tokenizer_slots(v, m, k_lower, dtype):
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


def test_empty_words_and_case_variants_share_slots():
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
def test_autograd_matches_float64_reference(p):
    weight, ids, offsets, wws, grad = p.make()
    out, dw = _run(OP, weight, ids, offsets, p.m, p.k_lower, wws, grad=grad)
    check_forward(p, out, weight, ids, offsets, wws, grad)
    check_backward(p, dw, weight, ids, offsets, wws, grad)


def _words():
    return ((0x6C6548, 0x6C6568, 77), (), (WWB, 0x414141), (WWB + 1, WWB, 5, 6, 7, 8, 9))


def test_gradcheck_float64():
    weight, ids, offsets, wws, _ = HashedProblem(13, 3, 4, 2, _words(), 2, torch.float64,
                                                 torch.int64, 0).make()
    weight.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda w: OP(w, ids, offsets, 4, 2, wws), (weight,))
    assert torch.autograd.gradcheck(lambda w: OP(w, ids.int(), offsets.int(), 4, 1, wws.int()),
                                    (weight,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_every_claimed_dtype(dtype):
    p = HashedProblem(97, 33, 5, 2, _words() * 5, 2, dtype, torch.int64, 4)
    weight, ids, offsets, wws, grad = p.make()
    out, dw = _run(OP, weight, ids, offsets, p.m, p.k_lower, wws, grad=grad)
    assert out.dtype == dw.dtype == dtype
    check_forward(p, out, weight, ids, offsets, wws, grad)
    check_backward(p, dw, weight, ids, offsets, wws, grad)


def test_default_backward_is_bitwise_deterministic():
    p = HashedProblem(23, 64, 10, 2, _words() * 30, 2, torch.float32, torch.int64, 5)
    weight, ids, offsets, wws, grad = p.make()
    first = _run(OP, weight, ids, offsets, 10, 2, wws, grad=grad)
    for _ in range(2):
        again = _run(OP, weight, ids, offsets, 10, 2, wws, grad=grad)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


def test_no_words_and_no_weight_grad():
    w = torch.randn(4, 3, requires_grad=True)
    out = OP(w, torch.zeros(0, dtype=torch.int64), torch.zeros(1, dtype=torch.int64), 2, 1)
    assert out.shape == (0, 3)
    out.sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w))
    out = OP(w.detach(), torch.tensor([5]), torch.tensor([0, 1]), 2, 1)
    assert not out.requires_grad


def test_compiles_fullgraph_with_autograd():
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
def test_bad_inputs_raise_value_error_naming_the_argument(args, message):
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
        monkeypatch.setattr(op_module._trigram_bag_op, "CHECK_INDICES", flag)
        op_module._check(*meta, 4, 2, None, values=True, op="x")
        op_module._check(W, IDS, OFFS, 4, 2, WWS, values=True, op="x")
        op_module._check(W, IDS, OFFS, 4, 2, WWS, values=False, op="x")
    assert seen == [False, True, False, True, True, False]
