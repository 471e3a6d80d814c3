"""The papers' claims in miniature: G-SAE vs a vanilla SAE of the same size on the tiny base LM
and the local concepts (FMS, detection AUROC), and steering towards German (G-SAE residual
steering, SCAR-style latent scaling, a difference-of-means vector) vs α with its perplexity cost.

Three steps, each reading what the one before wrote to ``out``: `prepare` (base LM, activation
stores, both SAEs), `fms_table` and `steering_curve`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from aa_compile.models.sae import SparseAutoencoder
from aa_compile.models.transformer import TransformerConfig
from aa_compile.progress import progress

from .steering import attach
from .base_lm import BASE_CONFIG, load_base_lm, save_base_lm, train_base_lm
from .concepts import CONCEPTS, balanced_tokens, concept_batches, concept_windows, split_documents
from .fms import concept_fms, pooled_latents
from .store import ActivationStore, collect_activations
from .training import TrainConfig, sae_config_for, train_sae

if TYPE_CHECKING:  # scikit-learn loads in about a second: only when the classifier is fit
    from sklearn.linear_model import LogisticRegression


@dataclasses.dataclass(frozen=True)
class Settings:
    """Sizes of one run (the defaults take a few CPU minutes)."""

    lm_steps: int = 300
    lm_config: TransformerConfig = BASE_CONFIG
    site: str = "block.2"
    windows: int = 512
    test_windows: int = 128
    seq_len: int = 64
    latent_factor: int = 4
    k: int = 16
    epochs: int = 10
    positive_scale: float = 5.0
    fms_tokens: int = 1000
    seed: int = 0


def _save_settings(out: Path, s: Settings) -> None:
    d = dataclasses.asdict(s)
    (out / "settings.json").write_text(json.dumps(d, indent=1))


def load_settings(out: str | Path) -> Settings:
    d = json.loads((Path(out) / "settings.json").read_text())
    d["lm_config"] = TransformerConfig(**d["lm_config"])
    return Settings(**d)


def prepare(out: str | Path, s: Settings = Settings(), *, show_progress: bool = True) -> None:
    """Train (or reuse ``out/lm.safetensors``) the base LM, store activations of the train and
    test windows at the site, train a vanilla and a G-SAE of the same size."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _save_settings(out, s)
    lm_path = out / "lm.safetensors"
    if lm_path.exists():
        lm = load_base_lm(lm_path)
    else:
        lm, _ = train_base_lm(s.lm_config, steps=s.lm_steps, seed=s.seed,
                              show_progress=show_progress)
        save_base_lm(lm, lm_path)
    for split, n in (("train", s.windows), ("test", s.test_windows)):
        w = concept_windows(split, n_windows=n, seq_len=s.seq_len, seed=s.seed + (split == "test"))
        collect_activations(lm, concept_batches(w, 32), s.site, out / f"store_{split}",
                            concepts=w.concepts, total=-(-n // 32), show_progress=show_progress)
    store = ActivationStore(out / "store_train")
    for kind in ("vanilla", "gsae"):
        torch.manual_seed(s.seed)
        cfg = sae_config_for(kind, store.width, s.latent_factor * store.width, s.k,
                             len(store.concepts))
        sae = SparseAutoencoder(cfg)
        train_sae(store, sae, kind, TrainConfig(epochs=s.epochs, batch_size=256, lr=2e-3,
                                                positive_scale=s.positive_scale, seed=s.seed),
                  show_progress=show_progress)
        sae.save(out / f"sae_{kind}.safetensors")


def _auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Probability that a positive scores above a negative (ties count half)."""
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    for value in np.unique(scores):  # average ranks of ties
        tie = scores == value
        ranks[tie] = ranks[tie].mean()
    pos = labels > 0
    n_pos, n_neg = pos.sum(), (~pos).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _features(sae: SparseAutoencoder, store: ActivationStore, concept: int, s: Settings,
              seed: int):
    acts, labels, _ = store.load()
    with torch.no_grad():
        out = sae(acts)
    if CONCEPTS[concept] == "german":  # a document-level concept: per window, mean-pooled
        lat = pooled_latents(out.latents.reshape(-1, s.seq_len, out.latents.shape[-1]))
        y = labels[:, concept].reshape(-1, s.seq_len)[:, 0]
        return lat, y, out.pre_acts[:, concept], labels[:, concept], out.pre_acts
    idx = balanced_tokens(labels, concept, s.fms_tokens // 2, seed)
    return (out.latents[idx], labels[idx, concept], out.pre_acts[:, concept], labels[:, concept],
            out.pre_acts)


def fms_table(out: str | Path, *, show_progress: bool = True) -> list[dict]:
    """Per SAE and concept: FMS@1/@5 (in-sample, as the public code), held-out FMS@1,
    label-shuffled FMS@1 and the detection AUROC of the concept latent on test tokens (the
    G-SAE's conditioned latent; for the vanilla SAE the root latent of its tree)."""
    out = Path(out)
    s = load_settings(out)
    train, test = ActivationStore(out / "store_train"), ActivationStore(out / "store_test")
    rows = []
    jobs = [(kind, c) for kind in ("vanilla", "gsae") for c in range(len(CONCEPTS))]
    for kind, c in progress(jobs, desc="FMS", unit="concept", disable=not show_progress):
        sae = SparseAutoencoder.load(out / f"sae_{kind}.safetensors")
        X, y, _, _, _ = _features(sae, train, c, s, s.seed)
        Xt, yt, _, yt_tok, pre_t = _features(sae, test, c, s, s.seed + 1)
        r = concept_fms(X, y)
        held = concept_fms(X, y, held_out=(Xt, yt))
        shuffled = concept_fms(X, y, shuffle_labels=True)
        latent = c if kind == "gsae" else r.root_feature
        rows.append({
            "sae": kind, "concept": CONCEPTS[c], "latent": latent, "accs_0": r.accs_0,
            "fms@1": r.fms(1), "fms@5": r.fms(5), "held_out_fms@1": held.fms(1),
            "shuffled_fms@1": shuffled.fms(1),
            "auroc": _auroc(pre_t[:, latent].numpy(), yt_tok.numpy()),
        })
    (out / "fms.json").write_text(json.dumps(rows, indent=1))
    (out / "fms.md").write_text(markdown_table(rows))
    _plot_fms(rows, out / "fms.png")
    return rows


def markdown_table(rows: list[dict]) -> str:
    keys = ["sae", "concept", "latent", "fms@1", "fms@5", "held_out_fms@1", "shuffled_fms@1",
            "auroc"]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[k]:.3f}" if isinstance(r[k], float) else str(r[k])
                                       for k in keys) + " |")
    return "\n".join(lines) + "\n"


def _plot_fms(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    width = 0.2
    for i, (kind, p) in enumerate([(k, p) for k in ("vanilla", "gsae") for p in (1, 5)]):
        vals = [r[f"fms@{p}"] for r in rows if r["sae"] == kind]
        ax.bar(np.arange(len(CONCEPTS)) + (i - 1.5) * width, vals, width, label=f"{kind} FMS@{p}")
    ax.set_xticks(range(len(CONCEPTS)), CONCEPTS)
    ax.set_ylabel("FMS")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- steering ----------------------------------------------------------------------------------


def _byte_histograms(chunks: list[bytes]) -> np.ndarray:
    h = np.zeros((len(chunks), 256))
    for i, c in enumerate(chunks):
        np.add.at(h[i], np.frombuffer(c, dtype=np.uint8), 1.0)
    return h / np.maximum(h.sum(1, keepdims=True), 1)


def language_classifier(seq_len: int = 32, n: int = 400, seed: int = 0) -> LogisticRegression:
    from sklearn.linear_model import LogisticRegression

    """Logistic regression on byte histograms of train-split windows: German (1) vs English."""
    rng = np.random.default_rng(seed)
    chunks, labels = [], []
    for label, language in enumerate(("en", "de")):
        data = [d.encode() for d in split_documents(language, "train") if len(d) > seq_len]
        for _ in range(n):
            doc = data[rng.integers(len(data))]
            start = rng.integers(len(doc) - seq_len)
            chunks.append(doc[start:start + seq_len])
            labels.append(label)
    return LogisticRegression(max_iter=1000).fit(_byte_histograms(chunks), labels)


def _bits_per_byte(model: torch.nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(ids[:, :-1])
        logits = logits if isinstance(logits, torch.Tensor) else logits.logits
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    return float(nll) / math.log(2)


def steering_curve(out: str | Path, alphas: tuple[float, ...] = (-1.0, -0.5, 0.0, 0.5, 1.0),
                   scar_alphas: tuple[float, ...] = (-20.0, -5.0, 1.0, 5.0, 20.0),
                   n_prompts: int = 16, prompt_len: int = 16, new_tokens: int = 32,
                   *, show_progress: bool = True) -> list[dict]:
    """German share of greedy continuations of English test prompts, and bits/byte on held-out
    text, per method and α: G-SAE residual steering and SCAR-style latent scaling on the G-SAE's
    German latent, and the difference-of-means vector of the stored activations."""
    out = Path(out)
    s = load_settings(out)
    lm = load_base_lm(out / "lm.safetensors")
    sae = SparseAutoencoder.load(out / "sae_gsae.safetensors")
    german = CONCEPTS.index("german")
    acts, labels, _ = ActivationStore(out / "store_train").load()
    is_de = labels[:, german] > 0
    direction = acts[is_de].mean(0) - acts[~is_de].mean(0)
    clf = language_classifier(seed=s.seed)
    prompts = concept_windows("test", n_windows=2 * n_prompts, seq_len=prompt_len, seed=7)
    prompts = prompts.ids[:n_prompts]  # the English half
    held_out = concept_windows("test", n_windows=16, seq_len=s.seq_len, seed=11).ids
    methods = [("gsae", a) for a in alphas] + [("vector", a) for a in alphas] + \
        [("scar", a) for a in scar_alphas]
    rows = []
    for mode, alpha in progress(methods, desc="steering", unit="setting",
                                disable=not show_progress):
        steered = attach(lm, sae, site=s.site, mode=mode, concept=german, alpha=alpha,
                         direction=direction if mode == "vector" else None)
        gen = steered.generate(prompts, new_tokens)[:, prompt_len:]
        chunks = [bytes(row.tolist()) for row in gen]
        share = float(clf.predict(_byte_histograms(chunks)).mean())
        rows.append({"method": mode, "alpha": alpha, "german_share": share,
                     "bits_per_byte": _bits_per_byte(steered, held_out)})
        steered.detach_sae()
    rows.append({"method": "none", "alpha": 0.0,
                 "german_share": float(clf.predict(_byte_histograms(
                     [bytes(r.tolist()) for r in lm.generate(prompts, new_tokens)[:, prompt_len:]]
                 )).mean()), "bits_per_byte": _bits_per_byte(lm, held_out)})
    (out / "steering.json").write_text(json.dumps(rows, indent=1))
    _plot_steering(rows, out / "steering.png")
    return rows


def _plot_steering(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Residual methods (α in about [-1, 1]) and SCAR's latent scale (about [-20, 20]) get their
    # own x axes; each panel shows the unsteered model as a dashed line.
    panels = (("german_share", "German share of continuations"),
              ("bits_per_byte", "bits/byte on held-out text"))
    groups = ((("gsae", "G-SAE residual", "C0"), ("vector", "difference of means", "C1")),
              (("scar", "SCAR-style (latent × α)", "C2"),))
    xlabels = ("α (residual steering strength)", "α (scale of the concept latent)")
    none = next((r for r in rows if r["method"] == "none"), None)
    fig, axes = plt.subplots(2, 2, figsize=(9, 6), sharey="row")
    for col, (methods, xlabel) in enumerate(zip(groups, xlabels)):
        for row, (key, ylabel) in enumerate(panels):
            ax = axes[row, col]
            for method, label, color in methods:
                pts = sorted((r["alpha"], r[key]) for r in rows if r["method"] == method)
                if pts:
                    ax.plot(*zip(*pts), "o-", color=color, label=label)
            if none is not None:
                ax.axhline(none[key], color="grey", ls="--", lw=1, label="unsteered")
            ax.set_xlabel(xlabel)
            ax.grid(alpha=0.3)
            if col == 0:
                ax.set_ylabel(ylabel)
            if row == 0:
                ax.legend(fontsize=8)
    axes[0, 0].set_ylim(-0.05, 1.05)
    fig.suptitle("Steering towards German")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
