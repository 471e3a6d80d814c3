"""The SCAR / G-SAE sparse autoencoder: per-token normalised input, ``pre_bias``, ``latent_bias``.

``latents = act(encoder(x̃ - pre_bias) + latent_bias)`` and ``x̂ = decoder(latents) + pre_bias``,
where ``x̃ = (x - mean) / (std + 1e-5)`` per token (layer norm without affine, unbiased std) and
the reconstruction is de-normalised with the same statistics. The first ``n_concepts`` latents
are the conditioned ones (latent 0 is SCAR's concept latent). Activations: ``topk`` (TopK, then
ReLU on the kept values), ``topk-sigmoid`` (TopK, sigmoid on the kept values), ``jumprelu``
(learned log-threshold, rectangle straight-through estimator) and ``relu``. Weights load only
from safetensors.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from aa_compile.models.checkpoint import load_with_config, save_with_config

ACTIVATIONS = ("topk", "topk-sigmoid", "jumprelu", "relu")
NORM_EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class SAEConfig:
    """Shape and activation of the autoencoder. ``k`` matters for the TopK activations only."""

    n_inputs: int
    n_latents: int
    k: int = 32
    activation: str = "topk"
    n_concepts: int = 0
    normalize: bool = True
    jumprelu_bandwidth: float = 1e-3
    jumprelu_init_threshold: float = 1e-3

    def __post_init__(self) -> None:
        for name in ("n_inputs", "n_latents", "k"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"SAEConfig.{name} must be a positive int, got {value!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"SAEConfig.activation must be one of {ACTIVATIONS}, "
                             f"got {self.activation!r}")
        if self.activation.startswith("topk") and self.k > self.n_latents:
            raise ValueError(f"SAEConfig: k={self.k} exceeds n_latents={self.n_latents}")
        if not isinstance(self.n_concepts, int) or not 0 <= self.n_concepts <= self.n_latents:
            raise ValueError(f"SAEConfig.n_concepts must be an int in [0, n_latents="
                             f"{self.n_latents}], got {self.n_concepts!r}")
        if self.jumprelu_bandwidth <= 0 or self.jumprelu_init_threshold <= 0:
            raise ValueError("SAEConfig: jumprelu_bandwidth and jumprelu_init_threshold must "
                             "be > 0")


class SAEOutput(NamedTuple):
    """What one forward pass computes (``*_n``: in the normalised space the SAE works in)."""

    pre_acts: Tensor        # [..., n_latents] encoder output before the activation
    latents: Tensor         # [..., n_latents] dense activations (zeros off the TopK set)
    recons: Tensor          # [..., n_inputs] reconstruction in the input's scale
    input_n: Tensor         # [..., n_inputs] normalised input
    recons_n: Tensor        # [..., n_inputs] reconstruction in the normalised space
    mean: Tensor            # [..., 1] per-token statistics used for (de-)normalising
    std: Tensor             # [..., 1]


class _JumpStep(torch.autograd.Function):
    """``H(z - θ)`` with the rectangle pseudo-derivative ``-1/ε · 1[|z-θ| < ε/2]`` for θ."""

    @staticmethod
    def forward(ctx, z: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        z, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        window = ((z - theta).abs() < eps / 2).to(grad.dtype)
        g_theta = -(grad * window / eps).reshape(-1, theta.shape[-1]).sum(0)
        return None, g_theta, None


class _JumpReLU(torch.autograd.Function):
    """``z · H(z - θ)``: gradient ``H`` for z, ``-θ/ε · 1[|z-θ| < ε/2]`` for θ."""

    @staticmethod
    def forward(ctx, z: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        return z * (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        z, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        gate = (z > theta).to(grad.dtype)
        window = ((z - theta).abs() < eps / 2).to(grad.dtype)
        g_theta = -(grad * window * theta / eps).reshape(-1, theta.shape[-1]).sum(0)
        return grad * gate, g_theta, None


def jump_step(z: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
    """Heaviside step of ``z - theta``; the threshold gets a rectangle-kernel gradient (L0)."""
    return _JumpStep.apply(z, theta, bandwidth)


def jump_relu(z: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
    """JumpReLU ``z · 1[z > theta]`` whose threshold gets a rectangle-kernel gradient."""
    return _JumpReLU.apply(z, theta, bandwidth)


class SparseAutoencoder(nn.Module):
    """The SCAR / G-SAE autoencoder (see the module docstring for the formulas)."""

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()
        if not isinstance(cfg, SAEConfig):
            raise TypeError(f"SparseAutoencoder expects an SAEConfig, got {type(cfg).__name__}")
        self.config = cfg
        self.pre_bias = nn.Parameter(torch.zeros(cfg.n_inputs))
        self.encoder = nn.Linear(cfg.n_inputs, cfg.n_latents, bias=False)
        self.latent_bias = nn.Parameter(torch.zeros(cfg.n_latents))
        self.decoder = nn.Linear(cfg.n_latents, cfg.n_inputs, bias=False)
        if cfg.activation == "jumprelu":
            self.log_threshold = nn.Parameter(
                torch.full((cfg.n_latents,), math.log(cfg.jumprelu_init_threshold)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming-uniform encoder, decoder initialised tied (``decoder = encoderᵀ``, as SCAR's
        training does; the two train independently afterwards), zero biases."""
        self.encoder.reset_parameters()
        with torch.no_grad():
            self.decoder.weight.copy_(self.encoder.weight.t())
            self.pre_bias.zero_()
            self.latent_bias.zero_()

    # -- pieces --------------------------------------------------------------------------------

    def check_input(self, x: Tensor) -> None:
        """Shape and dtype checks (static, so they cost nothing inside a compiled graph)."""
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError("SAE input must be a floating-point tensor")
        if x.dim() == 0 or x.shape[-1] != self.config.n_inputs:
            raise ValueError(f"SAE width mismatch: the SAE reads {self.config.n_inputs} features, "
                             f"the input has shape {tuple(x.shape)}")

    def normalize(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(x̃, mean, std)``; identity statistics when the config disables normalising."""
        if not self.config.normalize:
            return x, torch.zeros_like(x[..., :1]), torch.ones_like(x[..., :1])
        mean = x.mean(dim=-1, keepdim=True)
        centred = x - mean
        std = centred.std(dim=-1, keepdim=True)
        return centred / (std + NORM_EPS), mean, std

    def denormalize(self, x_n: Tensor, mean: Tensor, std: Tensor) -> Tensor:
        if not self.config.normalize:
            return x_n
        return x_n * (std + NORM_EPS) + mean

    def encode_pre(self, x_n: Tensor) -> Tensor:
        """Pre-activations of every latent from the normalised input."""
        return self.encoder(x_n - self.pre_bias) + self.latent_bias

    @property
    def threshold(self) -> Tensor:
        return self.log_threshold.exp()

    def activate(self, pre: Tensor) -> Tensor:
        """Dense latents from pre-activations."""
        act = self.config.activation
        if act == "relu":
            return torch.relu(pre)
        if act == "jumprelu":
            return jump_relu(pre, self.threshold, self.config.jumprelu_bandwidth)
        values, indices = self.topk(pre)
        return torch.zeros_like(pre).scatter(-1, indices, values)

    def topk(self, pre: Tensor) -> tuple[Tensor, Tensor]:
        """The kept values (already activated: ReLU or sigmoid) and their latent indices."""
        values, indices = pre.topk(self.config.k, dim=-1, sorted=False)
        values = torch.sigmoid(values) if self.config.activation == "topk-sigmoid" else \
            torch.relu(values)
        return values, indices

    def decode_n(self, latents: Tensor) -> Tensor:
        """Reconstruction in the normalised space."""
        return self.decoder(latents) + self.pre_bias

    def concept_direction(self, concept: int) -> Tensor:
        """Decoder column of latent ``concept`` (``[n_inputs]``)."""
        if not isinstance(concept, int) or not 0 <= concept < self.config.n_latents:
            raise ValueError(f"concept latent {concept!r} out of range [0, "
                             f"{self.config.n_latents})")
        return self.decoder.weight[:, concept]

    def forward(self, x: Tensor) -> SAEOutput:
        self.check_input(x)
        x_n, mean, std = self.normalize(x)
        pre = self.encode_pre(x_n)
        latents = self.activate(pre)
        recons_n = self.decode_n(latents)
        return SAEOutput(pre, latents, self.denormalize(recons_n, mean, std), x_n, recons_n,
                         mean, std)

    # -- weights -------------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Weights and config to one safetensors file (config as JSON metadata)."""
        save_with_config(self, path, "sae_config")

    @classmethod
    def load(cls, path: str | Path) -> SparseAutoencoder:
        """Read what `save` wrote (safetensors only: no pickle is ever unpickled)."""
        fields, state = load_with_config(path, "sae_config", "SAE",
                                         "not written by SparseAutoencoder.save")
        sae = cls(SAEConfig(**fields))
        sae.load_state_dict(state)
        return sae
