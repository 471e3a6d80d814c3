"""T-FREE reference layers: the input embedding, the multi-hot head and the decoding dictionary.

These are the numerics spec (``shared/research/tfree_hat.md`` sections 1.3-1.5), written as
the public reference computes them, with no kernel calls; the ``aa`` backend's passes rewrite
them into `aa::` ops (`aa::trigram_bag`, `aa::dictionary_score`).

- `TFreeEmbedding`: word vector = sum over the word's trigrams of the sum of the ``m`` rows of
  each trigram's slots: ``E[slots]`` as ``[n_trigrams, m, h]``, a sum over ``m`` (or a mean),
  then ``index_add_`` by word position.
- `TFreeHead`: a bias-free ``Linear(h -> v)``; its loss is ``BCEWithLogits`` against the next
  word's multi-hot slot pattern with ``pos_weight``, weighted per position, mean over
  ``positions x v``, times ``loss_scale``.
- `TFreeDictionary`: the candidate words as a sparse word x slot pattern split into *inner*
  slots (trigrams without a padding space) and *edge* slots (trigrams that start or end with
  the padding space); ``scores(p)`` is the reference's normalised score and ``topk`` /
  ``greedy`` pick words from it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import hashing
from .tokenizer import TrigramBatch, TrigramTokenizer

AGGREGATIONS = ("sum", "mean")


def word_of_trigram(trigram_offsets: Tensor) -> Tensor:
    """``[n_trigrams]`` word index of each trigram, from the CSR ``trigram_offsets``."""
    counts = trigram_offsets.diff()
    return torch.repeat_interleave(
        torch.arange(counts.numel(), device=trigram_offsets.device), counts
    )


def trigram_slot_matrix(batch: TrigramBatch, m: int) -> Tensor:
    """``[n_trigrams, m]`` slots of ``batch`` (a view of its flat ``indices``)."""
    return batch.indices.view(-1, m)


class TFreeEmbedding(nn.Module):
    """T-FREE input embedding: ``forward(trigram_slots [n, m], word_of_trigram [n], n_words)``
    returns ``[n_words, h]``; row w is ``sum_{t: word(t) = w} agg_k E[slots[t, k]]`` with
    ``agg`` the sum (released config) or mean over the m slots. A word with no trigrams is a
    zero vector. A slot hit by two trigrams of a word counts twice.

    ``word_of_trigram`` need not be sorted. Init: normal with std ``sqrt(2 / (5 h))``
    ("pythia", as the reference).
    """

    def __init__(self, vocab_size: int, hidden: int, aggregation: str = "sum",
                 device=None, dtype=None) -> None:
        super().__init__()
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
        if vocab_size < 1 or hidden < 1:
            raise ValueError(f"vocab_size and hidden must be >= 1, got {vocab_size}, {hidden}")
        self.vocab_size = vocab_size
        self.hidden = hidden
        self.aggregation = aggregation
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=math.sqrt(2 / (5 * self.hidden)))

    def extra_repr(self) -> str:
        return f"{self.vocab_size}, {self.hidden}, aggregation={self.aggregation!r}"

    def forward(self, trigram_slots: Tensor, word_of_trigram: Tensor, n_words: int) -> Tensor:
        per_trigram = self.weight[trigram_slots]  # [n_trigrams, m, h]
        if self.aggregation == "sum":
            per_trigram = per_trigram.sum(-2)
        else:
            per_trigram = per_trigram.mean(-2)
        out = per_trigram.new_zeros(n_words, self.hidden)
        return out.index_add_(0, word_of_trigram, per_trigram)


def multi_hot(indices: Tensor, offsets: Tensor, vocab_size: int,
              dtype: torch.dtype = torch.float32) -> Tensor:
    """``[n_words, v]`` 0/1 targets: row w marks the distinct slots in
    ``indices[offsets[w]:offsets[w + 1]]`` (the union of the word's trigram slots)."""
    n = offsets.numel() - 1
    rows = word_of_trigram(offsets)
    out = torch.zeros(n, vocab_size, dtype=dtype, device=indices.device)
    out[rows, indices] = 1
    return out


class TFreeHead(nn.Module):
    """T-FREE head: ``Linear(h -> v)`` without bias, one logit per slot.

    `loss` is the reference's: ``BCEWithLogits(logits, targets, pos_weight)`` per element, times
    the per-position weight (0 on padding), mean over positions x v, times ``loss_scale``.
    Defaults are the released 7B config (``pos_weight=300``, ``loss_scale=100``).
    """

    def __init__(self, hidden: int, vocab_size: int, pos_weight: float = 300.0,
                 loss_scale: float = 100.0, device=None, dtype=None) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden, vocab_size, bias=False, device=device, dtype=dtype)
        self.vocab_size = vocab_size
        self.pos_weight = float(pos_weight)
        self.loss_scale = float(loss_scale)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)

    def loss(self, logits: Tensor, targets: Tensor, weights: Tensor | None = None) -> Tensor:
        """``logits`` and multi-hot ``targets`` ``[..., v]``; ``weights [...]`` per position."""
        if targets.shape != logits.shape:
            raise ValueError(f"targets must have the logits' shape {tuple(logits.shape)}, got "
                             f"{tuple(targets.shape)}")
        pos_weight = logits.new_full((), self.pos_weight, dtype=torch.float32)
        per = F.binary_cross_entropy_with_logits(logits.float(), targets.float(),
                                                 pos_weight=pos_weight, reduction="none")
        if weights is not None:
            per = per * weights.float().unsqueeze(-1)
        return per.mean() * self.loss_scale


class TFreeDictionary(nn.Module):
    """Candidate words for decoding, as a sparse word x slot pattern (buffers, so the
    dictionary moves with ``.to(device)``).

    Per word w: ``inner`` pairs (w, slot) from its trigrams without a padding space and
    ``edge`` pairs from trigrams that start or end with it, each set de-duplicated; ``n_w`` its
    number of (distinct) trigrams (a word hashed whole is one inner "trigram"). ``scores(p)``
    for slot probabilities ``p [..., v]`` is::

        S_w     = sum_inner p[slot] + edge_weight * sum_edge p[slot]
        score_w = S_w / (m n_w) + (S_w - sum_all p) / (v - m n_w)

    (mean activation on the pattern minus mean off it; ``v - m n_w`` is clamped to >= 1).
    A word without trigrams (the empty word) scores ``-inf``.

    Buffers: ``word_ids``, ``slots``, ``slot_weights`` (1 inner, ``edge_weight`` edge) per
    pattern entry, word-major (``word_ids`` is non-decreasing: per word, its inner slots then
    its edge slots, each ascending), and ``n_trigrams`` per word.
    """

    def __init__(self, tokenizer: TrigramTokenizer, words: Iterable[str],
                 edge_weight: float = 1.0) -> None:
        super().__init__()
        words = list(dict.fromkeys(words))
        for w in words:
            if not isinstance(w, str):
                raise TypeError(f"dictionary words must be str, got {type(w).__name__}")
        self.words = words
        self.index = {w: i for i, w in enumerate(words)}
        self.vocab_size = tokenizer.vocab_size
        self.m = tokenizer.m
        self.edge_weight = float(edge_weight)
        word_ids, slots, is_edge, n_trigrams = _patterns(tokenizer, words)
        self.register_buffer("word_ids", torch.from_numpy(word_ids))
        self.register_buffer("slots", torch.from_numpy(slots))
        edge = torch.from_numpy(is_edge)
        self.register_buffer("slot_weights", torch.where(edge, self.edge_weight, 1.0))
        self.register_buffer("n_trigrams", torch.from_numpy(n_trigrams))

    def __len__(self) -> int:
        return len(self.words)

    def extra_repr(self) -> str:
        return (f"{len(self.words)} words, {self.slots.numel()} pattern entries, v={self.vocab_size}, "
                f"m={self.m}, edge_weight={self.edge_weight}")

    def scores(self, probs: Tensor) -> Tensor:
        """``[..., n_words]`` normalised scores of slot probabilities ``probs [..., v]``."""
        if probs.shape[-1] != self.vocab_size:
            raise ValueError(f"probs must have {self.vocab_size} slots in its last dimension, "
                             f"got shape {tuple(probs.shape)}")
        lead = probs.shape[:-1]
        p = probs.reshape(-1, self.vocab_size).float()
        raw = p.new_zeros(p.shape[0], len(self.words))
        raw.index_add_(1, self.word_ids, p[:, self.slots] * self.slot_weights)
        on = (self.m * self.n_trigrams).float()
        off = (self.vocab_size - on).clamp(min=1)
        total = p.sum(-1, keepdim=True)
        score = raw / on + (raw - total) / off
        score = score.masked_fill(self.n_trigrams == 0, float("-inf"))
        return score.reshape(*lead, len(self.words))

    def forward(self, probs: Tensor) -> Tensor:
        return self.scores(probs)

    def topk(self, probs: Tensor, k: int = 1) -> tuple[Tensor, Tensor]:
        """``(scores, word indices)`` of the ``k`` best words per row of ``probs``."""
        if not 1 <= k <= len(self.words):
            raise ValueError(f"k must be in [1, {len(self.words)}], got {k}")
        return torch.topk(self.scores(probs), k, dim=-1)

    def greedy(self, logits: Tensor, exclude: Sequence[str] = ()) -> list[str]:
        """The best word per row of head ``logits [..., v]`` (``exclude``: words never picked)."""
        score = self.scores(torch.sigmoid(logits.float()))
        if exclude:
            banned = [self.index[w] for w in exclude if w in self.index]
            score = score.index_fill(-1, torch.tensor(banned, device=score.device,
                                                      dtype=torch.int64), float("-inf"))
        best = score.argmax(-1).reshape(-1).tolist()
        return [self.words[i] for i in best]


def _patterns(tokenizer: TrigramTokenizer, words: Sequence[str]
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """`_word_pattern` of every word at once, as int64 ``word_ids`` (non-decreasing), int64
    ``slots``, bool ``is_edge`` (per word: inner slots then edge slots, each sorted) and int64
    ``n_trigrams``. Vectorised (one hashing call, one sort), so 10^6 words take seconds."""
    m, v = tokenizer.m, tokenizer.vocab_size
    if tokenizer.lowercase:
        words = [w.lower() for w in words]
    whole = [bool(w) and tokenizer.hashed_whole(w) for w in words]
    ids, tri_word = _distinct_trigrams(
        [w if w and not h else "" for w, h in zip(words, whole)])
    tri_slots = np.asarray(tokenizer.trigram_slots(ids), dtype=np.int64).reshape(-1, m)
    tri_edge = ((ids & 255) == 32) | ((ids >> 16) == 32)
    whole_idx = np.flatnonzero(np.array(whole, dtype=bool))
    whole_slots = np.array(
        [hashing.whole_word_slots(words[i], v, m, tokenizer.k_lower) for i in whole_idx],
        dtype=np.int64).reshape(-1, m)
    # key = (word, edge, slot): sorted and de-duplicated it is the word-major pattern
    row_word = np.concatenate([tri_word, whole_idx])
    row_edge = np.concatenate([tri_edge, np.zeros(len(whole_idx), dtype=bool)])
    row_key = (row_word * 2 + row_edge) * v
    keys = (row_key[:, None] + np.concatenate([tri_slots, whole_slots])).reshape(-1)
    keys.sort()  # (np.unique's hash-based path is ~10x slower here)
    keys = keys[np.concatenate([keys[:1] == keys[:1], keys[1:] != keys[:-1]])]
    n_trigrams = np.bincount(tri_word, minlength=len(words)).astype(np.int64)
    n_trigrams[whole_idx] = 1
    return keys // (2 * v), keys % v, (keys // v) % 2 == 1, n_trigrams


def _distinct_trigrams(words: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(trigram ids, word of each)``: every word's distinct `hashing.trigram_ids`, as one
    numpy pass over the padded UTF-8 bytes (grouped by word, ids ascending within a word)."""
    enc = [f" {w} ".encode() if w else b"" for w in words]
    lens = np.fromiter(map(len, enc), dtype=np.int64, count=len(enc))
    buf = np.frombuffer(b"".join(enc), dtype=np.uint8).astype(np.int64)
    n_tri = np.maximum(lens - 2, 0)
    word = np.repeat(np.arange(len(enc), dtype=np.int64), n_tri)
    # position of each trigram: its word's start plus its rank within the word
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
    rank = np.arange(word.size, dtype=np.int64) - np.repeat(np.cumsum(n_tri) - n_tri, n_tri)
    pos = starts[word] + rank
    ids = buf[pos] | (buf[pos + 1] << 8) | (buf[pos + 2] << 16) if pos.size else pos
    keys = np.sort((word << 24) | ids)
    keys = keys[np.concatenate([keys[:1] == keys[:1], keys[1:] != keys[:-1]])]
    return keys & ((1 << 24) - 1), keys >> 24


def _word_pattern(tokenizer: TrigramTokenizer, word: str) -> tuple[list[int], list[int], int]:
    """``(inner slots, edge slots, n_trigrams)`` of ``word``, each slot list distinct+sorted."""
    if tokenizer.lowercase:
        word = word.lower()
    if not word:
        return [], [], 0
    slots = tokenizer.word_slots(word).view(-1, tokenizer.m).tolist()
    if tokenizer.hashed_whole(word):
        return sorted(set(slots[0])), [], 1
    ids = hashing.trigram_ids(word)
    inner: set[int] = set()
    edge: set[int] = set()
    for tid, row in zip(ids, slots):
        first, last = tid & 255, tid >> 16
        (edge if first == 32 or last == 32 else inner).update(row)
    return sorted(inner), sorted(edge), len(ids)


__all__ = [
    "AGGREGATIONS",
    "TFreeDictionary",
    "TFreeEmbedding",
    "TFreeHead",
    "multi_hot",
    "trigram_slot_matrix",
    "word_of_trigram",
]
