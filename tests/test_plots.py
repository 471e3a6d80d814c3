"""Every PNG the library and the benchmarks write: the file is a real PNG, it carries the
expected title, and no text (titles, axis and tick labels, legends) sticks out of the picture.

Each plot function runs on small made-up inputs; `saved_figures` keeps every figure handed to
``savefig`` so its texts can be measured after drawing.
"""

from __future__ import annotations

import types

import matplotlib

matplotlib.use("Agg")
import matplotlib.figure  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from aa_compile.atman.explanation import Explanation  # noqa: E402
from aa_compile.dtm.sweep import heatmap  # noqa: E402
from aa_compile.plotting import plot_loss_curve  # noqa: E402


@pytest.fixture
def saved_figures(monkeypatch):
    """``[(figure, savefig keyword arguments)]`` of every figure saved during the test."""
    saved = []
    original = matplotlib.figure.Figure.savefig

    def savefig(self, *args, **kwargs):
        saved.append((self, kwargs))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    return saved


def titles(fig) -> list[str]:
    found = [ax.get_title() for ax in fig.axes if ax.get_title()]
    if fig._suptitle is not None:
        found.append(fig._suptitle.get_text())
    return found


def texts_outside(fig, kwargs) -> list[str]:
    """What is drawn (partly) outside the saved area, the figure or, with
    ``bbox_inches="tight"``, the area matplotlib grows to fit every artist: the figure's texts
    by their text, each axes (title, axis and tick labels, legend) by its title."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(fig).get_renderer()  # pyplot.close left the figure no canvas
    fig.draw(renderer)
    area = fig.get_tightbbox(renderer).transformed(fig.dpi_scale_trans) \
        if kwargs.get("bbox_inches") == "tight" else fig.bbox
    parts = [(t.get_text(), t.get_window_extent(renderer)) for t in fig.texts if t.get_text()]
    parts += [(ax.get_title() or "axes", ax.get_tightbbox(renderer)) for ax in fig.axes]
    eps = 0.01  # pixels: rounding, not clipping
    return [name for name, box in parts
            if box.x0 < area.x0 - eps or box.y0 < area.y0 - eps or box.x1 > area.x1 + eps
            or box.y1 > area.y1 + eps]


def check_png(path, saved, title_words: list[str]) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG" and min(image.size) > 100, image.size
    assert saved, "nothing was saved through matplotlib"
    fig, kwargs = saved[-1]
    text = " ".join(titles(fig))
    for word in title_words:
        assert word in text, (word, text)
    assert texts_outside(fig, kwargs) == []


def explanation(n_items: int, mode: str) -> Explanation:
    torch.manual_seed(0)
    return Explanation(
        scores=torch.randn(1, n_items), items=[(i,) for i in range(n_items)],
        item_labels=[f" word{i}" for i in range(n_items)], target_ids=[7],
        target_labels=[" Paris"], baseline_ce=torch.zeros(1), mode=mode, factor=0.9,
        conceptual_threshold=0.7 if mode == "conceptual" else None, stats={},
    )


@pytest.mark.parametrize("n_items", [2, 40])
def test_atman_plot_title_fits(tmp_path, saved_figures, n_items):
    path = explanation(n_items, "conceptual").plot(str(tmp_path / "atman.png"))
    check_png(path, saved_figures, ["AtMan relevance", "conceptual", "factor 0.9"])


def sweep_result(levels: list[str], n_layers: int) -> dict:
    types_ = ["attn.q_proj", "attn.o_proj", "mlp.up_proj"]
    comps = {f"layers.{layer}.{t}": {"layer": layer, "type": t}
             for layer in range(n_layers) for t in types_}
    return {
        "components": comps, "levels": levels, "n_tokens": 8,
        "results": {name: {lv: {"fdt_median": float(i % 9)} for lv in levels}
                    for i, name in enumerate(comps)},
    }


@pytest.mark.parametrize("levels", [["prune_0.5"], ["prune_0.25", "prune_0.5", "prune_0.75"]])
def test_dtm_sweep_heatmap(tmp_path, saved_figures, levels):
    path = tmp_path / "sweep.png"
    heatmap(sweep_result(levels, 2), path)
    check_png(path, saved_figures, ["FDT per component"] + levels)


def test_loss_curve(tmp_path, saved_figures):
    path = tmp_path / "loss.png"
    plot_loss_curve([3.0, 2.5, 2.2, 2.1], str(path), "T-FREE LM training loss", "loss")
    check_png(path, saved_figures, ["T-FREE LM training loss"])


def test_dtm_plan_plot(tmp_path, saved_figures):
    from bench.dtm_plan import plot

    summary = {"fdt_median": 4.0, "fdt_mean": 4.5}
    rows = [{"share_uniform": s, "share_plan": s, "uniform": summary, "plan": summary,
             "uniform_eval": summary, "plan_eval": summary} for s in (0.25, 0.5)]
    path = tmp_path / "plan.png"
    plot({"rows": rows, "method": "refine", "n_tokens": 8, "eval_prompts": 4}, path)
    check_png(path, saved_figures, ["FDT at equal parameter reduction", "4 held-out prompts"])


def test_umup_fp8_parity_plot(tmp_path, saved_figures):
    from bench.umup_fp8_parity import plot

    fp32 = types.SimpleNamespace(losses=[5.0, 4.0, 3.5])
    fp8 = types.SimpleNamespace(losses=[5.0, 4.1, 3.6])
    path = tmp_path / "parity.png"
    plot(fp32, fp8, str(path), "fp8 static")
    check_png(path, saved_figures, ["FP32 vs aa::fp8_linear"])


def test_bench_report_chart(tmp_path, saved_figures):
    from bench.report import Row, render_png

    rows = [Row(workload="rms_norm_fwd", variant=v, shape="64x32", dtype="float32",
                device="cpu", median_s=t, p20_s=None, p80_s=None, rounds=3,
                ratio_vs_eager=1e-3 / t) for v, t in (("eager", 1e-3), ("aa", 5e-4))]
    path = tmp_path / "bench.png"
    render_png(rows, path, title="speed-up vs eager @ test")
    check_png(path, saved_figures, ["speed-up vs eager @ test"])


def test_texts_outside_catches_a_clipped_title(saved_figures, tmp_path):
    """The check itself: a title wider than its figure is reported."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 2))
    ax.set_title("a title far too long for a figure two inches wide, clipped")
    fig.savefig(tmp_path / "clipped.png")
    assert texts_outside(fig, {}) == ["a title far too long for a figure two inches wide, clipped"]
    plt.close(fig)
