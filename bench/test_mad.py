"""MAD workloads: the training step and the test-set forward of the MAD layer menu's models on a
real MAD batch (in-context recall), per ``aa_compile.mad.zoo`` model.

Variants: ``eager`` (the model as is), ``inductor`` (``torch.compile``), ``aa``
(``torch.compile(backend="aa")``, inner compiler inductor; ``extra_info["aa_rewrites"]`` says
what fired: the per-head RMS norm of gated linear attention becomes ``aa::rms_norm``, the
attention stacks have nothing for it). The training step compiles the model's MAD loss
(cross-entropy that skips the -100 targets) and runs forward + backward, as one step of
`aa_compile.mad.train_model` does before its optimiser. ``items`` = tokens per call, so the
report shows tokens/s.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import Tensor, nn

from aa_compile.mad import Setting, make_data, model_spec
from aa_compile.mad.train import loss_of
from bench.harness import (BASE_VARIANTS, CaseLabels, bench_variant, inference_step,
                           inference_variant, seed_all, training_step, training_variant)


@dataclasses.dataclass(frozen=True)
class MADCase(CaseLabels):
    model: str  # a name in aa_compile.mad.MODELS
    batch: int
    seq: int  # the in-context recall setting's seq_len (inputs have seq - 1 tokens)
    dim: int
    dtype: torch.dtype

    SHAPE = "{model} B{batch}xS{seq} d{dim}"
    ID = "{model}-S{seq}-d{dim}-{dtype}"


#: the layer menu's stacks (every MAD model that takes every task)
MENU = ("attention-swiglu", "sliding-attention-swiglu", "gla-swiglu", "attention-mlp")


def mad_cases(quick: bool, device: str) -> list[MADCase]:
    """Quick: gated linear attention (the stack where ``aa`` rewrites), seq 32, dim 32, batch
    16: small, so that the compiles dominate and the set stays under a minute. Full: the whole
    menu at the benchmark baseline, seq 128, dim 128, batch 128 (bfloat16 on CUDA)."""
    if quick:
        return [MADCase("gla-swiglu", 16, 32, 32, torch.float32)]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return [MADCase(m, 128, 128, 128, dtype) for m in MENU]


CASES = mad_cases


class MADLoss(nn.Module):
    """A MAD model with the suite's loss as its ``loss`` method (what `training_variant`
    compiles)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: Tensor) -> Tensor:
        return self.model(inputs)

    def loss(self, inputs: Tensor, targets: Tensor) -> Tensor:
        return loss_of(self.model(inputs), targets)


@pytest.fixture(scope="module")
def base(case, settings):
    """The model and one batch of the in-context recall setting, built once per case."""
    seed_all(0)
    setting = Setting("in-context-recall", vocab_size=16, seq_len=case.seq,
                      num_train_examples=case.batch, num_test_examples=case.batch)
    data = make_data(setting)
    model = MADLoss(model_spec(case.model).model_for(setting, case.dim))
    model = model.to(device=settings.device, dtype=case.dtype)
    inputs = torch.from_numpy(data.train_inputs).to(settings.device)
    targets = torch.from_numpy(data.train_targets).to(settings.device)
    return model, inputs, targets


def _info(benchmark, inputs: Tensor) -> None:
    benchmark.extra_info.update(items=inputs.numel(), item_unit="tokens")


@pytest.mark.parametrize("variant", BASE_VARIANTS)
def test_mad_eval(benchmark, settings, case, base, variant, repeat):
    model, inputs, _ = base
    bench_variant(benchmark, settings, case, variant, "mad_eval", kind="model",
                  build=lambda: inference_variant(model, variant),
                  step=lambda run: inference_step(run, inputs))
    _info(benchmark, inputs)


@pytest.mark.parametrize("variant", BASE_VARIANTS)
def test_mad_train_step(benchmark, settings, case, base, variant, repeat):
    model, inputs, targets = base
    bench_variant(benchmark, settings, case, variant, "mad_train_step", kind="model",
                  build=lambda: training_variant(model, variant),
                  step=lambda built: training_step(built[0], inputs, targets,
                                                   clear=(built[1],)))
    _info(benchmark, inputs)
