"""MAD results on disk and as pictures: JSON / CSV rows, the score table, per-task bars and a
model x task heat map (PNG)."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

from .metrics import mad_scores


def write_rows(rows: Sequence[dict], directory: str | Path) -> dict[str, Path]:
    """``results.json`` and ``results.csv`` (one row per run) under ``directory``."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "csv": out / "results.csv"}
    paths["json"].write_text(json.dumps(list(rows), indent=1))
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    with paths["csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return paths


def read_rows(path: str | Path) -> list[dict]:
    """The rows of a ``results.json`` (or of the directory holding one)."""
    p = Path(path)
    if p.is_dir():
        p = p / "results.json"
    if not p.exists():
        raise ValueError(f"no MAD results at {p}: run `aa-compile mad run` first")
    rows = json.loads(p.read_text())
    if not isinstance(rows, list):
        raise ValueError(f"{p} does not hold a list of MAD result rows")
    return rows


def score_table(scores: dict[str, dict[str, float]]) -> str:
    """Plain-text table: one row per model, one column per task, then the MAD score."""
    tasks = sorted({t for s in scores.values() for t in s if t != "mad"})
    header = ["model", *tasks, "mad"]
    lines = [" | ".join(header)]
    for model, s in sorted(scores.items()):
        cells = [model] + [f"{s[t]:.3f}" if t in s else "-" for t in tasks] + [f"{s['mad']:.3f}"]
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def write_scores(rows: Sequence[dict], directory: str | Path) -> dict[str, Path]:
    """``scores.json``, ``scores.csv``, ``tasks.png`` (bars) and ``heatmap.png``."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    scores = mad_scores(rows)
    paths = {"scores_json": out / "scores.json", "scores_csv": out / "scores.csv",
             "bars": out / "tasks.png", "heatmap": out / "heatmap.png"}
    paths["scores_json"].write_text(json.dumps(scores, indent=1))
    tasks = sorted({t for s in scores.values() for t in s if t != "mad"})
    with paths["scores_csv"].open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", *tasks, "mad"])
        for model, s in sorted(scores.items()):
            writer.writerow([model, *[s.get(t, "") for t in tasks], s["mad"]])
    plot_scores(scores, paths["bars"], paths["heatmap"])
    return paths


def plot_scores(scores: dict[str, dict[str, float]], bars_path: Path, heatmap_path: Path
                ) -> None:
    """Grouped bars (task score per model) and a model x task heat map."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    models = sorted(scores)
    tasks = sorted({t for s in scores.values() for t in s if t != "mad"}) + ["mad"]
    grid = np.array([[scores[m].get(t, np.nan) for t in tasks] for m in models])

    fig, ax = plt.subplots(figsize=(1.4 * len(tasks) + 2, 3.8))
    width = 0.8 / len(models)
    for i, model in enumerate(models):
        ax.bar(np.arange(len(tasks)) + i * width - 0.4 + width / 2, grid[i], width, label=model)
    ax.set_xticks(np.arange(len(tasks)), tasks, rotation=25, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("test accuracy (macro, best over lr x wd)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(bars_path, dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(1.2 * len(tasks) + 2, 0.5 * len(models) + 1.6))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(np.arange(len(tasks)), tasks, rotation=25, ha="right")
    ax.set_yticks(np.arange(len(models)), models)
    for i in range(len(models)):
        for j in range(len(tasks)):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center",
                        color="white" if grid[i, j] < 0.6 else "black", fontsize=8)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(heatmap_path, dpi=120)
    plt.close(fig)
