"""T-FREE dictionary decoding: score every dictionary word against the head's slot
probabilities and take the top-k (``TFreeDictionary.topk``), for a decoding batch.

Variants: ``eager`` (the reference module: gather ``p[:, slots]``, ``index_add_`` per word, the
normalisation, ``torch.topk``), ``inductor`` (torch.compile of it), ``aa`` (the backend, whose
``dictionary_score`` pass rewrites it into ``aa::dictionary_score``), and the peer ``aa_op``
(``torch.ops.aa.dictionary_score`` called eagerly on the dictionary's CSR).

The dictionary is synthetic but shaped like a decoding vocabulary: distinct random lowercase
words of ``1 + Poisson(4)`` letters (at most 20; ~5 bytes per word as in T-FREE text), hashed by
the released tokenizer config (``m = 10``, fast hash), so ~60 pattern entries per word. It is
built once per case, outside the timed calls; so are the probabilities (``sigmoid`` of normal
logits).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import aa_compile  # noqa: F401  (defines torch.ops.aa.*)
from aa_compile.models.tfree import TFreeDictionary, TrigramTokenizer
from bench.harness import (BASE_VARIANTS, CaseLabels, bench_variant, compile_variant,
                           dtype_name, inference_step, seed_all)
from bench.roofline import INDEX_BYTES, Work, itemsize

PEERS = ("aa_op",)
TOP_K = 10


@dataclasses.dataclass(frozen=True)
class DictionaryCase(CaseLabels):
    words: int  # dictionary size
    vocab: int  # v, head width
    m: int  # slots per trigram
    batch: int  # decoding rows B
    dtype: torch.dtype = torch.float32

    top_k: ClassVar[int] = TOP_K
    SHAPE = "W{words} v{vocab} m{m} B{batch} k{top_k}"
    ID = "W{words}-v{vocab}-m{m}-B{batch}-{dtype}"


def dictionary_cases(quick: bool, device: str) -> list[DictionaryCase]:
    """Quick: 10^5 words, v=32000, B in {1, 8}. Full adds 10^6 words (B=1 and 8; on CUDA also
    B=64). The eager reference materializes ``[B, nnz]`` (~6e7 entries at 10^6 words)."""
    cases = [DictionaryCase(100_000, 32000, 10, b) for b in (1, 8)]
    if quick:
        return cases
    batches = (1, 8, 64) if device == "cuda" else (1, 8)
    return cases + [DictionaryCase(1_000_000, 32000, 10, b) for b in batches]


#: the shapes of this workload file, per --quick / --device (see bench/conftest.py)
CASES = dictionary_cases


def work(case: DictionaryCase, nnz: int, slot_bytes: int = INDEX_BYTES,
         weight_bytes: int = 4) -> Work:
    """Bytes one call must move for a dictionary of ``nnz`` (slot, weight) entries: read the
    probabilities ``[B, v]``, the word offsets and trigram counts (int64), the slots and
    weights, and write the top-k values (float32) and indices (int64) per row."""
    e, words = itemsize(dtype_name(case.dtype)), case.words
    dictionary = (words + 1) * INDEX_BYTES + words * INDEX_BYTES + nnz * (slot_bytes + weight_bytes)
    return Work(case.batch * case.vocab * e + dictionary + case.batch * case.top_k * (4 + 8))


def synthetic_words(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct random lowercase words, ``1 + Poisson(4)`` letters (at most 20)."""
    rng = np.random.default_rng(seed)
    out: dict[str, None] = {}
    while len(out) < n:
        want = int((n - len(out)) * 1.2) + 16
        lens = np.minimum(1 + rng.poisson(4.0, want), 20)
        letters = rng.integers(97, 123, int(lens.sum()), dtype=np.uint8).tobytes().decode()
        ends = np.cumsum(lens).tolist()
        starts = [0, *ends[:-1]]
        out.update(dict.fromkeys(letters[s:e] for s, e in zip(starts, ends)))
    return list(out)[:n]


class DictionaryTopK(nn.Module):
    """The benchmarked call: ``TFreeDictionary.topk(probs, TOP_K)``."""

    def __init__(self, dictionary: TFreeDictionary):
        super().__init__()
        self.dictionary = dictionary

    def forward(self, probs: Tensor) -> tuple[Tensor, Tensor]:
        return self.dictionary.topk(probs, TOP_K)


@pytest.fixture(scope="module")
def base(case, settings):
    """The module, its CSR form (for ``aa_op``) and the probabilities, built once per case."""
    seed_all(0)
    tok = TrigramTokenizer(vocab_size=case.vocab, m=case.m)
    d = TFreeDictionary(tok, synthetic_words(case.words), edge_weight=0.5)
    module = DictionaryTopK(d).to(settings.device)
    offsets = torch.ops.aa.csr_offsets(d.word_ids, len(d))
    g = torch.Generator().manual_seed(0)
    probs = torch.sigmoid(torch.randn(case.batch, case.vocab, generator=g))
    return module, offsets, probs.to(device=settings.device, dtype=case.dtype)


def build(module: DictionaryTopK, offsets: Tensor, variant: str):
    """A callable ``probs -> (values, indices)`` for ``variant`` (the module is not copied:
    nothing here trains, and the dictionary buffers are large)."""
    if variant in BASE_VARIANTS:
        return compile_variant(module, variant)
    if variant == "aa_op":
        d = module.dictionary
        return lambda p: torch.ops.aa.dictionary_score(
            p, offsets, d.slots, d.slot_weights, d.n_trigrams, d.m, TOP_K)
    raise AssertionError(variant)


@pytest.mark.parametrize("variant", BASE_VARIANTS + PEERS)
def test_dictionary_topk(benchmark, settings, case, base, variant, repeat):
    module, offsets, probs = base
    d = module.dictionary
    bench_variant(benchmark, settings, case, variant, "dictionary_topk", kind="op",
                  work=work(case, d.slots.numel(), d.slots.element_size(),
                            d.slot_weights.element_size()),
                  build=lambda: build(module, offsets, variant),
                  step=lambda run: inference_step(run, probs))
