"""RoPE angles at arbitrary positions for HAT's stacks, with Llama-3 frequency scaling.

`rope_at` gives the cos/sin rows of any integer positions (no table, so no length limit).
`Llama3RopeScaling` is the ``rope_scaling`` of type ``llama3`` that Llama-3.1 configs carry
(the backbone of the released 8B/70B HAT models is Llama-3.1): it keeps the fast rotations,
divides the slow ones (wavelength above ``original_max_position_embeddings / low_freq_factor``)
by ``factor``, and blends the two linearly in between. It changes only the inverse frequencies;
the attention is not rescaled (the rule's attention factor is 1).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

#: ``rope_scaling`` keys of a ``llama3`` scaling, besides its type
LLAMA3_FIELDS = ("factor", "low_freq_factor", "high_freq_factor",
                 "original_max_position_embeddings")


@dataclasses.dataclass(frozen=True)
class Llama3RopeScaling:
    """Llama-3 RoPE frequency scaling (``{"rope_type": "llama3", ...}`` of a Llama config).

    Args:
        factor: how much slower the low frequencies turn (> 0; Llama-3.1 uses 8).
        low_freq_factor: wavelengths above ``original_max_position_embeddings /
            low_freq_factor`` are divided by ``factor`` in frequency.
        high_freq_factor: wavelengths below ``original_max_position_embeddings /
            high_freq_factor`` are kept; must be larger than ``low_freq_factor``.
        original_max_position_embeddings: the context length the model was first trained at.
    """

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int

    def __post_init__(self) -> None:
        for name in ("factor", "low_freq_factor", "high_freq_factor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value) or value <= 0:
                raise ValueError(f"Llama3RopeScaling.{name} must be a number > 0, got {value!r}")
        if self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(f"Llama3RopeScaling: high_freq_factor={self.high_freq_factor} must "
                             f"be larger than low_freq_factor={self.low_freq_factor} (the "
                             "blend between them divides by their difference)")
        n = self.original_max_position_embeddings
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError("Llama3RopeScaling.original_max_position_embeddings must be an "
                             f"int >= 1, got {n!r}")

    @classmethod
    def from_hf(cls, raw: Mapping[str, Any]) -> Llama3RopeScaling:
        """From a Hugging Face ``rope_scaling`` dict of type ``llama3`` (``rope_type``, or the
        older key ``type``); another type or a missing field is a ValueError naming it."""
        if not isinstance(raw, Mapping):
            raise ValueError(f"rope_scaling must be an object, got {type(raw).__name__}")
        kind = raw.get("rope_type", raw.get("type"))
        if kind != "llama3":
            raise ValueError(f"rope_scaling of type {kind!r} is not supported (only 'llama3')")
        missing = [k for k in LLAMA3_FIELDS if k not in raw]
        if missing:
            raise ValueError(f"rope_scaling of type 'llama3' lacks {', '.join(missing)}")
        return cls(**{k: raw[k] for k in LLAMA3_FIELDS})

    def to_hf(self) -> dict[str, Any]:
        """The Hugging Face ``rope_scaling`` dict (``rope_type`` first)."""
        return {"rope_type": "llama3", **dataclasses.asdict(self)}

    def scale(self, inv_freq: Tensor) -> Tensor:
        """The scaled inverse frequencies (float32 in, float32 out)."""
        context = float(self.original_max_position_embeddings)
        wavelength = 2 * math.pi / inv_freq
        slow = inv_freq / self.factor
        # 0 at the long-wavelength edge of the blend, 1 at its short-wavelength edge
        blend = (context / wavelength - self.low_freq_factor) / (
            self.high_freq_factor - self.low_freq_factor)
        mid = (1 - blend) * inv_freq / self.factor + blend * inv_freq
        out = torch.where(wavelength > context / self.low_freq_factor, slow, mid)
        return torch.where(wavelength < context / self.high_freq_factor, inv_freq, out)


def rope_inv_freq(head_dim: int, theta: float, scaling: Llama3RopeScaling | None = None,
                  device: torch.device | str | None = None) -> Tensor:
    """``[head_dim / 2]`` float32 inverse frequencies ``theta ** (-2i / head_dim)``, scaled by
    ``scaling`` when given."""
    inv_freq = 1.0 / theta ** (
        torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    return inv_freq if scaling is None else scaling.scale(inv_freq)


def rope_at(positions: Tensor, head_dim: int, theta: float,
            scaling: Llama3RopeScaling | None = None) -> tuple[Tensor, Tensor]:
    """cos, sin ``[n, head_dim / 2]`` (float32) at arbitrary integer positions; without
    ``scaling``, row p equals row p of `transformer.rope_tables`, without a table (and so
    without a length limit)."""
    inv_freq = rope_inv_freq(head_dim, theta, scaling, positions.device)
    angles = positions.to(torch.float32)[:, None] * inv_freq
    return angles.cos(), angles.sin()


__all__ = ["LLAMA3_FIELDS", "Llama3RopeScaling", "rope_at", "rope_inv_freq"]
