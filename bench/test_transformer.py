"""Transformer workloads: inference forward and a training step (forward + backward).

Variants: ``eager`` (the module as is), ``inductor`` (``torch.compile``), ``aa``
(``torch.compile(backend="aa")``, inner compiler inductor). The training step compiles the
model's ``loss`` method (forward, cross-entropy and, through aot_autograd, the backward).
"""

from __future__ import annotations

import pytest
import torch

from aa_compile.models.transformer import Transformer, TransformerConfig
from bench.harness import (BASE_VARIANTS, bench_variant, inference_step, inference_variant,
                           seed_all, training_step, training_variant, transformer_cases)


#: the shapes of this workload file, per --quick / --device (see bench/conftest.py)
CASES = transformer_cases


@pytest.fixture(scope="module")
def base(case, settings):
    """The model and token ids, built once per shape; each variant gets a deep copy."""
    seed_all(0)
    cfg = TransformerConfig(
        vocab_size=case.vocab_size,
        d_model=case.d_model,
        n_layers=case.n_layers,
        n_heads=case.n_heads,
        n_kv_heads=case.n_kv_heads,
        max_seq_len=case.seq + 1,  # loss() feeds seq tokens and predicts the next ones
    )
    model = Transformer(cfg).to(device=settings.device, dtype=case.dtype)
    ids = torch.randint(0, case.vocab_size, (case.batch, case.seq + 1), device=settings.device)
    return model, ids


@pytest.mark.parametrize("variant", BASE_VARIANTS)
def test_transformer_fwd(benchmark, settings, case, base, variant, repeat):
    model, ids = base
    tokens = ids[:, :-1].contiguous()
    bench_variant(benchmark, settings, case, variant, "transformer_fwd", kind="model",
                  build=lambda: inference_variant(model, variant),
                  step=lambda run: inference_step(run, tokens))


@pytest.mark.parametrize("variant", BASE_VARIANTS)
def test_transformer_fwd_bwd(benchmark, settings, case, base, variant, repeat):
    model, ids = base
    bench_variant(benchmark, settings, case, variant, "transformer_fwd_bwd", kind="model",
                  build=lambda: training_variant(model, variant),
                  step=lambda built: training_step(built[0], ids, clear=(built[1],)))
