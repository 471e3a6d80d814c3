"""Apply a compression plan: pruned weights in place, int8 components as `Int8Linear`.

A **plan** maps component names (see `find_components`) to compression specs (``"prune:0.5"``,
``"2:4"``, ``"int8"``, ``"none"``). `apply` works on a deep copy unless ``inplace=True``.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

import aa_compile.ops  # noqa: F401  (defines aa::int8_linear)
from aa_compile.kernels.int8_linear.reference import quantize_absmax

from .components import compressed_weight, find_components, parse, set_weight_oi, weight_oi


class Int8Linear(nn.Module):
    """Weight-only int8 linear: ``aa::int8_linear(x, weight_int8, scales, bias)``.

    Buffers ``weight_int8 [out, in]`` (int8) and ``scales [out]`` (float32); ``bias`` stays a
    float parameter.
    """

    def __init__(self, weight_int8: Tensor, scales: Tensor, bias: Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight_int8.shape
        self.register_buffer("weight_int8", weight_int8)
        self.register_buffer("scales", scales)
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None

    @classmethod
    def from_weight(cls, w_oi: Tensor, bias: Tensor | None = None) -> Int8Linear:
        q, s = quantize_absmax(w_oi)
        return cls(q.to(w_oi.device), s.to(w_oi.device), bias)

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.aa.int8_linear(x, self.weight_int8, self.scales, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"bias={self.bias is not None}"


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def check_plan(model: nn.Module, plan: dict) -> dict:
    """Validate ``plan`` against ``model``'s components; returns ``{name: Compression}``."""
    if not isinstance(plan, dict):
        raise TypeError(f"plan must be a dict {{component: compression}}, got {type(plan).__name__}")
    comps = find_components(model)
    missing = [n for n in plan if n not in comps]
    if missing:
        sample = ", ".join(list(comps)[:3])
        raise ValueError(f"plan names components the model does not have: {missing[:5]} "
                         f"(components look like: {sample}, ...)")
    return {n: parse(c) for n, c in plan.items()}


def apply(model: nn.Module, plan: dict, inplace: bool = False) -> nn.Module:
    """``model`` with ``plan`` applied (a deep copy unless ``inplace``)."""
    parsed = check_plan(model, plan)
    if not inplace:
        model = copy.deepcopy(model)
    for name, c in parsed.items():
        mod = model.get_submodule(name)
        if c.kind in ("prune", "2:4"):
            set_weight_oi(mod, compressed_weight(weight_oi(mod), c))
        elif c.kind == "int8":
            w = weight_oi(mod).detach()
            _set_submodule(model, name, Int8Linear.from_weight(w, getattr(mod, "bias", None)))
    return model
