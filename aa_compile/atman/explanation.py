"""The result of :func:`aa_compile.atman.explain`."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor


@dataclasses.dataclass
class Explanation:
    """AtMan scores: ``scores[t, i] = CE_t(unperturbed) - CE_t(item i suppressed)``.

    ``CE_t`` is the teacher-forced cross-entropy of target token ``t``. The sign follows the
    original code (``logit_parsing.get_delta_cross_entropies``): an item whose suppression makes
    the target *less* likely (a relevant item) gets a **negative** score. ``relevance()`` gives
    the flipped, more intuitive ``-scores`` (positive = relevant). Items that cannot influence
    a target (target tokens at or after it) score exactly 0.
    """

    scores: Tensor  # [T, n_items] float32
    items: list[tuple[int, ...]]  # token positions of each explained item
    item_labels: list[str]
    target_ids: list[int]
    target_labels: list[str]
    baseline_ce: Tensor  # [T]
    mode: str
    factor: float
    conceptual_threshold: float | None
    stats: dict[str, Any]

    def relevance(self) -> Tensor:
        """``-scores``: positive where suppressing the item hurts the target."""
        return -self.scores

    def to_dict(self) -> dict[str, Any]:
        return {
            "scores": self.scores.tolist(),
            "items": [list(i) for i in self.items],
            "item_labels": self.item_labels,
            "target_ids": self.target_ids,
            "target_labels": self.target_labels,
            "baseline_ce": self.baseline_ce.tolist(),
            "mode": self.mode,
            "factor": self.factor,
            "conceptual_threshold": self.conceptual_threshold,
            "sign": "CE(unperturbed) - CE(perturbed): relevant items are negative",
            "stats": self.stats,
        }

    def __str__(self) -> str:
        total = self.relevance().sum(0)
        scale = float(total.abs().max()) or 1.0
        lines = [
            (f"AtMan explanation ({self.mode}, factor={self.factor}, "
            f"conceptual_threshold={self.conceptual_threshold}); relevance = -ΔCE summed over "
            f"{len(self.target_ids)} target token(s): {' '.join(self.target_labels)!r}"),
        ]
        for label, r in zip(self.item_labels, total.tolist()):
            bar = "#" * round(20 * max(r, 0.0) / scale)
            lines.append(f"  {label!r:>16} {r:+.5f} {bar}")
        lines.append(
            f"forwards: {self.stats['forwards']} ({self.stats['batches']} batched), "
            f"token-positions computed {self.stats['positions_computed']} vs "
            f"{self.stats['positions_naive']} without prefix sharing"
        )
        return "\n".join(lines)

    def plot(self, path: str) -> str:
        """A heat-map PNG of ``relevance()`` (targets × items); returns ``path``."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rel = self.relevance().numpy()
        w = max(5.0, 0.35 * rel.shape[1] + 2)
        h = max(2.0, 0.35 * rel.shape[0] + 1.5)
        fig, ax = plt.subplots(figsize=(min(w, 40), min(h, 30)))
        lim = float(abs(rel).max()) or 1.0
        im = ax.imshow(rel, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
        ax.set_xticks(range(rel.shape[1]), self.item_labels, rotation=90, fontsize=7)
        ax.set_yticks(range(rel.shape[0]), self.target_labels, fontsize=7)
        ax.set_xlabel("explained item")
        ax.set_ylabel("target token")
        ax.set_title(f"AtMan relevance (-ΔCE)\n{self.mode} mode, factor {self.factor}",
                     fontsize=10)
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        # "tight" grows the saved area to whatever sticks out (a long title, long labels)
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        return path


def _as_float(t: Tensor) -> Tensor:
    return t.detach().to("cpu", torch.float32)
