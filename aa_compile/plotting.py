"""One loss-curve PNG writer for the training CLIs (matplotlib, headless)."""

from __future__ import annotations


def plot_loss_curve(losses: list[float], path: str, title: str, ylabel: str) -> None:
    """Write ``losses`` per step as a line plot to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(losses) + 1), losses, lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
