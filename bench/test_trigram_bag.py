"""T-FREE trigram embedding workloads: a batch of words, each the sum over its trigrams of the
m embedding rows of each trigram's hashed slots, forward (inference) and forward + backward.

Variants: ``eager`` (the T-FREE reference embedding, ``aa_compile.models.tfree.TFreeEmbedding``
with aggregation "sum": gather ``E[trigram_slots]`` as ``[n_trigrams, m, h]``, ``.sum(-2)``,
``index_add_`` by word), ``inductor`` (torch.compile of it), ``aa`` (``backend="aa"``: the
``tfree_embedding`` pass rewrites it into ``aa::trigram_bag``, converting the word ids to CSR
offsets inside the compiled graph, which the timings include), and peers: ``embedding_bag``
(``F.embedding_bag(mode="sum")`` on the flattened slots with CSR word offsets) and ``aa_op``
(``torch.ops.aa.trigram_bag`` called eagerly on the same CSR).

Inputs are synthetic but shaped like T-FREE text: about 5 bytes per word, so ``1 + Poisson(4.5)``
trigrams per word (at most 20, mean ~5.5), ``m`` uniformly hashed slots of ``v`` per trigram.
The slot lists (``[n_trigrams, m]`` + word of each trigram for the reference, or the flattened
CSR for the others) are built once, outside the timed calls, as a tokenizer would hand them over.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import aa_compile  # noqa: F401  (defines torch.ops.aa.*)
from aa_compile.models.tfree import TFreeEmbedding
from bench.harness import (BASE_VARIANTS, CaseLabels, bench_variant, compile_variant, dtype_name,
                           fresh_copy, inference_step, seed_all, skip_unless_aa_op, training_step)
from bench.roofline import INDEX_BYTES, Work, itemsize

PEERS = ("embedding_bag", "aa_op")


@dataclasses.dataclass(frozen=True)
class TrigramBagCase(CaseLabels):
    vocab: int  # v, rows of the embedding table
    m: int  # slots per trigram
    hidden: int  # h
    words: int  # bags in the batch
    dtype: torch.dtype

    SHAPE = "v{vocab} m{m} h{hidden} W{words}"
    ID = "v{vocab}-m{m}-h{hidden}-W{words}-{dtype}"


def trigram_bag_cases(quick: bool, device: str) -> list[TrigramBagCase]:
    """Quick: v=8192, m=10, h=1024, 512 words in float32 (the eager reference's ``[n_trigrams,
    m, h]`` gather bounds the size on a 2-core CPU). Full: v in {8k, 32k}, h in {1024, 4096};
    CUDA 16k words in bfloat16 plus one float32 case; CPU 4k words (1k at h=4096: the reference
    materializes ``[~5.5 * words, m, h]`` floats and its gradient) in float32."""
    if quick:
        return [TrigramBagCase(8192, 10, 1024, 512, torch.float32)]
    if device == "cuda":
        cases = [TrigramBagCase(v, 10, h, 16384, torch.bfloat16)
                 for v in (8192, 32768) for h in (1024, 4096)]
        return cases + [TrigramBagCase(8192, 10, 1024, 4096, torch.float32)]
    return [
        TrigramBagCase(8192, 10, 1024, 4096, torch.float32),
        TrigramBagCase(32768, 10, 1024, 4096, torch.float32),
        TrigramBagCase(8192, 10, 4096, 1024, torch.float32),
    ]


#: the shapes of this workload file, per --quick / --device (see bench/conftest.py)
CASES = trigram_bag_cases


def work(case: TrigramBagCase, nnz: int, backward: bool) -> Work:
    """Bytes one call must move for ``nnz`` slot indices: the forward reads each table row
    once (``min(nnz, v)`` rows), the indices and word offsets, and writes ``[words, h]``; the
    backward reads the gradient, indices and offsets and writes the dense ``[v, h]`` table
    gradient."""
    e, h = itemsize(dtype_name(case.dtype)), case.hidden
    csr = nnz * INDEX_BYTES + (case.words + 1) * INDEX_BYTES
    forward = min(nnz, case.vocab) * h * e + csr + case.words * h * e
    return Work(forward + ((case.words * h + case.vocab * h) * e + csr if backward else 0))


@pytest.fixture(scope="module")
def base(case, settings):
    """Module, both input forms and the upstream gradient, built once per case."""
    seed_all(0)
    device = settings.device
    g = torch.Generator().manual_seed(0)
    trigrams = (1 + torch.poisson(torch.full((case.words,), 4.5), generator=g)).clamp(max=20)
    trigrams = trigrams.long()
    n_trigrams = int(trigrams.sum())
    slots = torch.randint(0, case.vocab, (n_trigrams, case.m), generator=g)
    word_of_trigram = torch.repeat_interleave(torch.arange(case.words), trigrams)
    offsets = torch.zeros(case.words + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(trigrams * case.m, 0)
    module = TFreeEmbedding(case.vocab, case.hidden, aggregation="sum")
    module = module.to(device=device, dtype=case.dtype)
    inputs = {
        "slots": slots.to(device),
        "word_of_trigram": word_of_trigram.to(device),
        "indices": slots.reshape(-1).to(device),
        "offsets": offsets.to(device),
        "n_words": case.words,
    }
    grad = torch.randn(case.words, case.hidden, device=device, dtype=case.dtype)
    return module, inputs, grad


def build(module: TFreeEmbedding, variant: str):
    """``(callable inputs -> [words, h], module whose parameters it uses)`` for ``variant``."""
    m = fresh_copy(module)
    if variant in BASE_VARIANTS:
        fn = compile_variant(m, variant)
        return (lambda x: fn(x["slots"], x["word_of_trigram"], x["n_words"])), m
    if variant == "embedding_bag":
        return (lambda x: F.embedding_bag(x["indices"], m.weight, x["offsets"], mode="sum",
                                          include_last_offset=True)), m
    if variant == "aa_op":
        skip_unless_aa_op("trigram_bag")
        return (lambda x: torch.ops.aa.trigram_bag(m.weight, x["indices"], x["offsets"])), m
    raise AssertionError(variant)


@pytest.mark.parametrize("variant", BASE_VARIANTS + PEERS)
def test_trigram_bag_fwd(benchmark, settings, case, base, variant, repeat):
    module, inputs, _ = base
    bench_variant(benchmark, settings, case, variant, "trigram_bag_fwd", kind="op",
                  work=work(case, inputs["indices"].numel(), backward=False),
                  build=lambda: build(module, variant),
                  step=lambda built: inference_step(built[0], inputs))


@pytest.mark.parametrize("variant", BASE_VARIANTS + PEERS)
def test_trigram_bag_fwd_bwd(benchmark, settings, case, base, variant, repeat):
    module, inputs, grad = base
    bench_variant(benchmark, settings, case, variant, "trigram_bag_fwd_bwd", kind="op",
                  work=work(case, inputs["indices"].numel(), backward=True),
                  build=lambda: build(module, variant),
                  step=lambda built: training_step(built[0], inputs, grad=grad, clear=(built[1],)))
