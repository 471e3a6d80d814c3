"""T-FREE embedding from trigram *ids* (slots hashed in the kernel) against the embedding bag on
the materialized slot list: workloads ``hashed_trigram_bag_fwd`` and ``hashed_trigram_bag_fwd_bwd``.

Variants (same words, same weights, same result):

- ``eager``: the T-FREE reference embedding (``aa_compile.models.tfree.TFreeEmbedding``,
  aggregation "sum": gather ``E[slots]`` as ``[n_trigrams, m, h]``, ``.sum(-2)``,
  ``index_add_`` by word) on the tokenizer's ``[n_trigrams, m]`` slots;
- ``trigram_bag_slots``: ``aa::trigram_bag`` on the tokenizer's flattened slots (``indices``,
  ``offsets``), m int64 indices per trigram;
- ``hashed_ids``: ``aa::hashed_trigram_bag`` on the tokenizer's ``trigram_ids`` /
  ``trigram_offsets`` / ``whole_word_slots``, one int64 id per trigram, the fast-mode slots
  computed in the call (CPU: vectorized torch hash, then the trigram-bag kernel; CUDA: inside
  the Triton kernel);
- ``hash_only`` (forward workload): just the slot computation ``hashed_ids`` does (CPU:
  ``kernels.hashed_trigram_bag.cpu.materialize_slots``; CUDA: the Triton ``trigram_slots``
  kernel), i.e. the hashing overhead on top of the bag.

The slots and ids come from ``TrigramTokenizer(vocab_size=v, m=m, k_lower=2, hash_mode="fast")``
on generated English/German paragraphs (`bench.test_tfree_tokenizer.paragraphs`: case variants,
digits, punctuation, whitespace words hashed whole), cut to the case's word count, built once
outside the timed calls. ``extra_info["index_bytes"]`` is the index data each variant reads
(ids or slots, offsets, whole-word table), ``extra_info["index_bytes_vs_slots"]`` its ratio to
``trigram_bag_slots``'s.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import pytest
import torch

import aa_compile  # noqa: F401  (defines torch.ops.aa.*)
from aa_compile.kernels.hashed_trigram_bag import cpu as hashed_cpu
from aa_compile.models.tfree import TFreeEmbedding, TrigramTokenizer
from aa_compile.ops.registry import triton_kernel
from bench.harness import (CaseLabels, bench_variant, dtype_name, fresh_copy, inference_step,
                           seed_all, training_step)
from bench.roofline import INDEX_BYTES, Work, itemsize
from bench.test_tfree_tokenizer import paragraphs

VARIANTS = ("eager",)
PEERS = ("trigram_bag_slots", "hashed_ids")
K_LOWER = 2


@dataclasses.dataclass(frozen=True)
class HashedBagCase(CaseLabels):
    vocab: int  # v
    m: int  # slots per trigram
    hidden: int  # h
    words: int  # words in the batch
    dtype: torch.dtype

    k_lower: ClassVar[int] = K_LOWER
    SHAPE = "v{vocab} m{m} k{k_lower} h{hidden} W{words}"
    ID = "v{vocab}-m{m}-h{hidden}-W{words}-{dtype}"


def hashed_bag_cases(quick: bool, device: str) -> list[HashedBagCase]:
    """Quick: v=8192, m=10, h=1024, 512 words, float32. Full: CPU 4096 words at v in {8k, 32k}
    and h=256 (where index traffic weighs most) / 1024; CUDA 16k words in bfloat16."""
    if quick:
        return [HashedBagCase(8192, 10, 1024, 512, torch.float32)]
    if device == "cuda":
        return [HashedBagCase(v, 10, h, 16384, torch.bfloat16)
                for v in (8192, 32768) for h in (256, 1024, 4096)]
    return [HashedBagCase(v, 10, h, 4096, torch.float32)
            for v in (8192, 32768) for h in (256, 1024)]


#: the shapes of this workload file, per --quick / --device (see bench/conftest.py)
CASES = hashed_bag_cases


def work(case: HashedBagCase, n_trigrams: int, variant: str, backward: bool,
         whole_word_bytes: int = 0) -> Work:
    """Bytes one call must move. From trigram ids (``hashed_ids``; the same ideal holds for
    the peers computing the same result): read the ids, trigram offsets and whole-word slots,
    each table row once (``min(n_trigrams * m, v)`` rows), write ``[words, h]``; the backward
    reads the gradient, ids and offsets again and writes the dense ``[v, h]`` gradient.
    ``hash_only``: read the ids, offsets and whole-word slots, write the ``[n_trigrams, m]``
    int64 slots."""
    e, h = itemsize(dtype_name(case.dtype)), case.hidden
    ids = n_trigrams * INDEX_BYTES + (case.words + 1) * INDEX_BYTES + whole_word_bytes
    if variant == "hash_only":
        return Work(ids + n_trigrams * case.m * INDEX_BYTES)
    forward = ids + min(n_trigrams * case.m, case.vocab) * h * e + case.words * h * e
    return Work(forward + ((case.words + case.vocab) * h * e + ids if backward else 0))


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@pytest.fixture(scope="module")
def base(case, settings):
    """Module, the three input forms, index bytes per variant and the upstream gradient."""
    seed_all(0)
    device = settings.device
    tok = TrigramTokenizer(vocab_size=case.vocab, m=case.m, k_lower=K_LOWER, hash_mode="fast")
    batch = tok.encode(paragraphs(case.words + 200))
    assert batch.n_words >= case.words
    w = case.words
    toff = batch.trigram_offsets[: w + 1].clone()
    n_trigrams = int(toff[-1])
    ids = batch.trigram_ids[:n_trigrams].clone()
    slots = batch.indices[: n_trigrams * case.m].clone()
    offsets = batch.offsets[: w + 1].clone()
    word_of_trigram = torch.repeat_interleave(torch.arange(w), toff.diff())
    module = TFreeEmbedding(case.vocab, case.hidden).to(device=device, dtype=case.dtype)
    inputs = {
        "slots_2d": slots.view(n_trigrams, case.m).to(device),
        "word_of_trigram": word_of_trigram.to(device),
        "indices": slots.to(device),
        "offsets": offsets.to(device),
        "trigram_ids": ids.to(device),
        "trigram_offsets": toff.to(device),
        "whole_word_slots": batch.whole_word_slots.to(device),
    }
    index_bytes = {
        "eager": _nbytes(inputs["slots_2d"], inputs["word_of_trigram"]),
        "trigram_bag_slots": _nbytes(inputs["indices"], inputs["offsets"]),
        "hashed_ids": _nbytes(inputs["trigram_ids"], inputs["trigram_offsets"],
                              inputs["whole_word_slots"]),
    }
    index_bytes["hash_only"] = index_bytes["hashed_ids"]
    grad = torch.randn(w, case.hidden, device=device, dtype=case.dtype)
    return module, inputs, index_bytes, grad


def build(module: TFreeEmbedding, variant: str, case: HashedBagCase):
    """``(callable inputs -> result, module whose parameters it uses)`` for ``variant``."""
    m = fresh_copy(module)
    if variant == "eager":
        n_words = case.words
        return (lambda x: m(x["slots_2d"], x["word_of_trigram"], n_words)), m
    if variant == "trigram_bag_slots":
        return (lambda x: torch.ops.aa.trigram_bag(m.weight, x["indices"], x["offsets"])), m
    if variant == "hashed_ids":
        return (lambda x: torch.ops.aa.hashed_trigram_bag(
            m.weight, x["trigram_ids"], x["trigram_offsets"], case.m, K_LOWER,
            x["whole_word_slots"])), m
    if variant == "hash_only":
        slots_fn = hashed_cpu.materialize_slots  # what the op's CPU kernel runs
        if m.weight.device.type == "cuda" and m.weight.dtype != torch.float64:
            slots_fn = triton_kernel("aa_compile.kernels.hashed_trigram_bag.triton_kernel",
                                     "trigram_slots", fallback=slots_fn)
        return (lambda x: slots_fn(x["trigram_ids"], case.vocab, case.m, K_LOWER,
                                   x["whole_word_slots"])), m
    raise AssertionError(variant)


def _record(benchmark, index_bytes, variant):
    benchmark.extra_info.update(
        index_bytes=index_bytes[variant],
        index_bytes_vs_slots=round(index_bytes[variant] / index_bytes["trigram_bag_slots"], 4),
    )


@pytest.mark.parametrize("variant", VARIANTS + PEERS + ("hash_only",))
def test_hashed_trigram_bag_fwd(benchmark, settings, case, base, variant, repeat):
    module, inputs, index_bytes, _ = base
    bench_variant(benchmark, settings, case, variant, "hashed_trigram_bag_fwd", kind="op",
                  work=work(case, inputs["trigram_ids"].numel(), variant, backward=False,
                            whole_word_bytes=_nbytes(inputs["whole_word_slots"])),
                  build=lambda: build(module, variant, case),
                  step=lambda built: inference_step(built[0], inputs))
    _record(benchmark, index_bytes, variant)


@pytest.mark.parametrize("variant", VARIANTS + PEERS)
def test_hashed_trigram_bag_fwd_bwd(benchmark, settings, case, base, variant, repeat):
    module, inputs, index_bytes, grad = base
    bench_variant(benchmark, settings, case, variant, "hashed_trigram_bag_fwd_bwd", kind="op",
                  work=work(case, inputs["trigram_ids"].numel(), variant, backward=True,
                            whole_word_bytes=_nbytes(inputs["whole_word_slots"])),
                  build=lambda: build(module, variant, case),
                  step=lambda built: training_step(built[0], inputs, grad=grad, clear=(built[1],)))
    _record(benchmark, index_bytes, variant)
