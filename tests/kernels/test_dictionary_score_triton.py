"""Property tests: the Triton dictionary-scoring kernel against the float64 reference.

Without CUDA the kernel runs in the Triton interpreter on CPU tensors (TRITON_INTERPRET must be
set before the kernel module is imported), so sizes and example counts are kept small; words
per dictionary go past one ``BLOCK_W`` block and entries per word past one ``BLOCK_E`` step.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

import hypothesis.strategies as st
from aa_compile.kernels.dictionary_score import triton_kernel
from hypothesis import given, settings

from .test_dictionary_score_cpu import Problem, problems, run_and_check

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@settings(max_examples=8, deadline=None)
@given(problems(dtypes=DTYPES, max_words=70, max_v=200, max_b=3), st.data())
def test_matches_float64_reference(p, data):
    k = data.draw(st.integers(0, p.n_words))
    run_and_check(triton_kernel.dictionary_score, p, k, DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_dtype_with_ties_and_long_words(dtype):
    sizes = (3, 0, 95, 40, 1, 33, 0, 64) * 5  # 40 words (> BLOCK_W), up to 95 entries
    run_and_check(triton_kernel.dictionary_score, Problem(129, 2, 10, sizes, 4, dtype,
                                                          torch.int32, 7), 12, DEVICE)


def test_b1_and_empty_dictionary():
    run_and_check(triton_kernel.dictionary_score,
                  Problem(31, 1, 3, (5, 2, 0, 7), 2, torch.float32, torch.int64, 3), 6, DEVICE)
    z = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    none = torch.zeros(0, dtype=torch.int64, device=DEVICE)
    s, i = triton_kernel.dictionary_score(torch.rand(2, 7, device=DEVICE), z, none,
                                          torch.zeros(0, device=DEVICE), none, 1, 0)
    assert s.shape == (2, 0) and i.shape == (2, 0)


def test_float64_is_refused_with_a_pointer_to_the_cpu_path():
    probs = torch.rand(1, 4, dtype=torch.float64, device=DEVICE)
    offs = torch.tensor([0, 1], device=DEVICE)
    with pytest.raises(ValueError, match="probs: torch.float64 is not supported"):
        triton_kernel.scores(probs, offs, offs[:1], torch.ones(1, device=DEVICE),
                             offs[1:], 1)
