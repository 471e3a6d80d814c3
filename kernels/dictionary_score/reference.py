"""Plain-PyTorch T-FREE dictionary scoring: the numerics every `aa::dictionary_score` kernel is
tested against, the tie order of its top-k, and the definition of valid input (`check_inputs`).

Semantics, for slot probabilities ``probs [B, v]`` and a dictionary in CSR form (the entries of
word w are ``word_offsets[w]:word_offsets[w + 1]`` of ``slots`` / ``slot_weights``; word w has
``n_trigrams[w]`` trigrams, ``m`` slots each)::

    S[b, w]     = sum_{j in entries(w)} slot_weights[j] * probs[b, slots[j]]
    on_w        = m * n_trigrams[w]
    off_w       = max(v - on_w, 1)
    score[b, w] = S[b, w] / on_w + (S[b, w] - sum_s probs[b, s]) / off_w     (n_trigrams[w] > 0)
    score[b, w] = -inf                                                        (n_trigrams[w] == 0)

(``TFreeDictionary.scores``: mean activation on the word's pattern minus mean off it.) All of
it is computed in float32, float64 for float64 ``probs``, and the scores keep that dtype.

Top-k (``k >= 1``): the ``k`` largest scores per row, in descending order; among equal scores
the **lower word index comes first** (NaN counts as larger than every number, as in
``torch.sort``). ``k == 0`` asks for the whole score matrix instead.
"""

from __future__ import annotations

import torch
from torch import Tensor

FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX = (torch.int32, torch.int64)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other input dtype is scored in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_inputs(probs, word_offsets, slots, slot_weights, n_trigrams, m, k, *,
                 check_values: bool = True, check_slots: bool = True,
                 op: str = "aa::dictionary_score") -> None:
    """Raise ``ValueError`` naming the argument when the input is not valid (see module doc).

    Metadata (dtypes, shapes, devices, ``m``, ``k``) is always checked; ``check_values`` also
    reads the CSR offsets, the trigram counts and, unless ``check_slots`` is False, the slot
    range (a device sync off CPU).
    """
    if not isinstance(probs, Tensor) or probs.dtype not in FLOAT:
        raise ValueError(f"{op}: probs must be a float16/bfloat16/float32/float64 tensor, got "
                         f"{getattr(probs, 'dtype', type(probs))}")
    if probs.dim() != 2:
        raise ValueError(f"{op}: probs must be 2-D [B, v] (reshape leading dims into B), got "
                         f"shape {tuple(probs.shape)}")
    for name, t in (("word_offsets", word_offsets), ("slots", slots), ("n_trigrams", n_trigrams)):
        if not isinstance(t, Tensor) or t.dtype not in INDEX:
            raise ValueError(f"{op}: {name} must be an int64 or int32 tensor, got "
                             f"{getattr(t, 'dtype', type(t))}")
        if t.dim() != 1:
            raise ValueError(f"{op}: {name} must be 1-D, got shape {tuple(t.shape)}")
    if word_offsets.numel() == 0:
        raise ValueError(f"{op}: word_offsets must have n_words + 1 >= 1 elements (CSR: "
                         "word_offsets[0] == 0, word_offsets[-1] == nnz), got none")
    if not isinstance(slot_weights, Tensor) or slot_weights.dtype not in FLOAT:
        raise ValueError(f"{op}: slot_weights must be a float tensor, got "
                         f"{getattr(slot_weights, 'dtype', type(slot_weights))}")
    nnz, n_words = slots.shape[0], word_offsets.shape[0] - 1
    if tuple(slot_weights.shape) != (nnz,):
        raise ValueError(f"{op}: slot_weights must have shape ({nnz},) like slots, got "
                         f"{tuple(slot_weights.shape)}")
    if n_trigrams.shape[0] != n_words:
        raise ValueError(f"{op}: n_trigrams must have shape ({n_words},) [n_words] "
                         f"(word_offsets has {n_words + 1} elements), got "
                         f"{tuple(n_trigrams.shape)}")
    for name, t in (("word_offsets", word_offsets), ("slots", slots),
                    ("slot_weights", slot_weights), ("n_trigrams", n_trigrams)):
        if t.device != probs.device:
            raise ValueError(f"{op}: {name} is on {t.device}, but probs is on {probs.device}")
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"{op}: m (slots per trigram) must be an int >= 1, got {m!r}")
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= n_words:
        raise ValueError(f"{op}: k must be an int in [0, n_words] = [0, {n_words}] (0: all "
                         f"scores), got {k!r}")
    if check_values:
        _check_values(probs.shape[1], word_offsets, slots, n_trigrams, nnz, op, check_slots)


def _check_values(v, word_offsets, slots, n_trigrams, nnz, op, check_slots=True) -> None:
    parts = [word_offsets[0], word_offsets[-1], (word_offsets[1:] < word_offsets[:-1]).any()]
    check_slots = check_slots and nnz > 0
    if check_slots:
        parts += list(torch.aminmax(slots))
    if n_trigrams.numel():
        parts.append(n_trigrams.min())
    stats = torch.stack([t.long() for t in parts]).tolist()  # one host read
    first, last, decreasing = stats[:3]
    if first != 0:
        raise ValueError(f"{op}: word_offsets must start at 0, got word_offsets[0] == {first}")
    if decreasing:
        raise ValueError(f"{op}: word_offsets must be non-decreasing (CSR word boundaries)")
    if last != nnz:
        raise ValueError(f"{op}: word_offsets must end at nnz == slots.numel() == {nnz}, got "
                         f"word_offsets[-1] == {last}")
    if check_slots:
        lo, hi = stats[3:5]
        if lo < 0 or hi >= v:
            raise ValueError(f"{op}: slots must lie in [0, {v}) (probs has {v} columns), "
                             f"found {lo if lo < 0 else hi}")
    if n_trigrams.numel() and stats[-1] < 0:
        raise ValueError(f"{op}: n_trigrams must be >= 0, found {stats[-1]}")


def word_ids(word_offsets: Tensor, nnz: int) -> Tensor:
    """The word of every entry: int64 ``[nnz]`` (COO row ids of the CSR)."""
    n_words = word_offsets.numel() - 1
    return torch.repeat_interleave(torch.arange(n_words, device=word_offsets.device),
                                   word_offsets.diff().long(), output_size=nnz)


def normalise(raw: Tensor, total: Tensor, n_trigrams: Tensor, m: int, v: int) -> Tensor:
    """``score`` from the raw sums ``raw [B, n_words]`` and ``total [B, 1]`` (module doc)."""
    on = (m * n_trigrams).to(raw.dtype)
    off = (v - on).clamp(min=1)
    score = raw / on + (raw - total) / off
    return score.masked_fill(n_trigrams == 0, float("-inf"))


def scores(probs, word_offsets, slots, slot_weights, n_trigrams, m: int) -> Tensor:
    """``[B, n_words]`` scores in `compute_dtype` (gather + ``index_add_``, as the module)."""
    acc = compute_dtype(probs.dtype)
    p = probs.to(acc)
    slots = slots.long()
    raw = p.new_zeros(p.shape[0], word_offsets.numel() - 1)
    raw.index_add_(1, word_ids(word_offsets, slots.numel()), p[:, slots] * slot_weights.to(acc))
    return normalise(raw, p.sum(-1, keepdim=True), n_trigrams, m, p.shape[1])


def ordered_topk(score: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``(values, int64 indices) [B, k]``: a stable descending sort, cut at ``k`` (the tie
    order of the module doc, by construction)."""
    values, indices = torch.sort(score, dim=-1, descending=True, stable=True)
    return values[:, :k], indices[:, :k]


def select(score: Tensor, k: int, topk=ordered_topk) -> tuple[Tensor, Tensor]:
    """What the op returns for ``score [B, n_words]``: ``k >= 1``: ``topk(score, k)``;
    ``k == 0``: ``(score, [B, 0] int64)``."""
    if k == 0:
        return score, torch.empty(score.shape[0], 0, dtype=torch.int64, device=score.device)
    return topk(score, k)


def dictionary_score(probs, word_offsets, slots, slot_weights, n_trigrams, m: int, k: int
                     ) -> tuple[Tensor, Tensor]:
    """The op: `select` of the `scores`."""
    return select(scores(probs, word_offsets, slots, slot_weights, n_trigrams, m), k)
