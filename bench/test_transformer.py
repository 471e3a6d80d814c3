"""Transformer workloads: inference forward and a training step (forward + backward).

Variants: ``eager`` (the module as is), ``inductor`` (``torch.compile``), ``aa``
(``torch.compile(backend="aa")``, inner compiler inductor). The training step compiles the
model's ``loss`` method (forward, cross-entropy and, through aot_autograd, the backward).
"""

from __future__ import annotations

import pytest
import torch

from aa_compile.models.transformer import Transformer, TransformerConfig
from bench.harness import (
    BASE_VARIANTS,
    compile_variant,
    fresh_copy,
    run_benchmark,
    seed_all,
    transformer_cases,
    variant as built_variant,
)


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
    run, first = built_variant(
        ("transformer_fwd", case.id, variant),
        lambda: compile_variant(fresh_copy(model).eval(), variant),
    )
    tokens = ids[:, :-1].contiguous()

    def step():
        with torch.no_grad():
            return run(tokens)

    run_benchmark(benchmark, step, settings=settings, workload="transformer_fwd",
                  variant=variant, shape=case.shape, dtype=case.dtype, kind="model",
                  first=first)


def _training(model, variant):
    model = fresh_copy(model).train()
    return model, compile_variant(model.loss, variant)


@pytest.mark.parametrize("variant", BASE_VARIANTS)
def test_transformer_fwd_bwd(benchmark, settings, case, base, variant, repeat):
    model, ids = base
    (model, loss_fn), first = built_variant(
        ("transformer_fwd_bwd", case.id, variant), lambda: _training(model, variant)
    )

    def step():
        loss = loss_fn(ids)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss

    run_benchmark(benchmark, step, settings=settings, workload="transformer_fwd_bwd",
                  variant=variant, shape=case.shape, dtype=case.dtype, kind="model",
                  first=first)
