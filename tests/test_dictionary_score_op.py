"""aa::dictionary_score and aa::csr_offsets as ops: bad inputs (ValueError naming the argument),
inference-only autograd, the CHECK_INDICES switch, compiling, and the CSR memo.
(opcheck runs on both through tests/test_ops.py.)"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import aa_compile.ops.dictionary_score as op_module

from .kernels.test_dictionary_score_cpu import problems, run_and_check

OP = torch.ops.aa.dictionary_score
CSR = torch.ops.aa.csr_offsets

P = torch.rand(2, 10)
OFFS = torch.tensor([0, 2, 3, 3])
SLOTS = torch.tensor([1, 9, 4])
W = torch.tensor([1.0, 0.5, 1.0])
NT = torch.tensor([2, 1, 0])


@settings(max_examples=10, deadline=None)
@given(problems(max_words=20, max_v=100))
def test_op_matches_float64_reference(p):
    run_and_check(lambda *a: OP(*a), p, min(p.n_words, 3))


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
def test_bad_inputs_raise_value_error_naming_the_argument(args, message):
    with pytest.raises(ValueError, match=message):
        OP(*args)


def test_k0_returns_all_scores_and_topk_agrees():
    scores, none = OP(P, OFFS, SLOTS, W, NT, 2, 0)
    assert scores.shape == (2, 3) and none.shape == (2, 0)
    assert torch.isinf(scores[:, 2]).all()
    values, indices = OP(P, OFFS, SLOTS, W, NT, 2, 3)
    assert torch.equal(values, scores.gather(1, indices))


def test_inference_only_outputs_are_non_differentiable():
    p = P.clone().requires_grad_(True)
    values, indices = OP(p, OFFS, SLOTS, W, NT, 1, 2)
    assert not values.requires_grad and not indices.requires_grad
    with pytest.raises(RuntimeError, match="does not require grad"):
        values.sum().backward()


def test_compiles_fullgraph():
    def fn(p):
        values, indices = OP(p.sigmoid(), OFFS, SLOTS, W, NT, 1, 2)
        return values * 2, indices

    got = torch.compile(fn, backend="aot_eager", fullgraph=True)(P)
    want = fn(P)
    torch.testing.assert_close(got, want)


def test_check_indices_switch_gates_value_checks_off_cpu(monkeypatch):
    seen = []
    monkeypatch.setattr(op_module.reference, "check_inputs",
                        lambda *a, check_values, **k: seen.append(check_values))
    meta = [t.to("meta") for t in (P, OFFS, SLOTS, W, NT)]
    for flag in (False, True):
        monkeypatch.setattr(op_module, "CHECK_INDICES", flag)
        op_module._check(*meta, 1, 1, values=True)
        op_module._check(P, OFFS, SLOTS, W, NT, 1, 1, values=True)
    assert seen == [False, True, True, True]


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


def test_value_checks_rerun_after_an_in_place_change():
    slots = SLOTS.clone()
    OP(P, OFFS, slots, W, NT, 1, 1)  # validated (and remembered)
    OP(P, OFFS, slots, W, NT, 1, 1)
    slots[1] = 10
    with pytest.raises(ValueError, match=r"slots must lie in \[0, 10\)"):
        OP(P, OFFS, slots, W, NT, 1, 1)


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


def test_out_of_range_slot_after_a_write_through_data_names_slots():
    slots = SLOTS.clone()
    OP(P, OFFS, slots, W, NT, 1, 1)  # valid (and, once, remembered as such)
    slots.data[1] = 10
    with pytest.raises(ValueError, match=r"slots must lie in \[0, 10\) \(probs has 10 columns\), "
                                         r"found 10"):
        OP(P, OFFS, slots, W, NT, 1, 1)
    slots.data[1] = -1
    with pytest.raises(ValueError, match=r"slots must lie in \[0, 10\).*found -1"):
        OP(P.double(), OFFS, slots, W, NT, 1, 1)


def test_bad_trigram_counts_after_a_write_through_data():
    nt = NT.clone()
    OP(P, OFFS, SLOTS, W, nt, 1, 1)
    nt.data[0] = -1
    with pytest.raises(ValueError, match="n_trigrams must be >= 0, found -1"):
        OP(P, OFFS, SLOTS, W, nt, 1, 1)
