"""RMSNorm workloads: the transformer's hand-written ``RMSNorm`` module on a ``[tokens, d]``
activation, forward (inference) and forward + backward.

Variants: ``eager``, ``inductor``, ``aa`` (the backend rewrites the module into
``aa::rms_norm``), and peers: ``aten`` (``torch.nn.functional.rms_norm``, eager) and ``aa_op``
(``torch.ops.aa.rms_norm`` called eagerly, i.e. the op's own kernel without a compiler).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import aa_compile  # noqa: F401  (defines torch.ops.aa.*)
from aa_compile.models.transformer import RMSNorm
from bench.harness import (BASE_VARIANTS, RMSNormCase, bench_variant, compile_variant,
                           dtype_name, fresh_copy, inference_step, rms_norm_cases, seed_all,
                           skip_unless_aa_op, training_step)
from bench.roofline import Work, itemsize

PEERS = ("aten", "aa_op")


#: the shapes of this workload file, per --quick / --device (see bench/conftest.py)
CASES = rms_norm_cases


def work(case: RMSNormCase, backward: bool) -> Work:
    """Bytes one call must move: forward reads x and the weight and writes y; the backward
    then reads grad, x and the weight and writes dx and dweight."""
    e, t, d = itemsize(dtype_name(case.dtype)), case.tokens, case.dim
    forward = (2 * t * d + d) * e
    return Work(forward + ((3 * t * d + 2 * d) * e if backward else 0))


@pytest.fixture(scope="module")
def base(case, settings):
    """Module, activation and upstream gradient, built once per shape and dtype."""
    seed_all(0)
    module = RMSNorm(case.dim, eps=1e-6)
    with torch.no_grad():
        module.weight.normal_(1.0, 0.1)
    module = module.to(device=settings.device, dtype=case.dtype)
    x = torch.randn(case.tokens, case.dim, device=settings.device, dtype=case.dtype)
    grad = torch.randn_like(x)
    return module, x, grad


def build(module: RMSNorm, variant: str):
    """``(callable x -> y, module whose parameters it uses)`` for ``variant``."""
    m = fresh_copy(module)
    if variant in BASE_VARIANTS:
        return compile_variant(m, variant), m
    if variant == "aten":
        if not hasattr(F, "rms_norm"):
            pytest.skip("torch.nn.functional.rms_norm is not available in this torch")
        return (lambda x: F.rms_norm(x, (m.weight.shape[0],), m.weight, m.eps)), m
    if variant == "aa_op":
        skip_unless_aa_op("rms_norm")
        return (lambda x: torch.ops.aa.rms_norm(x, m.weight, m.eps)), m
    raise AssertionError(variant)


@pytest.mark.parametrize("variant", BASE_VARIANTS + PEERS)
def test_rms_norm_fwd(benchmark, settings, case, base, variant, repeat):
    module, x, _ = base
    bench_variant(benchmark, settings, case, variant, "rms_norm_fwd", kind="op",
                  work=work(case, backward=False), build=lambda: build(module, variant),
                  step=lambda built: inference_step(built[0], x))


@pytest.mark.parametrize("variant", BASE_VARIANTS + PEERS)
def test_rms_norm_fwd_bwd(benchmark, settings, case, base, variant, repeat):
    module, x, grad = base
    xr = x.detach().clone().requires_grad_(True)
    bench_variant(benchmark, settings, case, variant, "rms_norm_fwd_bwd", kind="op",
                  work=work(case, backward=True), build=lambda: build(module, variant),
                  step=lambda built: training_step(built[0], xr, grad=grad, clear=(xr, built[1])))
