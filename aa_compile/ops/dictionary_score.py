"""`aa::dictionary_score`: T-FREE dictionary decoding (score every word, normalise, top-k), and
`aa::csr_offsets`, the sorted-COO -> CSR conversion its graph pass inserts.

    aa::dictionary_score(Tensor probs, Tensor word_offsets, Tensor slots, Tensor slot_weights,
                         Tensor n_trigrams, int m, int k) -> (Tensor values, Tensor indices)
    aa::csr_offsets(Tensor row_ids, int n_rows) -> Tensor

``probs [B, v]`` slot probabilities (float16/bfloat16/float32/float64); the dictionary in CSR
form: ``word_offsets [n_words + 1]`` (int32/int64; starts at 0, non-decreasing, ends at nnz),
``slots [nnz]`` (int32/int64 in ``[0, v)``), ``slot_weights [nnz]`` (float; 1 for inner slots,
``edge_weight`` for edge slots), ``n_trigrams [n_words]`` (int, >= 0); ``m`` slots per trigram.
The score of word w is ``S_w / (m n_w) + (S_w - sum p) / max(v - m n_w, 1)`` with ``S_w`` the
weighted sum of ``probs`` over its entries, ``-inf`` when ``n_w == 0`` (numerics:
``aa_compile.kernels.dictionary_score.reference``), computed in float32 (float64 for float64
``probs``); ``values`` have that dtype.

``k >= 1``: ``values, indices [B, k]``, the k best words per row in descending score order;
**ties: the lower word index first** on every device (NaN ranks above every number). ``k == 0``:
``values`` is the whole score matrix ``[B, n_words]`` and ``indices`` an empty ``[B, 0]``, for
callers that post-process all scores (softmax, exclusion masks).

**Inference only.** Decoding picks discrete words, so the outputs are marked
non-differentiable: they never require grad, even for a ``probs`` that does, which keeps
training-mode graphs (aot_autograd traces a backward) compiling; no gradient flows to
``probs`` through the op.

**Input validation** (``ValueError`` naming the argument): dtypes, shapes, devices, ``m`` and
``k`` always; the values (offsets, slot range, trigram counts) on CPU always and elsewhere only
when `CHECK_INDICES` is true (reading them is a device sync), as for ``aa::trigram_bag``. On
CPU the slot range is not read in a pass of its own: ATen's embedding bag bounds-checks every
slot it reads, and its error reruns the full check, which names the slot (the other checks
read O(n_words) values). Nothing is remembered between calls: a write through ``.data``
bypasses the version counter, so a remembered "valid" could let a bad slot through.

``aa::csr_offsets(row_ids, n_rows)``: ``offsets [n_rows + 1]`` int64 with ``row_ids[offsets[r]:
offsets[r + 1]] == r``; ``row_ids`` must be non-decreasing and in ``[0, n_rows)`` (checked:
ValueError, on every device, every call). A dictionary's word ids are constant across
decoding steps and the binary searches cost about as much as scoring, so the last results are
kept and reused when they fit the current contents (`_offsets_fit`, after the checks): a
check of the values, not of the version counter, which ``.data`` writes do not bump.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from aa_compile.kernels import dictionary_score as kernels
from aa_compile.kernels.dictionary_score import reference

from .registry import OpEntry, register

#: Check offsets / slots / trigram-count *values* on non-CPU devices too (a device sync per
#: call). CPU always checks. From the environment variable ``AA_DICTIONARY_CHECK_INDICES``.
CHECK_INDICES: bool = os.environ.get("AA_DICTIONARY_CHECK_INDICES", "0").strip().lower() not in (
    "", "0", "false", "no", "off",
)
OP = "aa::dictionary_score"


def _check(probs, word_offsets, slots, slot_weights, n_trigrams, m, k, *, values: bool,
           check_slots: bool = True):
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
    args = (probs, word_offsets, slots, slot_weights, n_trigrams, m, k)
    # the CPU kernel (ATen's embedding bag) bounds-checks every slot it reads: no separate pass
    # over the slots; its error becomes ours (it reads none when B == 0: then they are checked)
    kernel_checks = probs.device.type == "cpu" and probs.dim() == 2 and probs.shape[0] > 0
    _check(*args, values=True, check_slots=not kernel_checks)
    try:
        return kernels.dictionary_score(*args)
    except RuntimeError:
        if kernel_checks:  # raises the ValueError naming the bad slot, if that was the cause
            _check(*args, values=True)
        raise


@dictionary_score.register_fake
def _(probs, word_offsets, slots, slot_weights, n_trigrams, m, k):
    _check(probs, word_offsets, slots, slot_weights, n_trigrams, m, k, values=False)
    b, n_words = probs.shape[0], word_offsets.shape[0] - 1
    acc = reference.compute_dtype(probs.dtype)
    width = n_words if k == 0 else k
    return (probs.new_empty(b, width, dtype=acc),
            probs.new_empty(b, 0 if k == 0 else k, dtype=torch.int64))


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


# -- registry -------------------------------------------------------------------------------


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


_KERNELS = {
    "cpu": "aa_compile.kernels.dictionary_score.cpu",
    "cuda": "aa_compile.kernels.dictionary_score.triton_kernel",
    "reference": "aa_compile.kernels.dictionary_score.reference",
}

register(OpEntry(name=OP, op=torch.ops.aa.dictionary_score, kernels=_KERNELS,
                 samples=_samples))
register(OpEntry(name="aa::csr_offsets", op=torch.ops.aa.csr_offsets,
                 kernels={"cpu": "aa_compile.ops.dictionary_score",
                          "cuda": "aa_compile.ops.dictionary_score",
                          "reference": "aa_compile.ops.dictionary_score"},
                 samples=_offsets_samples))
