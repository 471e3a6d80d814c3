"""Capability guard: does a rewrite (compiling with the ``aa`` backend, FP8 linears, pruning, an
FDTM plan, int8 weights) keep a model's MAD accuracy?

`guard` trains a fresh model on a setting (or takes a trained one), applies ``rewrite`` (a
callable ``(model, data) -> model`` or a spec, `aa_compile.mad.rewrites.rewrite_from_spec`) and
measures the test set before and after: MAD's macro accuracy, token accuracy, loss and the
largest logit change. It also says what the rewrite did: the passes that fired for a compiled
rewrite, the plan's levels for a weight plan.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from aa_compile.report import last_report

from .rewrites import CompileRewrite, PlanRewrite, Rewrite, rewrite_from_spec
from .settings import Setting
from .train import cached_data, evaluate, train_model


@torch.no_grad()
def logits_change(a: nn.Module, b: nn.Module, inputs: torch.Tensor) -> float:
    """Largest absolute difference of the two models' logits on ``inputs``."""
    a.eval()
    b.eval()
    return float((a(inputs).float() - b(inputs).float()).abs().max())


def level_counts(plan: dict[str, str]) -> dict[str, int]:
    """How many components a plan puts at each level (``{"int8": 7, "none": 3}``)."""
    counts: dict[str, int] = {}
    for level in plan.values():
        counts[level] = counts.get(level, 0) + 1
    return dict(sorted(counts.items()))


def guard(model_fn: Callable[[Setting], nn.Module] | None, rewrite: Rewrite | str,
          setting: Setting, *, trained: nn.Module | None = None, epochs: int = 8,
          lr: float = 1e-3, weight_decay: float = 0.0, batch_size: int = 128) -> dict:
    """Train ``model_fn(setting)`` (unless ``trained`` is given), rewrite it, and report the
    MAD test metrics before and after with their change (``after - before``).

    The result also holds ``aa_rewrites`` (pass -> rewrites) for a `CompileRewrite` (the
    ``aa`` / ``fp8`` specs) and ``plan_levels`` (level -> components) for a `PlanRewrite`
    (``prune`` / ``fdtm`` / ``int8``)."""
    if not isinstance(setting, Setting):
        raise TypeError(f"guard expects a Setting, got {type(setting).__name__}")
    fn = rewrite_from_spec(rewrite) if isinstance(rewrite, str) else rewrite
    if not callable(fn):
        raise TypeError(f"rewrite must be a callable (model, data) -> model or a spec string, "
                        f"got {type(rewrite).__name__}")
    if trained is None and not callable(model_fn):
        raise TypeError("guard needs a model_fn(setting) -> nn.Module or a trained= model")
    data = cached_data(setting)
    model = trained
    if model is None:
        torch.manual_seed(setting.seed)
        model = model_fn(setting)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model_fn must return an nn.Module, got {type(model).__name__}")
        train_model(model, data, lr=lr, weight_decay=weight_decay, epochs=epochs,
                    batch_size=batch_size)
    model.eval()
    x, y = torch.from_numpy(data.test_inputs), torch.from_numpy(data.test_targets)
    before = evaluate(model, x, y, setting.vocab_size)
    rewritten = fn(model, data)
    after = evaluate(rewritten, x, y, setting.vocab_size)
    extra: dict = {}
    if isinstance(fn, CompileRewrite):
        extra["aa_rewrites"] = {k: v for k, v in last_report().rewrites.items() if v}
    if isinstance(fn, PlanRewrite) and fn.plan is not None:
        extra["plan_levels"] = level_counts(fn.plan)
    name = rewrite if isinstance(rewrite, str) else getattr(rewrite, "name", None) or getattr(
        rewrite, "__name__", "custom")
    return {**extra, "setting": setting.name, "rewrite": name,
            "before": before, "after": after, "delta_acc": after["acc"] - before["acc"],
            "max_logit_change": logits_change(model, rewritten, x[:256])}
