"""Property tests: the Triton trigram-bag kernels against the float64 reference.

Without CUDA the kernels run in the Triton interpreter on CPU tensors (TRITON_INTERPRET must be
set before the kernel module is imported), so sizes and example counts are kept small.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from hypothesis import given, settings  # noqa: E402

from aa_compile.kernels.trigram_bag import triton_kernel  # noqa: E402

from .test_trigram_bag_cpu import (  # noqa: E402
    Problem,
    check,
    eager_embedding_bag,
    problems,
    references,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Small in the interpreter (every program runs in Python); h = 300 spans two column blocks.
SMALL = dict(dtypes=DTYPES, max_bags=30, max_v=80, hs=(1, 3, 17, 64, 129, 300))


@settings(max_examples=20, deadline=None)
@given(problems(**SMALL))
def test_forward_matches_reference(p):
    weight, indices, offsets, psw, grad = p.make(DEVICE)
    (want, _, _), (scale, _, _) = references(weight, indices, offsets, psw, grad)
    eager = eager_embedding_bag(weight, indices, offsets, psw, grad)[0]
    check(triton_kernel.trigram_bag_fwd(weight, indices, offsets, psw), want, scale, p.dtype, eager)


def _check_backward(p, deterministic):
    weight, indices, offsets, psw, grad = p.make(DEVICE)
    (_, dw64, dpsw64), (_, dw_s, dpsw_s) = references(weight, indices, offsets, psw, grad)
    _, dw_e, dpsw_e = eager_embedding_bag(weight, indices, offsets, psw, grad)
    dw, dpsw = triton_kernel.trigram_bag_bwd(
        grad, weight, indices, offsets, psw, True, True, deterministic
    )
    check(dw, dw64, dw_s, p.dtype, dw_e)
    if psw is None:
        assert dpsw is None
    else:
        check(dpsw, dpsw64, dpsw_s, p.dtype, dpsw_e)


@settings(max_examples=15, deadline=None)
@given(problems(**SMALL))
def test_backward_matches_reference(p):
    _check_backward(p, deterministic=True)


@settings(max_examples=6, deadline=None)
@given(problems(**SMALL))
def test_atomic_backward_matches_reference(p):
    _check_backward(p, deterministic=False)


def _runs_problem(dtype=torch.float32):
    """Long runs of equal index (hot slots) and bags longer than one BLOCK_N step."""
    sizes = (0, 37, 5, 0, 19, 40, 1)
    return Problem(5, 129, sizes, True, dtype, torch.int64, True, 3).make(DEVICE)


@pytest.mark.parametrize("v", [300, 32767, 32768, 70000])  # int16 / int32 sort keys
def test_backward_segments_for_large_vocab(v, monkeypatch):
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_default_backward_is_deterministic(dtype):
    weight, indices, offsets, psw, grad = _runs_problem(dtype)
    first = triton_kernel.trigram_bag_bwd(grad, weight, indices, offsets, psw)
    for _ in range(2):
        again = triton_kernel.trigram_bag_bwd(grad, weight, indices, offsets, psw)
        assert torch.equal(first[0], again[0])
        assert torch.equal(first[1], again[1])


def test_empty_and_zero_bag_cases():
    w = torch.randn(4, 3, device=DEVICE)
    none = torch.zeros(0, dtype=torch.int64, device=DEVICE)
    out = triton_kernel.trigram_bag_fwd(w, none, torch.zeros(1, dtype=torch.int64, device=DEVICE))
    assert out.shape == (0, 3)
    offsets = torch.zeros(3, dtype=torch.int64, device=DEVICE)
    assert torch.equal(triton_kernel.trigram_bag_fwd(w, none, offsets), torch.zeros_like(w[:2]))
    for det in (True, False):
        dw, _ = triton_kernel.trigram_bag_bwd(w[:2], w, none, offsets, None, True, True, det)
        assert torch.equal(dw, torch.zeros_like(w))


def _args(**over):
    a = dict(
        weight=torch.randn(5, 3, device=DEVICE),
        indices=torch.tensor([0, 4, 2], device=DEVICE),
        offsets=torch.tensor([0, 1, 3], device=DEVICE),
        per_sample_weights=None,
    )
    a.update(over)
    return a


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
def test_bad_input_raises_naming_argument(over, name):
    over = {k: v.to(DEVICE) for k, v in over.items()}
    with pytest.raises(ValueError, match=rf"^trigram_bag_fwd: {name}"):
        triton_kernel.trigram_bag_fwd(**_args(**over))


@pytest.mark.parametrize("grad_shape", [(3, 3), (2, 4), (6,)])
def test_backward_checks_grad_shape(grad_shape):
    a = _args()
    grad = torch.randn(grad_shape, device=DEVICE)
    with pytest.raises(ValueError, match=r"^trigram_bag_bwd: grad must have shape \(2, 3\)"):
        triton_kernel.trigram_bag_bwd(grad, *a.values())
