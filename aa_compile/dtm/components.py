"""Components (one weight matrix each) and the compressions applied to them.

A **component** is one ``nn.Linear`` (or GPT-2 ``Conv1D``) inside a numbered block list:
``layers.3.attn.q_proj`` on the reference transformer, ``model.layers.3.self_attn.q_proj`` on HF
Llama, ``transformer.h.3.attn.c_attn`` on GPT-2. Its **layer** is the block index and its
**type** the path after it (``attn.q_proj``). Embeddings and the LM head sit outside the block
list and are not components.

Compressions (spec strings, see `parse`):

- ``"none"``;
- ``"prune:S"``: unstructured magnitude pruning, the ``round(S * numel)`` smallest-magnitude
  weights of the matrix set to zero, ``0 <= S < 1``;
- ``"2:4"``: semi-structured pruning, the 2 smallest-magnitude weights of every group of 4
  consecutive weights along the input dimension zeroed (input size must be a multiple of 4);
- ``"int8"``: weight-only, per-output-channel absmax int8 (``scale = max|w_row| / 127``), no
  outlier handling.

Weights are always handled in ``[out, in]`` orientation; GPT-2's ``Conv1D`` stores ``[in, out]``
and is transposed on the way in and out.
"""

from __future__ import annotations

import dataclasses
import re

import torch
from torch import Tensor, nn

from aa_compile.kernels.int8_linear.reference import dequantize, quantize_absmax

_LAYER = re.compile(r"(?:^|\.)(\d+)\.(.+)$")


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2 style ``Conv1D`` (``weight [in, out]``, ``y = x @ W + b``), matched by shape of API."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


@dataclasses.dataclass(frozen=True)
class Component:
    name: str  # module path
    layer: int
    type: str
    out_features: int
    in_features: int

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features

    @property
    def part(self) -> str:
        """``"mlp"`` or ``"attn"``: the half of its layer the component belongs to."""
        return "mlp" if self.type.startswith("mlp.") else "attn"


def find_components(model: nn.Module) -> dict[str, Component]:
    """All components of ``model`` in module order. Raises if there are none."""
    out: dict[str, Component] = {}
    for name, mod in model.named_modules():
        if not is_linear_like(mod):
            continue
        m = _LAYER.search(name)
        if m is None:
            continue
        w = weight_oi(mod)
        out[name] = Component(name, int(m.group(1)), m.group(2), w.shape[0], w.shape[1])
    if not out:
        raise ValueError(
            f"{type(model).__name__} has no components: DTM compresses nn.Linear (or GPT-2 "
            "Conv1D) modules inside a numbered block list (e.g. layers.0.attn.q_proj)"
        )
    return out


def weight_oi(module: nn.Module) -> Tensor:
    """The weight as ``[out, in]`` (a view)."""
    return module.weight.t() if is_conv1d(module) else module.weight


def set_weight_oi(module: nn.Module, w_oi: Tensor) -> None:
    """Copy an ``[out, in]`` weight into the module in place."""
    with torch.no_grad():
        weight_oi(module).copy_(w_oi)


@dataclasses.dataclass(frozen=True)
class Compression:
    kind: str  # "none" | "prune" | "2:4" | "int8"
    sparsity: float = 0.0

    @property
    def spec(self) -> str:
        return f"prune:{self.sparsity:g}" if self.kind == "prune" else self.kind

    def bytes_saved(self, comp: Component, element_size: int = 4) -> float:
        """Weight bytes removed vs the dense matrix: zeroed values for pruning (sparse-format
        index overhead not counted), ``numel * (element_size - 1) - 4 * out`` for int8."""
        if self.kind == "prune":
            return round(self.sparsity * comp.numel) * element_size
        if self.kind == "2:4":
            return comp.numel // 2 * element_size
        if self.kind == "int8":
            return comp.numel * (element_size - 1) - 4 * comp.out_features
        return 0.0

    def __str__(self) -> str:
        return self.spec


def parse(spec: str | Compression) -> Compression:
    """``"none" | "prune:S" | "2:4" | "int8"`` -> `Compression`."""
    if isinstance(spec, Compression):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"compression must be a spec string, got {type(spec).__name__}")
    s = spec.strip().lower()
    if s in ("none", "2:4", "int8"):
        return Compression(s)
    if s.startswith("prune:"):
        try:
            sp = float(s.split(":", 1)[1])
        except ValueError:
            raise ValueError(f"bad sparsity in compression {spec!r}: use e.g. 'prune:0.5'")
        if not 0.0 <= sp < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {sp} in {spec!r}")
        return Compression("prune", sp)
    raise ValueError(f"unknown compression {spec!r}: use 'none', 'prune:S', '2:4' or 'int8'")


def magnitude_prune(w: Tensor, sparsity: float) -> Tensor:
    """A copy of ``w`` with the ``round(sparsity * numel)`` smallest-magnitude entries zeroed."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    out = w.detach().clone()
    k = round(sparsity * w.numel())
    if k:
        idx = out.abs().flatten().topk(k, largest=False, sorted=False).indices
        out.view(-1)[idx] = 0
    return out


def prune_2_4(w_oi: Tensor) -> Tensor:
    """Keep the 2 largest-magnitude of every 4 consecutive input weights per output row."""
    n, k = w_oi.shape
    if k % 4:
        raise ValueError(f"2:4 pruning needs the input dimension to be a multiple of 4, got {k}")
    g = w_oi.detach().reshape(n, k // 4, 4)
    drop = g.abs().topk(2, dim=-1, largest=False).indices
    return g.scatter(-1, drop, 0).reshape(n, k)


def fake_quant_int8(w_oi: Tensor) -> Tensor:
    """``dequantize(quantize_absmax(w))`` in ``w``'s dtype (what the int8 layer multiplies by)."""
    q, s = quantize_absmax(w_oi)
    return dequantize(q, s, torch.float32).to(w_oi.dtype)


def compressed_weight(w_oi: Tensor, compression: str | Compression) -> Tensor:
    """The ``[out, in]`` weight after ``compression`` (int8: its dequantised value)."""
    c = parse(compression)
    if c.kind == "prune":
        return magnitude_prune(w_oi, c.sparsity)
    if c.kind == "2:4":
        return prune_2_4(w_oi)
    if c.kind == "int8":
        return fake_quant_int8(w_oi)
    return w_oi.detach().clone()
