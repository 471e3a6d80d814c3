"""Losses of the SCAR / G-SAE autoencoders.

- ``normalized_mse``: per-token ``mean((x̂ - x)²) / mean(x²)``, averaged over tokens (in the
  SAE's normalised space).
- ``auxk_loss``: the AuxK term for dead latents (sae-lens' TopK form): the ``k_aux`` largest
  pre-activations among dead latents reconstruct the residual ``x - x̂``, scaled by
  ``min(dead / k_aux, 1)``; the squared error is averaged over features (sae-lens sums it,
  next to a summed MSE), so it is on the scale of the normalised MSE here.
- ``concept_loss``: binary cross-entropy of ``sigmoid(pre_acts[:, :C])`` against the C concept
  labels (C = 1 is SCAR, C > 1 is G-SAE), summed over concepts, averaged over tokens; the
  gradient of positive tokens is multiplied by ``positive_scale`` (the public code's tensor hook:
  the loss value is unchanged, only its gradient).
- ``sae_loss``: the total, plus L1 (relu) or L0 (jumprelu) sparsity terms.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .model import SAEOutput, SparseAutoencoder, jump_step


class LossParts(NamedTuple):
    """The total loss and its terms (each already weighted as it enters the total)."""

    total: Tensor
    mse: Tensor
    concept: Tensor
    auxk: Tensor
    sparsity: Tensor


def normalized_mse(recons: Tensor, target: Tensor) -> Tensor:
    """Per-token ``mean((recons - target)²) / mean(target²)``, averaged over tokens."""
    if recons.shape != target.shape:
        raise ValueError(f"normalized_mse: shapes differ {tuple(recons.shape)} vs "
                         f"{tuple(target.shape)}")
    err = (recons - target).pow(2).mean(-1)
    return (err / target.pow(2).mean(-1).clamp_min(1e-12)).mean()


def scale_positive_grad(pre: Tensor, labels: Tensor, positive_scale: float) -> Tensor:
    """``pre`` unchanged in value; its gradient multiplied by ``positive_scale`` where label > 0."""
    weight = torch.where(labels > 0, torch.full_like(pre, positive_scale), torch.ones_like(pre))
    return pre * weight + (pre * (1 - weight)).detach()


def concept_loss(pre_acts: Tensor, labels: Tensor, positive_scale: float = 1.0) -> Tensor:
    """BCE of the first ``C = labels.shape[-1]`` pre-activations against the concept labels.

    ``labels``: ``[tokens, C]`` in {0, 1} (negative values, e.g. SCAR's -1 for unlabelled wiki
    text, count as 0, as the public training code does)."""
    if labels.dim() != 2 or labels.shape[0] != pre_acts.shape[0]:
        raise ValueError(f"concept labels must be [tokens={pre_acts.shape[0]}, concepts], got "
                         f"shape {tuple(labels.shape)}")
    c = labels.shape[1]
    if c > pre_acts.shape[-1]:
        raise ValueError(f"{c} concept labels but the SAE has only {pre_acts.shape[-1]} latents")
    target = labels.clamp_min(0).to(pre_acts.dtype)
    logits = scale_positive_grad(pre_acts[:, :c], target, positive_scale)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return bce.sum(dim=1).mean()


def auxk_loss(sae: SparseAutoencoder, out: SAEOutput, dead: Tensor, k_aux: int | None = None
              ) -> Tensor:
    """AuxK: dead latents' TopK reconstruct the residual (see the module docstring)."""
    n_dead = int(dead.sum())
    if n_dead == 0:
        return out.pre_acts.new_zeros(())
    k_aux = k_aux if k_aux is not None else sae.config.n_inputs // 2
    k = min(k_aux, n_dead)
    scale = min(n_dead / k_aux, 1.0)
    residual = (out.input_n - out.recons_n).detach()
    masked = out.pre_acts.masked_fill(~dead, float("-inf"))
    values, indices = masked.topk(k, dim=-1)
    acts = torch.zeros_like(out.pre_acts).scatter(-1, indices, torch.relu(values))
    aux_recons = sae.decoder(acts)
    return scale * (aux_recons - residual).pow(2).mean()


def sae_loss(sae: SparseAutoencoder, x: Tensor, labels: Tensor | None = None, *,
             positive_scale: float = 1.0, dead: Tensor | None = None, aux_coef: float = 1.0,
             sparsity_coef: float = 0.0) -> tuple[LossParts, SAEOutput]:
    """Vanilla (``labels is None``), SCAR (one label column) or G-SAE (C columns) loss.

    ``x``: ``[tokens, n_inputs]``; ``dead``: bool ``[n_latents]`` for the AuxK term (TopK only);
    ``sparsity_coef``: weight of L1 (relu) or L0 (jumprelu) on the latents."""
    if x.dim() != 2:
        raise ValueError(f"sae_loss expects activations [tokens, features], got {tuple(x.shape)}")
    out = sae(x)
    zero = x.new_zeros(())
    mse = normalized_mse(out.recons_n, out.input_n)
    concept = zero
    if labels is not None:
        if labels.dim() == 1:
            labels = labels[:, None]
        if labels.shape[1] > sae.config.n_concepts:
            raise ValueError(f"{labels.shape[1]} concept label columns but the SAE reserves "
                             f"n_concepts={sae.config.n_concepts}")
        concept = concept_loss(out.pre_acts, labels, positive_scale)
    aux = zero
    if dead is not None and sae.config.activation.startswith("topk") and aux_coef:
        aux = aux_coef * auxk_loss(sae, out, dead)
    sparsity = zero
    if sparsity_coef:
        if sae.config.activation == "jumprelu":
            l0 = jump_step(out.pre_acts, sae.threshold, sae.config.jumprelu_bandwidth)
            sparsity = sparsity_coef * l0.sum(-1).mean()
        elif sae.config.activation == "relu":
            sparsity = sparsity_coef * out.latents.abs().sum(-1).mean()
    total = mse + concept + aux + sparsity
    return LossParts(total, mse, concept, aux, sparsity), out
