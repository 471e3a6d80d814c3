"""Capability guard: does a rewrite (compiling with the ``aa`` backend, pruning, an FDTM plan)
keep a model's MAD accuracy?

`guard` trains a fresh model on a setting (or takes a trained one), applies ``rewrite`` and
measures the test set before and after: MAD's macro accuracy, token accuracy, loss and the
largest logit change. Rewrites are callables ``(model, data) -> model``; `rewrite_from_spec`
builds the common ones from a short spec (``"aa"``, ``"aa:inductor"``, ``"prune:0.5"`` for
uniform magnitude pruning of every component, ``"fdtm:0.5"`` for an FDTM budget plan saving
the same share of weight bytes, `aa_compile.dtm.budget_plan`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from aa_compile import dtm
from aa_compile.report import last_report

from .data import TaskData
from .settings import Setting
from .train import cached_data, evaluate, train_model

Rewrite = Callable[[nn.Module, TaskData], nn.Module]


def aa_backend(inner_compiler: str = "eager") -> Rewrite:
    """``torch.compile(model, backend="aa")`` with that inner compiler (static shapes)."""
    def rewrite(model: nn.Module, data: TaskData) -> nn.Module:
        return torch.compile(model, backend="aa", dynamic=False,
                             options={"inner_compiler": inner_compiler})
    return rewrite


def uniform_share(model: nn.Module, sparsity: float) -> float:
    """Share of the component weight bytes that pruning every component at ``sparsity`` saves."""
    comps = dtm.find_components(model)
    level = dtm.parse(f"prune:{sparsity}")
    elt = next(model.parameters()).element_size()
    total = sum(c.numel for c in comps.values()) * elt
    return sum(level.bytes_saved(c, elt) for c in comps.values()) / total


def uniform_prune(sparsity: float) -> Rewrite:
    """Magnitude-prune every component (linear layer inside a block) at ``sparsity``."""
    def rewrite(model: nn.Module, data: TaskData) -> nn.Module:
        return dtm.apply(model, {c: f"prune:{sparsity}" for c in dtm.find_components(model)})
    return rewrite


def fdtm_prune(sparsity: float, n_prompts: int = 64, n_tokens: int = 8) -> Rewrite:
    """An FDTM budget plan (`aa_compile.dtm.budget_plan`) saving as many weight bytes as
    uniform pruning at ``sparsity``; its prompts are the first ``n_prompts`` test inputs cut
    ``n_tokens`` before their end, so the divergence is measured on the task's own tokens."""
    def rewrite(model: nn.Module, data: TaskData) -> nn.Module:
        length = data.test_inputs.shape[1] - n_tokens
        if length < 1:
            raise ValueError(f"n_tokens={n_tokens} leaves no prompt of the "
                             f"{data.test_inputs.shape[1]}-token test inputs")
        prompts = torch.from_numpy(data.test_inputs[:n_prompts, :length])
        share = uniform_share(model, sparsity)
        planned = dtm.budget_plan(model.eval(), prompts, n_tokens, share)
        return dtm.apply(model, planned["plan"])
    return rewrite


def rewrite_from_spec(spec: str) -> Rewrite:
    """``"aa"`` / ``"aa:<inner compiler>"`` / ``"prune:S"`` / ``"fdtm:S"`` -> a rewrite."""
    kind, _, arg = spec.partition(":")
    if kind == "aa":
        return aa_backend(arg or "eager")
    if kind in ("prune", "fdtm"):
        try:
            sparsity = float(arg)
        except ValueError:
            raise ValueError(f"rewrite {spec!r} needs a sparsity, e.g. '{kind}:0.5'") from None
        if not 0 < sparsity < 1:
            raise ValueError(f"sparsity must be in (0, 1), got {sparsity} in {spec!r}")
        return uniform_prune(sparsity) if kind == "prune" else fdtm_prune(sparsity)
    raise ValueError(f"unknown rewrite {spec!r}: use 'aa', 'aa:<inner compiler>', 'prune:S' "
                     "or 'fdtm:S'")


@torch.no_grad()
def logits_change(a: nn.Module, b: nn.Module, inputs: torch.Tensor) -> float:
    """Largest absolute difference of the two models' logits on ``inputs``."""
    a.eval()
    b.eval()
    return float((a(inputs).float() - b(inputs).float()).abs().max())


def guard(model_fn: Callable[[Setting], nn.Module], rewrite: Rewrite | str, setting: Setting,
          *, trained: nn.Module | None = None, epochs: int = 8, lr: float = 1e-3,
          weight_decay: float = 0.0, batch_size: int = 128) -> dict:
    """Train ``model_fn(setting)`` (unless ``trained`` is given), rewrite it, and report the
    MAD test metrics before and after with their change (``after - before``)."""
    if not isinstance(setting, Setting):
        raise TypeError(f"guard expects a Setting, got {type(setting).__name__}")
    fn = rewrite_from_spec(rewrite) if isinstance(rewrite, str) else rewrite
    if not callable(fn):
        raise TypeError(f"rewrite must be a callable (model, data) -> model or a spec string, "
                        f"got {type(rewrite).__name__}")
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
    extra = {}
    if isinstance(rewrite, str) and rewrite.partition(":")[0] == "aa":
        extra["aa_rewrites"] = {k: v for k, v in last_report().rewrites.items() if v}
    return {**extra, "setting": setting.name, "rewrite": rewrite if isinstance(rewrite, str) else
            getattr(rewrite, "__name__", "custom"),
            "before": before, "after": after, "delta_acc": after["acc"] - before["acc"],
            "max_logit_change": logits_change(model, rewritten, x[:256])}
