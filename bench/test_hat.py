"""HAT model workloads: the reference `HATModel` (byte encoder, word pooling, word backbone,
byte decoder) forward (logits) and a training step (loss + backward) on real text.

Variants: ``eager`` (the reference as is: dense ``[T, T]`` masked byte attention, padded
``[W, H, L, hd]`` word pooling), ``inductor`` (``torch.compile``), ``aa`` (``torch.compile(
backend="aa")``, inner compiler inductor: the HAT passes put in ``aa::window_attention`` and
``aa::word_pool``; ``extra_info["aa_rewrites"]`` shows what fired). Greedy generation has its
own two: ``eager`` (the uncached reference, a whole forward per byte) and ``cached`` (the
byte-encoder, word-backbone and byte-decoder KV caches of `HATCache`).

Input: ``aa_compile.data.text("mixed")`` cut to ``n_bytes`` through the HAT splitter (words of at
most 100 bytes); ``extra_info`` has the corpus's bytes per word and ``items`` = bytes per step,
so the reporter shows bytes/s. The backbone is kept small: the work that the passes change is in
the byte stacks and the pooling.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from aa_compile.data import text
from aa_compile.models.hat import HATByteSplitter, HATConfig, HATModel
from aa_compile.models.transformer import TransformerConfig
from bench.harness import (BASE_VARIANTS, CaseLabels, bench_variant, fresh_copy, inference_step,
                           inference_variant, run_benchmark, seed_all, training_step,
                           training_variant)


@dataclasses.dataclass(frozen=True)
class HATCase(CaseLabels):
    n_bytes: int  # T (the corpus cut at a word boundary)
    d_enc: int
    layers: int  # encoder layers = decoder layers
    heads: int
    window: int
    d_backbone: int
    dtype: torch.dtype

    SHAPE = "T{n_bytes} d{d_enc} L{layers} H{heads} w{window}"
    ID = "T{n_bytes}-d{d_enc}-L{layers}-H{heads}-w{window}-{dtype}"

    def config(self) -> HATConfig:
        def stack(d):
            return TransformerConfig(vocab_size=256, d_model=d, n_layers=self.layers,
                                     n_heads=self.heads, n_kv_heads=max(1, self.heads // 2),
                                     d_ff=2 * d)
        backbone = TransformerConfig(vocab_size=1, d_model=self.d_backbone, n_layers=1,
                                     n_heads=self.heads, d_ff=2 * self.d_backbone)
        return HATConfig(encoder=stack(self.d_enc), backbone=backbone, decoder=stack(self.d_enc),
                         sliding_window=self.window, pool_heads=self.heads)


def hat_cases(quick: bool, device: str) -> list[HATCase]:
    """Quick: 2k bytes, d 128, 2+2 byte layers, window 128 (float32). Full: 8k bytes, d 512,
    window 512 (bfloat16 on CUDA)."""
    if quick:
        return [HATCase(2048, 128, 2, 4, 128, 128, torch.float32)]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return [HATCase(2048, 128, 2, 4, 128, 128, torch.float32),
            HATCase(8192, 512, 4, 8, 512, 512, dtype)]


CASES = hat_cases


@pytest.fixture(scope="module")
def base(case, settings):
    """The model and the batch of real text, built once per case."""
    seed_all(0)
    model = HATModel(case.config()).to(device=settings.device, dtype=case.dtype)
    batch = HATByteSplitter(100).encode(text("mixed", max_bytes=case.n_bytes)).to(settings.device)
    return model, batch


def _info(benchmark, batch) -> None:
    benchmark.extra_info.update(items=batch.n_bytes, item_unit="bytes",
                                bytes_per_word=round(batch.n_bytes / max(1, batch.n_words), 3),
                                words=batch.n_words, docs=batch.n_docs,
                                max_word_bytes=int(batch.word_bytes.shape[1]))


def _shape(case, batch) -> str:
    return f"{case.shape} W{batch.n_words} Lw{int(batch.word_bytes.shape[1])}"


@pytest.mark.parametrize("variant", BASE_VARIANTS)
def test_hat_fwd(benchmark, settings, case, base, variant, repeat):
    model, batch = base
    bench_variant(benchmark, settings, case, variant, "hat_fwd", kind="model",
                  shape=_shape(case, batch), build=lambda: inference_variant(model, variant),
                  step=lambda run: inference_step(run, batch))
    _info(benchmark, batch)


@pytest.mark.parametrize("variant", BASE_VARIANTS)
def test_hat_fwd_bwd(benchmark, settings, case, base, variant, repeat):
    model, batch = base
    bench_variant(benchmark, settings, case, variant, "hat_fwd_bwd", kind="model",
                  shape=_shape(case, batch), build=lambda: training_variant(model, variant),
                  step=lambda built: training_step(built[0], batch, clear=(built[1],)))
    _info(benchmark, batch)


#: generation variants: ``eager`` is the uncached reference (``use_cache=False``: the whole
#: model again for every byte), ``cached`` decodes with the three KV caches (`HATCache`)
GENERATE_VARIANTS = ("eager", "cached")
#: case id -> (bytes, words) of the first generation variant run, to compare the others with
_GENERATED: dict[str, tuple] = {}


@pytest.mark.parametrize("variant", GENERATE_VARIANTS)
def test_hat_generate(benchmark, settings, case, base, variant, repeat):
    """Greedy generation (``HATModel.generate_bytes``: 32 new bytes after a 256-byte prompt),
    reported as generated words/s (``extra_info["new_bytes"]`` gives bytes/s). ``eager``
    recomputes the whole model on prompt + bytes for every byte; ``cached`` prefills the
    prompt once, then runs one encoder step per byte, one backbone step per finished word and
    the decoder over the bytes whose word is new. Both generate the same bytes (asserted in
    float32)."""
    model, _ = base
    model = fresh_copy(model).eval()
    prompt = text("mixed", max_bytes=256)
    n_prompt = len(model.splitter.words(prompt))
    use_cache = variant == "cached"

    def step():
        with torch.no_grad():
            return model.generate_bytes(prompt, max_bytes=32, use_cache=use_cache)

    data, words = step()  # greedy: every round generates the same bytes
    first = _GENERATED.setdefault(case.id, (data, words))
    # float32: the caches change the logits by rounding only, so the same argmax; bfloat16
    # rounding can flip a near-tie of a random model, so there it is recorded, not asserted
    same = (data, words) == first
    assert same or case.dtype != torch.float32, "cached and uncached generation disagree"
    run_benchmark(benchmark, step, settings=settings, workload="hat_generate", variant=variant,
                  shape=f"{case.shape} p{len(prompt.encode())}+32 bytes", dtype=case.dtype,
                  kind="task")
    new_words = max(1, len(words) - n_prompt)
    benchmark.extra_info.update(items=new_words, item_unit="words", new_bytes=len(data),
                                same_bytes_as_first_variant=same)
