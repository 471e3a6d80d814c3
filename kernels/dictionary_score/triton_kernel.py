"""Triton kernel of `aa::dictionary_score` (CUDA; numerics: ``reference.py``): one program per
(``BLOCK_W`` words, batch row) walks the words' CSR segments in ``[BLOCK_W, BLOCK_E]`` tiles,
sums ``probs[b, slots] * slot_weights`` in float32 and normalises before its single store (the
raw sums never go to memory). Top-k is `cpu.ordered_topk` on the scores (torch ops). float16 /
bfloat16 / float32 probabilities; the op runs float64 through ``cpu.py``."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import cpu, reference

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: words per program
BLOCK_W = 32
#: entries per word per step
BLOCK_E = 32


@triton.jit
def _score_kernel(
    p_ptr,
    offsets_ptr,
    slots_ptr,
    weights_ptr,
    ntri_ptr,
    total_ptr,
    out_ptr,
    n_words,
    V,
    M,
    BLOCK_W: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """``out[b, words] = normalised sum_j weights[j] * p[b, slots[j]]`` over each word's entries."""
    words = tl.program_id(0).to(tl.int64) * BLOCK_W + tl.arange(0, BLOCK_W)
    b = tl.program_id(1).to(tl.int64)
    wmask = words < n_words
    start = tl.load(offsets_ptr + words, mask=wmask, other=0).to(tl.int64)
    end = tl.load(offsets_ptr + words + 1, mask=wmask, other=0).to(tl.int64)
    length = end - start
    longest = tl.max(length, axis=0)
    acc = tl.zeros([BLOCK_W], dtype=tl.float32)
    for s in range(0, longest, BLOCK_E):
        e = s + tl.arange(0, BLOCK_E)
        emask = e[None, :] < length[:, None]
        ent = start[:, None] + e[None, :]
        slot = tl.load(slots_ptr + ent, mask=emask, other=0).to(tl.int64)
        weight = tl.load(weights_ptr + ent, mask=emask, other=0.0).to(tl.float32)
        prob = tl.load(p_ptr + b * V + slot, mask=emask, other=0.0).to(tl.float32)
        acc += tl.sum(prob * weight, axis=1)
    ntri = tl.load(ntri_ptr + words, mask=wmask, other=1)
    on = tl.where(ntri == 0, 1, ntri * M).to(tl.float32)  # no 0/0 (the score is -inf there)
    off = tl.maximum(V - on, 1.0)
    total = tl.load(total_ptr + b)
    score = acc / on + (acc - total) / off
    score = tl.where(ntri == 0, float("-inf"), score)
    tl.store(out_ptr + b * n_words + words, score, mask=wmask)


def scores(probs, word_offsets, slots, slot_weights, n_trigrams, m: int) -> Tensor:
    """``[B, n_words]`` float32 scores (input assumed valid: the op checks it)."""
    reference.check_inputs(probs, word_offsets, slots, slot_weights, n_trigrams, m, 0,
                           check_values=False, op="dictionary_score triton")
    if probs.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"dictionary_score triton: probs: {probs.dtype} is not supported by "
                         "the Triton kernel; use the CPU module (kernels/dictionary_score/cpu.py)")
    b, v = probs.shape
    n_words = word_offsets.numel() - 1
    out = torch.empty(b, n_words, dtype=torch.float32, device=probs.device)
    if b == 0 or n_words == 0:
        return out
    p = probs.contiguous()
    total = p.float().sum(-1)
    _score_kernel[(triton.cdiv(n_words, BLOCK_W), b)](
        p, word_offsets.contiguous(), slots.contiguous(), slot_weights.contiguous(),
        n_trigrams.contiguous(), total, out, n_words, v, m,
        BLOCK_W=BLOCK_W, BLOCK_E=BLOCK_E, num_warps=4,
    )
    return out


def dictionary_score(probs, word_offsets, slots, slot_weights, n_trigrams, m: int, k: int
                     ) -> tuple[Tensor, Tensor]:
    """``k >= 1``: top-k ``(values, indices)``; ``k == 0``: ``(scores, [B, 0] int64)``."""
    score = scores(probs, word_offsets, slots, slot_weights, n_trigrams, m)
    if k == 0:
        return score, torch.empty(score.shape[0], 0, dtype=torch.int64, device=score.device)
    return cpu.ordered_topk(score, k)
