"""aa::trigram_bag as an op: autograd against the float64 reference, gradcheck, determinism,
bad inputs (ValueError naming the argument), the CHECK_INDICES switch, and compiling it; and
the CPU kernel's large-output path (chunked outputs, huge pages) and numpy bookkeeping."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings

import aa_compile.ops.trigram_bag as trigram_bag_op
from aa_compile.kernels.trigram_bag import cpu, reference

from .kernels.test_trigram_bag_cpu import Problem, check, eager_embedding_bag, problems, references

OP = torch.ops.aa.trigram_bag


def _run_op(weight, indices, offsets, psw, grad, **kwargs):
    """Forward and backward through the op: ``(out, dweight, dpsw)``."""
    w = weight.detach().clone().requires_grad_(True)
    p = None if psw is None else psw.detach().clone().requires_grad_(True)
    out = OP(w, indices, offsets, p, **kwargs)
    out.backward(grad)
    return out.detach(), w.grad, (None if p is None else p.grad)


@settings(max_examples=15, deadline=None)
@given(problems())
def test_autograd_matches_float64_reference(p):
    weight, indices, offsets, psw, grad = p.make()
    wants, scales = references(weight, indices, offsets, psw, grad)
    eagers = eager_embedding_bag(weight, indices, offsets, psw, grad)
    gots = _run_op(weight, indices, offsets, psw, grad)
    for got, want, scale, eager in zip(gots, wants, scales, eagers):
        if want is None:
            assert got is None
        else:
            check(got, want, scale, p.dtype, eager)


def test_gradcheck_float64():
    weight, indices, offsets, psw, _ = Problem(
        6, 3, (2, 0, 4, 1), False, torch.float64, torch.int64, True, 0
    ).make()
    indices[1] = indices[0]  # a slot twice in one bag
    weight.requires_grad_(True)
    psw.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda w, s: OP(w, indices, offsets, s), (weight, psw))
    assert torch.autograd.gradcheck(lambda w: OP(w, indices.int(), offsets), (weight,))


def test_only_requested_gradients():
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


def test_default_backward_is_bitwise_deterministic():
    sizes = tuple((i * 11) % 57 for i in range(90))
    weight, indices, offsets, psw, grad = Problem(
        23, 64, sizes, False, torch.float32, torch.int64, True, 5
    ).make()
    first = _run_op(weight, indices, offsets, psw, grad)
    for _ in range(2):
        again = _run_op(weight, indices, offsets, psw, grad)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


def test_semantics_equal_embedding_bag():
    weight, indices, offsets, psw, _ = Problem(
        50, 17, (5, 0, 9, 0), False, torch.float64, torch.int32, True, 4
    ).make()
    want = F.embedding_bag(indices, weight, offsets[:-1], mode="sum", per_sample_weights=psw)
    torch.testing.assert_close(OP(weight, indices, offsets, psw), want)


def test_empty_bags_and_no_bags():
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
def test_weight_without_rows_and_no_indices_matches_embedding_bag(h, n_bags, dtype, psw):
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


def test_weight_without_rows_still_rejects_an_index():
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 0\) \(weight has 0 rows\), "
                                         r"found 0"):
        OP(torch.zeros(0, 4), torch.tensor([0]), torch.tensor([0, 1]))


def test_compiles_fullgraph_with_autograd():
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
def test_bad_inputs_raise_value_error_naming_the_argument(args, message):
    with pytest.raises(ValueError, match=message):
        OP(*args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("psw", [False, True])
@pytest.mark.parametrize("idx_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("bad", [-1, 5, 1000])
def test_out_of_range_index_raises_for_every_dtype(dtype, psw, idx_dtype, bad):
    """On CPU the forward leaves the range check to the kernel and converts its error."""
    w = W.to(dtype)
    p = torch.ones(3, dtype=dtype) if psw else None
    idx = torch.tensor([0, bad, 2], dtype=idx_dtype)
    with pytest.raises(ValueError, match=rf"indices must lie in \[0, 5\).*found {bad}"):
        OP(w, idx, OFFS.to(idx_dtype), p)


def test_out_of_range_index_with_zero_width_weight():
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

    monkeypatch.setattr(trigram_bag_op.reference, "check_inputs", spy)
    meta = [t.to("meta") for t in (W, IDX, OFFS)]
    for flag in (False, True):
        monkeypatch.setattr(trigram_bag_op, "CHECK_INDICES", flag)
        trigram_bag_op._check(*meta, None, values=True, op="x")
        trigram_bag_op._check(W, IDX, OFFS, None, values=True, op="x")
        trigram_bag_op._check(W, IDX, OFFS, None, values=False, op="x")  # fake impl
    assert seen == [False, True, False, True, True, False]


def test_inductor_decomposes_the_cpu_forward_but_keeps_our_backward(monkeypatch):
    """Under backend="aa" (inductor) the CPU forward is ATen's embedding bag called from the
    generated code (the Python kernel never runs), the backward is still our op, and the value
    checks survive as asserts (RuntimeError with the op's message)."""
    import aa_compile.kernels.trigram_bag as kernels

    calls = {"forward": 0, "backward": 0}
    fwd, bwd = kernels.forward, kernels.backward

    def count(name, fn):
        def wrapped(*args):
            calls[name] += 1
            return fn(*args)
        return wrapped

    monkeypatch.setattr(kernels, "forward", count("forward", fwd))
    monkeypatch.setattr(kernels, "backward", count("backward", bwd))
    weight, indices, offsets, _, grad = Problem(
        12, 8, (3, 0, 6, 2), False, torch.float32, torch.int64, False, 7
    ).make()
    compiled = torch.compile(lambda w, i, o: OP(w, i, o) * 2, backend="aa")
    w1 = weight.clone().requires_grad_(True)
    w2 = weight.clone().requires_grad_(True)
    out = compiled(w1, indices, offsets)
    out.backward(grad)
    (F.embedding_bag(indices, w2, offsets, mode="sum", include_last_offset=True) * 2).backward(grad)
    torch.testing.assert_close(out, (OP(weight, indices, offsets) * 2))
    torch.testing.assert_close(w1.grad, w2.grad)
    assert calls == {"forward": 1, "backward": 1}  # forward: the eager OP call above only
    bad_index = indices.clone()
    bad_index[2] = 12
    # ATen's own check ("... not in the valid range [0, 12)"); the second spelling is what a
    # graph compiled by an older version of the decomposition (an inductor assert) says, which
    # inductor's FX graph cache may still hold: its key does not cover decompositions
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


# --- CPU kernel internals: chunked large outputs, huge pages, numpy segments -----------------

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
    monkeypatch.setattr(cpu, "HUGE_PAGES", False)
    assert torch.equal(cpu.weight_grad(grad, weight, indices, offsets, psw,
                                       chunk_bytes=1 << 20), one_call)


def test_advise_huge_pages_is_only_a_hint(monkeypatch):
    import sys

    big = torch.empty((cpu.HUGE_PAGE_MIN_BYTES + (4 << 20)) // 4, dtype=torch.float32)
    assert not cpu.advise_huge_pages(torch.empty(8))  # below the threshold
    assert not cpu.advise_huge_pages(big.to("meta"))  # not CPU memory
    advised = cpu.advise_huge_pages(big)
    assert advised == sys.platform.startswith("linux")
    big.fill_(3.0)
    assert bool((big == 3.0).all())
    monkeypatch.setattr(cpu, "HUGE_PAGES", False)
    assert not cpu.advise_huge_pages(big)


def test_inductor_leaves_large_forward_outputs_to_the_chunked_kernel(monkeypatch):
    """An output known to exceed CHUNK_BYTES is not decomposed into a direct ATen call: the
    op's chunked kernel runs inside the compiled graph, with the same result."""
    import aa_compile.kernels.trigram_bag as kernels

    calls = []
    fwd = kernels.forward
    monkeypatch.setattr(kernels, "forward", lambda *a: calls.append(1) or fwd(*a))
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
    assert calls == [1]
    want = F.embedding_bag(indices, weight, offsets, mode="sum", include_last_offset=True) * 2
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(w.grad, 2 * reference.trigram_bag_backward(
        grad, weight, indices, offsets)[0])
    torch._dynamo.reset()
