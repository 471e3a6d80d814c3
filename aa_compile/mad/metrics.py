"""MAD's accuracy (macro-averaged over classes, as torchmetrics' ``MulticlassAccuracy`` default)
and the MAD score.

``mad-lab`` scores with ``MulticlassAccuracy(num_classes=vocab, ignore_index=-100)``, whose
default ``average="macro"`` takes each class's recall ``tp / (tp + fn)`` and averages it over the
classes that occur as a target or a prediction (a class predicted but never a target counts 0).
Counts accumulate over a whole epoch (`ClassCounts`), then one value is computed.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from .tasks import IGNORE


class ClassCounts:
    """Running per-class true-positive, false-positive and false-negative counts."""

    def __init__(self, num_classes: int) -> None:
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        self.num_classes = num_classes
        self.tp = torch.zeros(num_classes, dtype=torch.int64)
        self.fp = torch.zeros(num_classes, dtype=torch.int64)
        self.fn = torch.zeros(num_classes, dtype=torch.int64)

    def update(self, preds: Tensor, targets: Tensor) -> None:
        """Add predicted class ids (or logits ``[..., C]``, arg-maxed) against ``targets``."""
        if preds.is_floating_point():
            if preds.shape[:-1] != targets.shape or preds.shape[-1] != self.num_classes:
                raise ValueError(f"logits {tuple(preds.shape)} do not match targets "
                                 f"{tuple(targets.shape)} and {self.num_classes} classes")
            preds = preds.argmax(-1)
        if preds.shape != targets.shape:
            raise ValueError(f"preds {tuple(preds.shape)} and targets {tuple(targets.shape)} "
                             "must have the same shape")
        keep = targets != IGNORE
        p, t = preds[keep].long().cpu(), targets[keep].long().cpu()
        if t.numel() and (t.min() < 0 or t.max() >= self.num_classes):
            raise ValueError(f"targets must lie in [0, {self.num_classes}) or be {IGNORE}")
        if p.numel() and (p.min() < 0 or p.max() >= self.num_classes):
            raise ValueError(f"predictions must lie in [0, {self.num_classes})")
        hit = p == t
        c = self.num_classes
        self.tp += torch.bincount(t[hit], minlength=c)
        self.fn += torch.bincount(t[~hit], minlength=c)
        self.fp += torch.bincount(p[~hit], minlength=c)

    def macro_accuracy(self) -> float:
        """Mean recall over the classes seen as a target or a prediction (0.0 if none)."""
        present = (self.tp + self.fp + self.fn) > 0
        if not present.any():
            return 0.0
        support = (self.tp + self.fn).double()
        recall = torch.where(support > 0, self.tp.double() / support.clamp(min=1), 0.0)
        return float(recall[present].mean())

    def micro_accuracy(self) -> float:
        """Share of counted positions predicted right (plain token accuracy)."""
        total = int(self.tp.sum() + self.fn.sum())
        return float(self.tp.sum()) / total if total else 0.0


def macro_accuracy(preds: Tensor, targets: Tensor, num_classes: int) -> float:
    """One-shot `ClassCounts` over ``preds`` (ids or logits) and ``targets``."""
    counts = ClassCounts(num_classes)
    counts.update(preds, targets)
    return counts.macro_accuracy()


def mad_scores(results: Iterable[dict]) -> dict[str, dict[str, float]]:
    """Per model: each task's score (the mean over its settings of the best ``test_acc`` over the
    lr x wd grid) and ``"mad"``, the mean of the task scores.

    Each result needs ``model``, ``task``, ``setting`` and ``test_acc``.
    """
    best: dict[tuple[str, str, str], float] = {}
    for r in results:
        missing = {"model", "task", "setting", "test_acc"} - set(r)
        if missing:
            raise ValueError(f"result lacks {sorted(missing)}: {r}")
        key = (r["model"], r["task"], r["setting"])
        best[key] = max(best.get(key, float("-inf")), float(r["test_acc"]))
    per_task: dict[str, dict[str, list[float]]] = {}
    for (model, task, _), acc in best.items():
        per_task.setdefault(model, {}).setdefault(task, []).append(acc)
    scores: dict[str, dict[str, float]] = {}
    for model, tasks in per_task.items():
        scores[model] = {task: sum(v) / len(v) for task, v in sorted(tasks.items())}
        scores[model]["mad"] = sum(scores[model].values()) / len(tasks)
    return scores
