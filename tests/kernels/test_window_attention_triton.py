"""The Triton flash kernels of aa::window_attention against the float64 reference.

Without CUDA they run in the Triton interpreter on CPU tensors (16-row blocks there, so T up to
40 crosses block edges), hence tiny shapes and few examples.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from aa_compile.kernels.window_attention import triton_kernel
from hypothesis import given, settings

from .test_window_attention_cpu import Problem, problems, run_and_check

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _on_device(fn):
    def run(*args):
        moved = [a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args]
        return [x.cpu() for x in fn(*moved)]
    return run


FORWARD = _on_device(triton_kernel.forward)
BACKWARD = _on_device(triton_kernel.backward)


@settings(max_examples=6 if DEVICE == "cpu" else 50)
@given(problems(max_t=40, dtypes=DTYPES, lead=((), (2,))))
def test_triton_matches_float64_reference(p):
    run_and_check(p, FORWARD, BACKWARD)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gqa_documents_and_window_across_blocks(dtype):
    """Fixed case: 3 query heads per key head, a window crossing 16-row blocks, an empty and a
    one-token document, odd D, gradient of lse."""
    p = Problem((), 1, 3, 37, 20, (9, 0, 1, 27), 19, dtype, None, True, 7)
    run_and_check(p, FORWARD, BACKWARD)


def test_float64_is_refused():
    q = torch.randn(2, 4, 8, dtype=torch.float64, device=DEVICE)
    with pytest.raises(ValueError, match=r"^q: .*float64"):
        triton_kernel.forward(q, q, q, None, 2, None)
