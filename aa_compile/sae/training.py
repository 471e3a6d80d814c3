"""Training loop of the concept SAEs: Adam, gradient clipping at 1.0, AuxK on dead latents.

``kind="vanilla"`` ignores the labels, ``"scar"`` conditions latent 0 on the first label column,
``"gsae"`` conditions latents ``0..C-1`` on all C label columns (one latent per concept). A
latent is dead once it has not fired for ``dead_after`` tokens.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from aa_compile.models.sae import SAEConfig, SparseAutoencoder, sae_loss
from aa_compile.progress import progress

from .store import ActivationStore, check_finite

KINDS = ("vanilla", "scar", "gsae")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings (the public code's defaults where they fit a tiny run)."""

    epochs: int = 5
    batch_size: int = 512
    lr: float = 1e-3
    positive_scale: float = 1.0
    aux_coef: float = 1.0
    dead_after: int = 20000
    sparsity_coef: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs <= 0 or self.batch_size <= 0 or self.lr <= 0 or self.dead_after <= 0:
            raise ValueError("TrainConfig: epochs, batch_size, lr and dead_after must be > 0")
        if self.positive_scale <= 0:
            raise ValueError(f"TrainConfig.positive_scale must be > 0, got {self.positive_scale}")


def sae_config_for(kind: str, n_inputs: int, n_latents: int, k: int, n_label_columns: int,
                   activation: str = "topk-sigmoid") -> SAEConfig:
    """The SAE shape for a training kind (how many latents it reserves for concepts)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    n_concepts = {"vanilla": 0, "scar": 1, "gsae": n_label_columns}[kind]
    return SAEConfig(n_inputs=n_inputs, n_latents=n_latents, k=k, activation=activation,
                     n_concepts=n_concepts)


def train_sae(data: ActivationStore | tuple[Tensor, Tensor], sae: SparseAutoencoder,
              kind: str = "gsae", cfg: TrainConfig = TrainConfig(), *,
              show_progress: bool = True) -> list[dict[str, float]]:
    """Train ``sae`` in place on ``(activations [N, d], labels [N, C])`` or a store; returns the
    per-step loss terms."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if isinstance(data, ActivationStore):
        acts, labels, _ = data.load()
    else:
        acts, labels = data
    if acts.dim() != 2 or acts.shape[1] != sae.config.n_inputs:
        raise ValueError(f"SAE width mismatch: the SAE reads {sae.config.n_inputs} features, the "
                         f"activations have shape {tuple(acts.shape)}")
    if labels.dim() != 2 or labels.shape[0] != acts.shape[0]:
        raise ValueError(f"labels must be [tokens={acts.shape[0]}, concepts], got "
                         f"{tuple(labels.shape)}")
    check_finite(acts, "SAE training activations")
    label_cols = {"vanilla": 0, "scar": 1, "gsae": labels.shape[1]}[kind]
    if label_cols > sae.config.n_concepts:
        raise ValueError(f"kind={kind!r} conditions {label_cols} latents but the SAE reserves "
                         f"n_concepts={sae.config.n_concepts}")
    acts = acts.float()
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr)
    since_fired = torch.zeros(sae.config.n_latents, dtype=torch.long)
    history: list[dict[str, float]] = []
    steps_per_epoch = -(-len(acts) // cfg.batch_size)
    bar = progress(total=cfg.epochs * steps_per_epoch, desc=f"train {kind} SAE", unit="step",
                   disable=not show_progress)
    sae.train()
    for _ in range(cfg.epochs):
        order = torch.randperm(len(acts), generator=gen)
        for i in range(0, len(acts), cfg.batch_size):
            idx = order[i:i + cfg.batch_size]
            x = acts[idx]
            y = labels[idx, :label_cols] if label_cols else None
            parts, out = sae_loss(sae, x, y, positive_scale=cfg.positive_scale,
                                  dead=since_fired >= cfg.dead_after, aux_coef=cfg.aux_coef,
                                  sparsity_coef=cfg.sparsity_coef)
            opt.zero_grad(set_to_none=True)
            parts.total.backward()
            torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
            opt.step()
            with torch.no_grad():
                fired = (out.latents != 0).any(0)
                since_fired = torch.where(fired, torch.zeros_like(since_fired),
                                          since_fired + len(idx))
            history.append({name: float(v.detach()) for name, v in parts._asdict().items()})
            bar.update(1)
            bar.set_postfix(loss=f"{history[-1]['total']:.3f}", refresh=False)
    bar.close()
    sae.eval()
    return history
