"""DTM benchmarks: the sweep with activation reuse vs from scratch on the trained reference
transformer (target >= 1.6x), and int8 weight-only decode (target: `aa::int8_linear` >= 1.3x
float32 ``F.linear`` at batch 1 on a CPU).

Two ways to run it:

- ``python -m bench.test_dtm`` (or ``test_dtm_bench`` under pytest): the sweep and a quick
  per-shape int8 table (`bench_int8`), written to ``bench/results/dtm.json``. The sweep's
  trained model comes from `bench.reference_cache` (trained on a machine's first run, then
  loaded from the cache);
- the harness (``python -m bench -k int8_decode``, see ``bench/README.md``): workloads
  ``int8_linear_decode`` (one linear at batch-1 decode, ``x [M, K]`` with ``M = 1`` unless the
  case says otherwise) and ``dtm_int8_model_decode`` (one batch-1 decode step of the reference
  transformer with a KV cache, every DTM component int8 via ``dtm.apply``; the embedding and the
  LM head are not components and stay float32). Variants: ``eager`` (float32, the baseline),
  ``inductor`` (float32, ``torch.compile``), ``aa`` (float32, ``backend="aa"``; model only),
  ``int8`` (the int8 op / model, eager), ``int8_aa`` (the same compiled with ``backend="aa"``;
  compare with ``inductor`` / ``aa``) and ``aten_int8pack`` (linear only, CPU: ATen's
  ``_weight_int8pack_mm``, the op's previous CPU kernel). Compiled variants use
  ``dynamic=False`` so every case gets static-shape code.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import statistics
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from aa_compile.kernels.int8_linear.reference import quantize_absmax

from aa_compile import dtm
from bench.harness import CaseLabels, bench_variant, seed_all
from bench.reference_cache import reference_model

RESULTS = Path(__file__).parent / "results"


#: training steps of the reference model in the quick set: the sweep's timing (what the quick
#: set records) does not depend on how far the weights were trained; the full set and
#: `python -m bench.test_dtm` use the trained model of `bench.reference_cache.SETTINGS`
QUICK_TRAINING_STEPS = 40


def bench_sweep(n_prompts=16, prompt_len=32, n_tokens=32, levels=("prune:0.5", "int8"),
                reps=3, training: dict | None = None) -> dict:
    model = reference_model(settings=training)
    prompts = dtm.byte_prompts(n_prompts, prompt_len)
    ref = dtm.generate(model, prompts, n_tokens)
    times = {}
    for reuse in (True, False):  # interleaved repetitions
        times[reuse] = []
    for _ in range(reps):
        for reuse in (True, False):
            t = time.perf_counter()
            res = dtm.sweep(model, prompts, n_tokens, levels, reuse=reuse, progress=False,
                            reference=ref)
            times[reuse].append(time.perf_counter() - t)
    reuse_s, scratch_s = statistics.median(times[True]), statistics.median(times[False])
    return {"n_layers": model.config.n_layers, "n_prompts": n_prompts,
            "prompt_len": prompt_len, "n_tokens": n_tokens, "levels": list(levels),
            "reuse_s": reuse_s, "scratch_s": scratch_s, "speedup": scratch_s / reuse_s,
            "target": 1.6, "example_fdt_median": {
                lv: res["results"]["layers.0.attn.q_proj"][lv]["fdt_median"] for lv in levels}}


#: batch-1 decode shapes ``(N, K)`` of `bench_int8`: the issue's four, plus a 4096^2 projection and
#: Llama-7B-like MLP matrices (11008 x 4096 and its transpose), where DRAM traffic dominates
INT8_SHAPES = ((4096, 1024), (1024, 4096), (2048, 2048), (768, 256), (4096, 4096), (11008, 4096),
               (4096, 11008))


def bench_int8(shapes=INT8_SHAPES, reps: int = 5) -> list[dict]:
    """``aa::int8_linear`` vs float32 ``F.linear`` at ``M = 1``: per shape, the median over
    ``reps`` interleaved rounds of the mean time of a batch of calls (~30 MB of fp32 weight)."""
    import aa_compile.ops  # noqa: F401

    rows = []
    for n, k in shapes:
        x = torch.randn(1, k)
        w = torch.randn(n, k)
        q, s = quantize_absmax(w)
        calls = max(3, (1 << 23) // (n * k))
        fns = {"fp32": lambda x=x, w=w: F.linear(x, w),
               "int8": lambda x=x, q=q, s=s: torch.ops.aa.int8_linear(x, q, s, None)}
        times: dict[str, list[float]] = {name: [] for name in fns}
        for fn in fns.values():
            fn()
        for _ in range(reps):  # interleaved, so drift of a shared machine hits both alike
            for name, fn in fns.items():
                t = time.perf_counter()
                for _ in range(calls):
                    fn()
                times[name].append((time.perf_counter() - t) / calls)
        f32, i8 = statistics.median(times["fp32"]), statistics.median(times["int8"])
        rows.append({"n": n, "k": k, "fp32_us": f32 * 1e6, "int8_us": i8 * 1e6,
                     "speedup": f32 / i8, "target": 1.3})
    return rows


def run(quick: bool = False) -> dict:
    training = {"steps": QUICK_TRAINING_STEPS} if quick else None
    out = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
           "threads": torch.get_num_threads(), "quick": quick,
           "sweep": bench_sweep(training=training), "int8": bench_int8()}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "dtm.json").write_text(json.dumps(out, indent=2))
    return out


def test_dtm_bench(settings):
    out = run(quick=settings.quick)
    print(json.dumps(out, indent=2))


# ---- harness workloads (python -m bench) --------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Int8LinearCase(CaseLabels):
    n: int
    k: int
    m: int = 1

    workload = "int8_linear_decode"
    kind = "op"
    SHAPE = "M{m} N{n} K{k}"
    ID = "int8-linear-M{m}-N{n}-K{k}"


@dataclasses.dataclass(frozen=True)
class Int8ModelCase(CaseLabels):
    d_model: int
    n_layers: int
    n_heads: int = 16
    n_kv_heads: int = 4
    vocab: int = 8192
    prompt: int = 32

    workload = "dtm_int8_model_decode"
    kind = "model"
    SHAPE = "B1 decode@{prompt} d{d_model} L{n_layers} H{n_heads}/{n_kv_heads} V{vocab}"
    ID = "int8-model-d{d_model}-L{n_layers}"


def CASES(quick: bool, device: str):
    """Quick: the issue's four decode shapes, 4096 x 4096 and 11008 x 4096 at ``M = 1``, and a
    d=1024, 4-layer model. Full: also 4096 x 11008, ``M = 4 / 16`` for 4096 x 4096 and a
    d=2048, 4-layer model (GQA 16/4 heads, SwiGLU width 5632). Vocabulary 8192: the LM head
    is not a DTM component and stays float32 in every variant (at 32000 words it would be ~27%
    of the bytes a float32 d=2048 decode step reads and ~60% of the int8 model's)."""
    shapes = [(4096, 1024), (1024, 4096), (2048, 2048), (768, 256), (4096, 4096), (11008, 4096)]
    if quick:
        return [*(Int8LinearCase(n, k) for n, k in shapes), Int8ModelCase(1024, 4)]
    return [*(Int8LinearCase(n, k) for n, k in shapes), Int8LinearCase(4096, 11008),
            Int8LinearCase(4096, 4096, 4), Int8LinearCase(4096, 4096, 16), Int8ModelCase(2048, 4)]


VARIANTS = ("eager", "inductor", "aa", "int8", "int8_aa", "aten_int8pack")


def _compile(fn, backend: str):
    import aa_compile  # noqa: F401  (registers the backend)

    return torch.compile(fn, backend=backend, dynamic=False)


@pytest.fixture(scope="module")
def base(case, settings):
    """Linear: ``x, w`` and the int8 ``q, s``. Model: the float32 transformer, its all-int8
    copy and a prompt."""
    from aa_compile.models.transformer import Transformer, TransformerConfig

    seed_all(0)
    dev = settings.device
    if isinstance(case, Int8LinearCase):
        x = torch.randn(case.m, case.k, device=dev)
        w = torch.randn(case.n, case.k, device=dev)
        q, s = quantize_absmax(w)
        return x, w, q.to(dev), s.to(dev)
    cfg = TransformerConfig(vocab_size=case.vocab, d_model=case.d_model, n_layers=case.n_layers,
                            n_heads=case.n_heads, n_kv_heads=case.n_kv_heads,
                            max_seq_len=case.prompt + 1)
    model = Transformer(cfg).to(dev).eval()
    int8 = dtm.apply(model, {name: "int8" for name in dtm.find_components(model)}).eval()
    ids = torch.randint(0, case.vocab, (1, case.prompt), device=dev)
    return model, int8, ids


def _linear_fn(case, base, variant, device):
    x, w, q, s = base
    if variant == "aten_int8pack":
        if device != "cpu":
            pytest.skip("aten_int8pack: the CPU kernel only")
        return lambda: torch.ops.aten._weight_int8pack_mm(x, q, s)
    if variant in ("int8", "int8_aa"):
        def fn(x):
            return torch.ops.aa.int8_linear(x, q, s, None)
    else:
        def fn(x):
            return F.linear(x, w)
    if variant in ("inductor", "aa", "int8_aa"):
        fn = _compile(fn, "inductor" if variant == "inductor" else "aa")
    return lambda: fn(x)


def _model_fn(case, base, variant):
    """One decode step at position ``case.prompt`` (the cache is rewound before each call, so
    every call does the same work and compiled code sees the same cache length)."""
    model, int8, ids = base
    m = int8 if variant.startswith("int8") else model
    cache = m.new_cache(1, case.prompt + 1)
    with torch.no_grad():
        nxt = m(ids, cache)[:, -1:].argmax(-1)  # prefill
    run = m
    if variant in ("inductor", "aa", "int8_aa"):
        run = _compile(m, "inductor" if variant == "inductor" else "aa")

    def step():
        cache.length = case.prompt
        with torch.no_grad():
            return run(nxt, cache)

    return step


@pytest.mark.parametrize("variant", VARIANTS)
def test_int8_decode(benchmark, settings, case, base, variant, repeat):
    if isinstance(case, Int8LinearCase):
        build = lambda: _linear_fn(case, base, variant, settings.device)
    else:
        if variant == "aten_int8pack":
            pytest.skip("aten_int8pack: linear workload only")
        build = lambda: _model_fn(case, base, variant)
    first = bench_variant(benchmark, settings, case, variant, case.workload, kind=case.kind,
                          dtype=torch.float32, build=build)
    if first:
        benchmark.extra_info["threads"] = torch.get_num_threads()


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
