"""Steering and detection inside the model: the SAE becomes a module at the site, no hooks.

`attach(model, sae, site=..., mode=..., concept=..., alpha=...)` swaps the site's module for a
`SteeredSite` that runs the original module and then the SAE, so ``torch.compile`` traces it
like any other layer (no Python hook, no graph break) and the KV cache path is the model's own.
Modes, for the site activation ``x`` and the concept latent ``c`` with decoder column ``d_c``:

- ``"scar"``: ``x ← decode(latents with h_c ← α·|h_c|)`` (the reconstruction replaces x; α=1
  gives the plain reconstruction, the SAE error is dropped, as in SCAR);
- ``"gsae"``: ``x ← x + α·‖x‖/‖d_c‖·d_c`` at every position (G-SAE's residual steering);
- ``"delta"``: ``x ← x + decode(steered) − decode(original)`` (the SAE error cancels);
- ``"vector"``: ``x ← x + α·‖x‖/‖v‖·v`` for a given direction ``v`` (e.g. the difference of
  the concept's and the other tokens' mean activations: the baseline without an SAE).

Every mode also computes the detection scores: the pre-activation logits of the conditioned
latents (``[batch, seq, n_detect]``), which `SteeredModel.forward` returns with the logits.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from aa_compile.models.sae import SparseAutoencoder

from .sites import site_module, site_parent
from .store import site_output

MODES = ("scar", "gsae", "delta", "vector")


class SteeredOutput(NamedTuple):
    logits: Tensor
    concept_scores: Tensor   # [batch, seq, n_detect] pre-activation logits of the concept latents


class SteeredSite(nn.Module):
    """The site's original module followed by SAE steering and detection."""

    def __init__(self, inner: nn.Module, sae: SparseAutoencoder, mode: str, latent: int,
                 alpha: float, detect: tuple[int, ...], direction: Tensor | None = None) -> None:
        super().__init__()
        self.inner = inner
        self.sae = sae
        self.mode = mode
        self.latent = latent
        self.register_buffer("alpha", torch.tensor(float(alpha)), persistent=False)
        self.register_buffer("detect", torch.tensor(detect, dtype=torch.long), persistent=False)
        if direction is None:
            direction = sae.decoder.weight[:, latent].detach()
        self.register_buffer("direction", direction.detach().clone(), persistent=False)
        self.scores: Tensor | None = None

    def set_alpha(self, alpha: float) -> None:
        """Change α in place (a buffer, so a compiled graph does not recompile)."""
        self.alpha.fill_(float(alpha))

    def steer(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(steered x, detection scores)`` for site activations ``x [..., d]``."""
        sae = self.sae
        x_n, mean, std = sae.normalize(x)
        centred = x_n - sae.pre_bias
        if self.mode in ("gsae", "vector"):
            rows = sae.encoder.weight[self.detect]
            scores = centred @ rows.t() + sae.latent_bias[self.detect]
            d_c = sae.decoder.weight[:, self.latent] if self.mode == "gsae" else self.direction
            scale = self.alpha * x.norm(dim=-1, keepdim=True) / d_c.norm()
            return x + scale * d_c.to(x.dtype), scores
        pre = sae.encoder(centred) + sae.latent_bias
        scores = pre[..., self.detect]
        latents = sae.activate(pre)
        h_c = latents[..., self.latent:self.latent + 1]
        change = self.alpha * h_c.abs() - h_c
        d_c = sae.decoder.weight[:, self.latent]
        if self.mode == "delta":
            return x + sae.denormalize(change * d_c, torch.zeros_like(mean), std), scores
        recons_n = sae.decode_n(latents) + change * d_c
        return sae.denormalize(recons_n, mean, std), scores

    def forward(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        x = site_output(out)
        steered, self.scores = self.steer(x)
        if isinstance(out, Tensor):
            return steered
        return (steered, *out[1:]) if isinstance(out, tuple) else [steered, *out[1:]]


class SteeredModel(nn.Module):
    """The model with a `SteeredSite`; ``forward`` returns logits and concept scores."""

    def __init__(self, model: nn.Module, site: str, steered: SteeredSite) -> None:
        super().__init__()
        self.model = model
        self.site = site
        self.steered = steered

    def forward(self, *args, **kwargs) -> SteeredOutput:
        out = self.model(*args, **kwargs)
        logits = out if isinstance(out, Tensor) else out.logits
        return SteeredOutput(logits, self.steered.scores)

    def set_alpha(self, alpha: float) -> None:
        self.steered.set_alpha(alpha)

    def generate(self, *args, **kwargs):
        """The model's own ``generate`` (the steering runs at every step, cached or not)."""
        return self.model.generate(*args, **kwargs)

    def detach_sae(self) -> nn.Module:
        """Put the original site module back; returns the unsteered model."""
        parent, name = site_parent(self.model, self.site)
        if isinstance(parent, nn.ModuleList):
            parent[int(name)] = self.steered.inner
        else:
            setattr(parent, name, self.steered.inner)
        return self.model


def attach(model: nn.Module, sae: SparseAutoencoder, *, site: str, mode: str = "gsae",
           concept: int = 0, latent: int | None = None, alpha: float = 0.0,
           detect: tuple[int, ...] | None = None, direction: Tensor | None = None
           ) -> SteeredModel:
    """Put ``sae`` at ``site`` of ``model`` (in place) and return the `SteeredModel`.

    ``concept``: index of a conditioned latent (``< sae.config.n_concepts``); ``latent``: steer
    an arbitrary latent instead (e.g. a vanilla SAE's best tree latent). ``detect``: the latents
    whose scores are returned (default: every conditioned one, else the steered one).
    ``direction``: the vector of ``mode="vector"`` (``[n_inputs]``)."""
    if not isinstance(sae, SparseAutoencoder):
        raise TypeError(f"attach expects a SparseAutoencoder, got {type(sae).__name__}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    module = site_module(model, site)
    if isinstance(module, SteeredSite):
        raise ValueError(f"site {site!r} already has an SAE attached")
    n = sae.config.n_latents
    if latent is None:
        if not isinstance(concept, int) or not 0 <= concept < sae.config.n_concepts:
            raise ValueError(f"concept index {concept!r} is beyond the SAE's reserved latents "
                             f"(n_concepts={sae.config.n_concepts}); pass latent= to steer an "
                             "unconditioned latent")
        latent = concept
    elif not isinstance(latent, int) or not 0 <= latent < n:
        raise ValueError(f"latent {latent!r} out of range [0, {n})")
    if detect is None:
        detect = tuple(range(sae.config.n_concepts)) or (latent,)
    if not detect or any(not 0 <= d < n for d in detect):
        raise ValueError(f"detect latents must be a non-empty tuple in [0, {n}), got {detect!r}")
    if (mode == "vector") != (direction is not None):
        raise ValueError("mode='vector' needs direction= (and only it takes one)")
    if direction is not None and tuple(direction.shape) != (sae.config.n_inputs,):
        raise ValueError(f"direction must be [{sae.config.n_inputs}], got "
                         f"{tuple(direction.shape)}")
    width = _site_width(model)
    if width is not None and width != sae.config.n_inputs:
        raise ValueError(f"SAE width mismatch: the SAE reads {sae.config.n_inputs} features, "
                         f"site {site!r} has {width}")
    steered = SteeredSite(module, sae, mode, latent, alpha, tuple(detect), direction)
    parent, name = site_parent(model, site)
    if isinstance(parent, nn.ModuleList):
        parent[int(name)] = steered
    else:
        setattr(parent, name, steered)
    return SteeredModel(model, site, steered)


def _site_width(model: nn.Module) -> int | None:
    """The hidden size the site carries, from the model config when it names one."""
    cfg = getattr(model, "config", None)
    for key in ("d_model", "hidden_size", "n_embd"):
        if cfg is not None and isinstance(getattr(cfg, key, None), int):
            return getattr(cfg, key)
    return None
