"""Kernels of `aa::dictionary_score` (T-FREE dictionary decoding: score every dictionary word
against the head's slot probabilities, then top-k), one module per device, with the reference.

- ``reference.py``: plain PyTorch (gather + ``index_add_``, a full stable sort for top-k), the
  numerics spec and tie order the tests compare against, and ``check_inputs``;
- ``cpu.py``: ATen's embedding bag over the transposed probabilities, a two-pass
  normalisation and a candidate-based top-k (also used on CUDA for float64 and without Triton);
- ``triton_kernel.py``: the CUDA path (segment sums + normalisation in one kernel).
"""

from __future__ import annotations

import torch
from aa_compile.kernels.lazy_triton import triton_module
from torch import Tensor

from . import cpu, reference  # noqa: F401  (reference: re-exported for tests)


def _triton():
    return triton_module(__name__)


def dictionary_score(probs, word_offsets, slots, slot_weights, n_trigrams, m: int, k: int
                     ) -> tuple[Tensor, Tensor]:
    """Dispatch by device: Triton on CUDA (not float64), else the CPU module."""
    if (probs.device.type == "cuda" and probs.dtype != torch.float64
            and _triton() is not None):
        return _triton().dictionary_score(probs, word_offsets, slots, slot_weights, n_trigrams,
                                          m, k)
    return cpu.dictionary_score(probs, word_offsets, slots, slot_weights, n_trigrams, m, k)
