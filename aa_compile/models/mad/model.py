"""MAD's two backbones: `LanguageModel` (next-token tasks) and `AutoEncoder` (compression).

Both embed tokens (N(0, 0.02), no position embeddings: position comes from the layers), run a
stack of pre-norm residual layers ``x = x + layer(norm(x))`` from the layer menu, and unembed
with ``norm -> Linear(dim, vocab)``. The auto-encoder pools the last position into one vector,
adds fixed sin-cos position embeddings for every output position and decodes each with a small
MLP, so the whole sequence must pass through that one vector. As in ``mad-lab``, the norm is
``nn.LayerNorm``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .layers import make_layer

DEFAULT_LAYERS = ("mh-attention", "swiglu", "mh-attention", "swiglu")


def sincos_positions(length: int, dim: int, base: float = 10000.0) -> Tensor:
    """Fixed ``[length, dim]`` position table: sines in the first half, cosines in the second."""
    if dim % 2:
        raise ValueError(f"dim must be even for sin-cos positions, got {dim}")
    freq = base ** (-torch.arange(dim // 2, dtype=torch.float64) / max(dim // 2 - 1, 1))
    angles = torch.arange(length, dtype=torch.float64)[:, None] * freq[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=-1).float()


def check_config(vocab_size: int, layers: Sequence[str], dim: int, max_length: int) -> None:
    for name, value in (("vocab_size", vocab_size), ("dim", dim), ("max_length", max_length)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if isinstance(layers, str) or not layers:
        raise ValueError(f"layers must be a non-empty sequence of layer names, got {layers!r}")


class Residual(nn.Module):
    """``x + layer(norm(x))``."""

    def __init__(self, layer: nn.Module, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.layer = layer

    def forward(self, x: Tensor) -> Tensor:
        return x + self.layer(self.norm(x))


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """Embeddings N(0, std), linear biases zero (the other weights keep torch's default)."""
    if isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=std)
    elif isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


class LanguageModel(nn.Module):
    """Token embedding -> pre-norm residual layers -> norm -> vocabulary logits ``[B, S, V]``."""

    def __init__(self, vocab_size: int, layers: Sequence[str] = DEFAULT_LAYERS, dim: int = 128,
                 max_length: int = 1280) -> None:
        super().__init__()
        check_config(vocab_size, layers, dim, max_length)
        self.vocab_size, self.max_length = vocab_size, max_length
        self.embed = nn.Embedding(vocab_size, dim)
        self.blocks = nn.ModuleList(Residual(make_layer(n, dim, max_length), dim) for n in layers)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size)
        self.apply(init_weights)

    def forward(self, input_ids: Tensor) -> Tensor:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got {tuple(input_ids.shape)}")
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


class AutoEncoder(nn.Module):
    """Encode a sequence into its last position's vector, decode every position from it.

    Decoder: ``vector + sincos[pos] -> LayerNorm -> Linear -> GELU -> LayerNorm -> Linear ->
    GELU -> LayerNorm -> Linear(dim, vocab)``. Linear weights are N(0, 0.02), as in ``mad-lab``.
    """

    def __init__(self, vocab_size: int, layers: Sequence[str] = DEFAULT_LAYERS, dim: int = 128,
                 max_length: int = 1280) -> None:
        super().__init__()
        check_config(vocab_size, layers, dim, max_length)
        self.vocab_size, self.max_length = vocab_size, max_length
        self.embed = nn.Embedding(vocab_size, dim)
        self.encoder = nn.ModuleList(Residual(make_layer(n, dim, max_length), dim)
                                     for n in layers)
        self.register_buffer("positions", sincos_positions(max_length, dim), persistent=False)
        self.decoder = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU(),
                                     nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size)
        self.apply(init_weights)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def encode(self, input_ids: Tensor) -> Tensor:
        """``[B, S] -> [B, dim]``: the last position after the encoder stack."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got {tuple(input_ids.shape)}")
        if input_ids.shape[1] > self.max_length:
            raise ValueError(f"sequence length {input_ids.shape[1]} exceeds "
                             f"max_length={self.max_length}")
        x = self.embed(input_ids)
        for block in self.encoder:
            x = block(x)
        return x[:, -1]

    def decode(self, code: Tensor, seq_len: int) -> Tensor:
        """``[B, dim] -> [B, seq_len, V]``."""
        x = code[:, None, :] + self.positions[:seq_len]
        return self.head(self.norm(self.decoder(x)))

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.decode(self.encode(input_ids), input_ids.shape[1])


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["DEFAULT_LAYERS", "AutoEncoder", "LanguageModel", "Residual",
           "param_count", "sincos_positions"]
