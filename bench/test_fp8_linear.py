"""FP8 linear workloads: ``y = x @ w^T`` with ``x [M, K]``, ``w [N, K]``, forward (inference)
and forward + backward (training), through ``aa::fp8_linear`` and its peers.

Variants: ``eager`` (``F.linear`` in float32: the baseline of the ratio table), ``bf16``
(``F.linear`` in bfloat16), ``fp8_static`` / ``fp8_tensorwise`` / ``fp8_rowwise``
(``torch.ops.aa.fp8_linear`` eagerly with that scaling and the u-μP unit scale
``out_scale = 1/sqrt(K)``; the CPU kernel is ``torch._scaled_mm``, CUDA the Triton kernel), and
``torchao`` (torchao's ``Float8Linear``, tensorwise dynamic scaling) where torchao is installed
and runs on the device. ``extra_info["aten_ops_per_call"]`` is the number of top-level aten ops
one call runs (torch.profiler; on a GPU roughly the kernel launches): measured, not timed.

On a CPU there are no FP8 units: ``torch._scaled_mm`` converts FP8 to float in its GEMM, so the
FP8 variants measure the overhead of quantising, not a speed-up. The numbers to read there are
the op counts and the static-vs-dynamic difference.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import aa_compile  # noqa: F401  (defines torch.ops.aa.*)
from bench.harness import (CaseLabels, bench_variant, dtype_name, inference_step, seed_all,
                           training_step)
from bench.roofline import Work, itemsize

VARIANTS = ("eager", "bf16", "fp8_static", "fp8_tensorwise", "fp8_rowwise", "torchao")


@dataclasses.dataclass(frozen=True)
class Fp8LinearCase(CaseLabels):
    m: int
    k: int
    n: int
    dtype: torch.dtype  # the activation / weight dtype the FP8 variants start from

    SHAPE = "M{m} K{k} N{n}"
    ID = "M{m}-K{k}-N{n}-{dtype}"


def fp8_linear_cases(quick: bool, device: str) -> list[Fp8LinearCase]:
    """Quick: M=K=N=1024 float32. Full: 1k to 8k cubes, bfloat16 inputs on CUDA; on a CPU
    1k to 4k in float32 (an 8k cube is ~1 TFLOP, seconds per call on a few cores)."""
    if quick:
        return [Fp8LinearCase(1024, 1024, 1024, torch.float32)]
    if device == "cuda":
        return [Fp8LinearCase(s, s, s, torch.bfloat16) for s in (1024, 2048, 4096, 8192)]
    return [Fp8LinearCase(s, s, s, torch.float32) for s in (1024, 2048, 4096)]


CASES = fp8_linear_cases

#: the units each variant's GEMMs run on (float32 F.linear: CUDA cores, no TF32)
PRECISION = {"eager": "fp32", "bf16": "bf16", "fp8_static": "fp8", "fp8_tensorwise": "fp8",
             "fp8_rowwise": "fp8", "torchao": "fp8"}


def work(case: Fp8LinearCase, variant: str, backward: bool) -> Work:
    """FLOPs and bytes one call must do: the forward GEMM is ``2 M N K`` FLOPs, reading x
    and w and writing y in the case's dtype; the backward's two GEMMs (dx, dw) ``4 M N K``,
    reading the gradient, x and w and writing dx and dw."""
    e, m, k, n = itemsize(dtype_name(case.dtype)), case.m, case.k, case.n
    forward = Work((m * k + n * k + m * n) * e, 2 * m * n * k, PRECISION[variant])
    if not backward:
        return forward
    return forward + Work((m * n + m * k + n * k + m * k + n * k) * e, 4 * m * n * k,
                          PRECISION[variant])


@pytest.fixture(scope="module")
def base(case, settings):
    seed_all(0)
    dev = settings.device
    x = torch.randn(case.m, case.k, device=dev, dtype=case.dtype)
    w = torch.randn(case.n, case.k, device=dev, dtype=case.dtype)  # u-μP: unit-scale weights
    grad = torch.randn(case.m, case.n, device=dev, dtype=case.dtype)
    return x, w, grad


def _torchao_module(w: torch.Tensor, k: int, n: int):
    try:
        from torchao.float8 import convert_to_float8_training
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"torchao float8 is not available: {type(e).__name__}: {e}")
    lin = torch.nn.Linear(k, n, bias=False, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
    try:
        m = convert_to_float8_training(torch.nn.Sequential(lin))
        m(torch.randn(16, k, device=w.device, dtype=w.dtype)).sum().backward()
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"torchao Float8Linear does not run on {w.device}: "
                    f"{type(e).__name__}: {str(e)[:200]}")
    return m


def build(case: Fp8LinearCase, w: torch.Tensor, variant: str, settings):
    """``(fn(x) -> y, parameter tensor)`` for ``variant`` (the parameter gets the gradient)."""
    k, n = case.k, case.n
    if variant == "bf16" and settings.quick and settings.device == "cpu":
        pytest.skip("bf16 F.linear on a CPU without bf16 GEMM units takes seconds per call "
                    "(measured ~8 s for the 1024^3 fwd+bwd on the 2-core dev box); "
                    "it runs in the full (non --quick) set")
    if variant == "eager":
        p = w.float().clone().requires_grad_()
        return (lambda x: F.linear(x.float(), p)), p
    if variant == "bf16":
        p = w.bfloat16().clone().requires_grad_()
        return (lambda x: F.linear(x.bfloat16(), p)), p
    if variant.startswith("fp8_"):
        scaling = variant.removeprefix("fp8_")
        p = w.clone().requires_grad_()
        s = k**-0.5
        return (lambda x: torch.ops.aa.fp8_linear(x, p, None, scaling, out_scale=s)), p
    if variant == "torchao":
        m = _torchao_module(w, k, n)
        return m, next(m.parameters())
    raise AssertionError(variant)


def aten_ops_per_call(fn) -> int:
    """Top-level aten ops of one call of ``fn`` (torch.profiler, CPU activity)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name.startswith("aten::")
               and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))


def _record_aten_ops(benchmark, step) -> None:
    """The tests' ``warm_up``: one call of the new variant (outside ``compile_s``), then
    ``extra_info["aten_ops_per_call"]``."""
    step()
    benchmark.extra_info["aten_ops_per_call"] = aten_ops_per_call(step)


@pytest.mark.parametrize("variant", VARIANTS)
def test_fp8_linear_fwd(benchmark, settings, case, base, variant, repeat):
    x, w, _ = base
    bench_variant(benchmark, settings, case, variant, "fp8_linear_fwd", kind="op",
                  work=work(case, variant, backward=False),
                  build=lambda: build(case, w, variant, settings),
                  step=lambda built: inference_step(built[0], x),
                  warm_up=lambda step: _record_aten_ops(benchmark, step))


@pytest.mark.parametrize("variant", VARIANTS)
def test_fp8_linear_fwd_bwd(benchmark, settings, case, base, variant, repeat):
    x, w, grad = base
    xr = x.detach().clone().requires_grad_(True)
    bench_variant(benchmark, settings, case, variant, "fp8_linear_fwd_bwd", kind="op",
                  work=work(case, variant, backward=True),
                  build=lambda: build(case, w, variant, settings),
                  step=lambda built: training_step(built[0], xr, grad=lambda y: grad.to(y.dtype),
                                                   clear=(xr, built[1])),
                  warm_up=lambda step: _record_aten_ops(benchmark, step))
