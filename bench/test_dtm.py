"""DTM benchmarks: the sweep with activation reuse vs from scratch on the trained reference
transformer (target >= 1.6x), and aa::int8_linear vs fp32 F.linear at batch-1 decode shapes
(target >= 1.3x). Run directly (``python -m bench.test_dtm``) or under pytest; writes
``bench/results/dtm.json``.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from aa_compile.kernels.int8_linear.reference import quantize_absmax

from aa_compile import dtm

RESULTS = Path(__file__).parent / "results"


def _median_time(fn, reps: int = 5) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def bench_sweep(n_prompts=16, prompt_len=32, n_tokens=32, levels=("prune:0.5", "int8"),
                reps=3) -> dict:
    from bench.train_reference import load_or_train

    ckpt = RESULTS / "dtm_reference.pt"
    model = load_or_train(ckpt if ckpt.exists() else None)
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


def bench_int8(shapes=((4096, 1024), (1024, 4096), (2048, 2048), (768, 256))) -> list[dict]:
    import aa_compile.ops  # noqa: F401

    rows = []
    for n, k in shapes:
        x = torch.randn(1, k)
        w = torch.randn(n, k)
        q, s = quantize_absmax(w)
        f32 = _median_time(lambda x=x, w=w: [F.linear(x, w) for _ in range(50)])
        i8 = _median_time(
            lambda x=x, q=q, s=s: [torch.ops.aa.int8_linear(x, q, s, None) for _ in range(50)])
        rows.append({"n": n, "k": k, "fp32_us": f32 / 50 * 1e6, "int8_us": i8 / 50 * 1e6,
                     "speedup": f32 / i8, "target": 1.3})
    return rows


def run() -> dict:
    out = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
           "threads": torch.get_num_threads(), "sweep": bench_sweep(), "int8": bench_int8()}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "dtm.json").write_text(json.dumps(out, indent=2))
    return out


def test_dtm_bench():
    out = run()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
