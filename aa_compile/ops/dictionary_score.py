"""`aa::dictionary_score`: T-FREE dictionary decoding (score every word, normalise, top-k), and
`aa::csr_offsets`, the sorted-COO -> CSR conversion its graph pass inserts.

    aa::dictionary_score(Tensor probs, Tensor word_offsets, Tensor slots, Tensor slot_weights,
                         Tensor n_trigrams, int m, int k) -> (Tensor values, Tensor indices)
    aa::csr_offsets(Tensor row_ids, int n_rows) -> Tensor

``probs [B, v]`` slot probabilities (float16/bfloat16/float32/float64); the dictionary in CSR
form: ``word_offsets [n_words + 1]`` (int32/int64; starts at 0, non-decreasing, ends at nnz),
``slots [nnz]`` (in ``[0, v)``), ``slot_weights [nnz]`` (float), ``n_trigrams [n_words]``
(>= 0); ``m`` slots per trigram. Scores (numerics: ``kernels/dictionary_score/reference.py``)
are float32 (float64 for float64 ``probs``). ``k >= 1``: the k best words per row, descending,
**ties: the lower word index first** on every device; ``k == 0``: the whole score matrix and an
empty ``[B, 0]`` (for callers that post-process all scores). Inference only: the outputs never
require grad (so training-mode graphs, where aot_autograd traces a backward, still compile).
Kernels: CPU ``kernels/dictionary_score/cpu.py`` (also other devices, and float64 on CUDA),
CUDA ``kernels/dictionary_score/triton_kernel.py``.

Input checks raise ``ValueError`` naming the argument: the values (offsets, slots, trigram
counts) on CPU always, elsewhere with `CHECK_INDICES` (a device sync); nothing is remembered
between calls (``.data`` writes bypass the version counter). See `check` and `_cpu`.

``aa::csr_offsets(row_ids, n_rows)``: ``offsets [n_rows + 1]`` int64 with ``row_ids[offsets[r]:
offsets[r + 1]] == r``; ``row_ids`` must be non-decreasing and in ``[0, n_rows)`` (checked on
every call). A dictionary's word ids are constant across decoding steps, so the last results
are reused when they fit the current contents (`_offsets_fit`: a check of the values, not of
the version counter).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from aa_compile.kernels.dictionary_score import cpu, reference

from .registry import register_kernels, register_onnx, register_samples, triton_kernel

#: Check offsets / slots / trigram-count *values* on non-CPU devices too (a device sync per
#: call). CPU always checks. From the environment variable ``AA_DICTIONARY_CHECK_INDICES``.
CHECK_INDICES: bool = os.environ.get("AA_DICTIONARY_CHECK_INDICES", "0").strip().lower() not in (
    "", "0", "false", "no", "off",
)
OP = "aa::dictionary_score"
_TRITON = "aa_compile.kernels.dictionary_score.triton_kernel"


def check(probs, word_offsets, slots, slot_weights, n_trigrams, m, k, *, values: bool = True,
          check_slots: bool = True) -> None:
    """The argument checks: metadata always; with ``values`` the offsets, trigram counts and
    (with ``check_slots``) the slot range on CPU, elsewhere only with `CHECK_INDICES`."""
    check_values = values and (probs.device.type == "cpu" or CHECK_INDICES)
    reference.check_inputs(probs, word_offsets, slots, slot_weights, n_trigrams, m, k,
                           check_values=check_values, check_slots=check_slots, op=OP)


@torch.library.custom_op("aa::dictionary_score", mutates_args=())
def dictionary_score(
    probs: Tensor,
    word_offsets: Tensor,
    slots: Tensor,
    slot_weights: Tensor,
    n_trigrams: Tensor,
    m: int,
    k: int,
) -> tuple[Tensor, Tensor]:
    check(probs, word_offsets, slots, slot_weights, n_trigrams, m, k)
    return cpu.dictionary_score(probs, word_offsets, slots, slot_weights, n_trigrams, m, k)


@dictionary_score.register_fake
def _(probs, word_offsets, slots, slot_weights, n_trigrams, m, k):
    check(probs, word_offsets, slots, slot_weights, n_trigrams, m, k, values=False)
    b, n_words = probs.shape[0], word_offsets.shape[0] - 1
    acc = reference.compute_dtype(probs.dtype)
    width = n_words if k == 0 else k
    return (probs.new_empty(b, width, dtype=acc),
            probs.new_empty(b, 0 if k == 0 else k, dtype=torch.int64))


def _cpu(probs, word_offsets, slots, slot_weights, n_trigrams, m, k):
    """``cpu.dictionary_score`` with the slot range left to ATen's embedding bag, which
    bounds-checks every slot it reads (none when B == 0: then they are checked here); its
    error reruns the full check, which raises the ValueError naming the bad slot."""
    args = (probs, word_offsets, slots, slot_weights, n_trigrams, m, k)
    bag_checks = probs.dim() == 2 and probs.shape[0] > 0
    check(*args, check_slots=not bag_checks)
    try:
        return cpu.dictionary_score(*args)
    except RuntimeError:
        if bag_checks:
            check(*args)
        raise


_triton = triton_kernel(_TRITON, "dictionary_score", fallback=cpu.dictionary_score)


def _cuda(probs, word_offsets, slots, slot_weights, n_trigrams, m, k):
    """Triton for 16/32-bit floats; float64 runs ``cpu.py`` (ATen ops)."""
    fn = cpu.dictionary_score if probs.dtype == torch.float64 else _triton
    return fn(probs, word_offsets, slots, slot_weights, n_trigrams, m, k)


register_kernels(dictionary_score, cpu=_cpu)  # checks its arguments itself (see _cpu)
register_kernels(dictionary_score, check=check, cuda=_cuda)


def _setup_context(ctx, inputs, output):
    ctx.mark_non_differentiable(*output)


def _backward(ctx, *grads):  # never called: the outputs are non-differentiable
    return (None,) * 7


dictionary_score.register_autograd(_backward, setup_context=_setup_context)


# -- aa::csr_offsets ------------------------------------------------------------------------

#: the last few ``(row_ids, n_rows)`` conversions: ``(data_ptr, numel, dtype, device, n_rows)``
#: -> offsets, a candidate that `_offsets_fit` checks against the current contents
_OFFSETS: dict[tuple, Tensor] = {}
_OFFSETS_SIZE = 8


def _check_row_ids(row_ids: Tensor, n_rows: int, op: str = "aa::csr_offsets") -> None:
    if not isinstance(row_ids, Tensor) or row_ids.dtype not in reference.INDEX:
        raise ValueError(f"{op}: row_ids must be an int64 or int32 tensor, got "
                         f"{getattr(row_ids, 'dtype', type(row_ids))}")
    if row_ids.dim() != 1:
        raise ValueError(f"{op}: row_ids must be 1-D, got shape {tuple(row_ids.shape)}")
    if isinstance(n_rows, bool) or not isinstance(n_rows, int) or n_rows < 0:
        raise ValueError(f"{op}: n_rows must be an int >= 0, got {n_rows!r}")


def _row_id_stats(row_ids: Tensor) -> tuple[int, int, bool]:
    """``(first, last, any decrease)`` of non-empty ``row_ids``, in one pass: numpy on CPU
    (about half the time of torch's comparison there; ``diff()`` is ~20x slower for int64),
    else torch with one host read."""
    if row_ids.device.type == "cpu":
        a = row_ids.detach().numpy()
        return int(a[0]), int(a[-1]), bool((a[1:] < a[:-1]).any())
    lo, hi, decreasing = torch.stack(
        [row_ids[0].long(), row_ids[-1].long(), (row_ids[1:] < row_ids[:-1]).any().long()]
    ).tolist()
    return lo, hi, bool(decreasing)


def _offsets_fit(row_ids: Tensor, offsets: Tensor, n_rows: int) -> bool:
    """Whether ``offsets`` are the CSR offsets of ``row_ids`` (non-decreasing, in ``[0,
    n_rows)``, non-empty): ``row_ids[offsets[r] - 1] < r <= row_ids[offsets[r]]`` wherever those
    exist, which pins ``offsets[r]`` to the number of ids below ``r``. O(n_rows)."""
    nnz = row_ids.numel()
    r = torch.arange(n_rows + 1, device=row_ids.device)
    before = row_ids.index_select(0, (offsets - 1).clamp_(min=0))  # (not [...]: ~20x slower)
    at = row_ids.index_select(0, offsets.clamp(max=nnz - 1))
    fit = ((offsets == 0) | (before < r)) & ((offsets == nnz) | (at >= r))
    return bool(fit.all())


@torch.library.custom_op("aa::csr_offsets", mutates_args=())
def csr_offsets(row_ids: Tensor, n_rows: int) -> Tensor:
    op = "aa::csr_offsets"
    _check_row_ids(row_ids, n_rows)
    if not row_ids.numel():
        return torch.zeros(n_rows + 1, dtype=torch.int64, device=row_ids.device)
    row_ids = row_ids.contiguous()
    lo, hi, decreasing = _row_id_stats(row_ids)
    if decreasing:
        raise ValueError(f"{op}: row_ids must be non-decreasing (sorted COO row ids), so "
                         "that each row's entries are contiguous")
    if lo < 0 or hi >= n_rows:
        raise ValueError(f"{op}: row_ids must lie in [0, {n_rows}), found "
                         f"{lo if lo < 0 else hi}")
    key = (row_ids.data_ptr(), row_ids.numel(), row_ids.dtype, row_ids.device, n_rows)
    out = _OFFSETS.get(key)
    if out is None or not _offsets_fit(row_ids, out, n_rows):
        bounds = torch.arange(n_rows + 1, device=row_ids.device, dtype=row_ids.dtype)
        out = torch.searchsorted(row_ids, bounds).long()
        _OFFSETS.pop(key, None)
        if len(_OFFSETS) >= _OFFSETS_SIZE:
            _OFFSETS.pop(next(iter(_OFFSETS)))
        _OFFSETS[key] = out
    return out.clone()  # a copy: the caller (inductor) may reuse its output buffer


@csr_offsets.register_fake
def _(row_ids, n_rows):
    _check_row_ids(row_ids, n_rows)
    return row_ids.new_empty(n_rows + 1, dtype=torch.int64)


# -- opcheck samples ------------------------------------------------------------------------


def _samples(device: str):
    g = torch.Generator().manual_seed(0)

    def dictionary(sizes, v, n_trigrams, idx_dtype=torch.int64):
        offsets = torch.zeros(len(sizes) + 1, dtype=torch.int64)
        offsets[1:] = torch.tensor(sizes, dtype=torch.int64).cumsum(0)
        nnz = int(offsets[-1])
        slots = torch.randint(0, v, (nnz,), generator=g).to(idx_dtype)
        weights = torch.where(torch.rand(nnz, generator=g) < 0.3, 0.5, 1.0)
        ntri = torch.tensor(n_trigrams, dtype=torch.int64)
        return [t.to(device) for t in (offsets.to(idx_dtype), slots, weights, ntri)]

    def probs(b, v, dtype=torch.float32):
        return torch.rand(b, v, generator=g).to(dtype).to(device)

    # a word without entries, one without trigrams (-inf), odd v, top-3
    d = dictionary([4, 0, 6, 2, 3], 37, [2, 1, 3, 0, 1])
    yield (probs(3, 37), *d, 3, 3), {}
    # all scores (k = 0), B = 1, int32 CSR, bfloat16 probs
    d = dictionary([5, 1, 7], 20, [2, 1, 2], torch.int32)
    yield (probs(1, 20, torch.bfloat16), *d, 2, 0), {}
    # float64, k = n_words, tied words (identical patterns)
    offs, slots, w, ntri = dictionary([3, 3, 3], 11, [1, 1, 1])
    slots[3:6], slots[6:9], w[3:9] = slots[:3], slots[:3], w[:3].repeat(2)
    yield (probs(2, 11, torch.float64), offs, slots, w, ntri, 1, 3), {}
    # an empty dictionary
    yield (probs(2, 8), *dictionary([], 8, []), 1, 0), {}


def _offsets_samples(device: str):
    yield (torch.tensor([0, 0, 1, 3, 3, 3], device=device), 5), {}
    yield (torch.tensor([1, 1, 2], dtype=torch.int32, device=device), 3), {}
    yield (torch.zeros(0, dtype=torch.int64, device=device), 2), {}


register_samples(dictionary_score, _samples)
register_samples(csr_offsets, _offsets_samples)

register_onnx(dictionary_score,
              "aa_compile.kernels.dictionary_score.onnx_translation:dictionary_score")
register_onnx(csr_offsets, "aa_compile.kernels.dictionary_score.onnx_translation:csr_offsets")
