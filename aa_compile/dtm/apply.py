"""Apply a compression plan: pruned weights in place, int8 components as `Int8Linear`.

A **plan** maps component names (see `find_components`) to compression specs (``"prune:0.5"``,
``"2:4"``, ``"int8"``, ``"none"``). `apply` works on a deep copy unless ``inplace=True``.
`save_applied` writes the result as a saved model directory (`aa_compile.models.save_model`
plus the plan in its ``config.json``), which one line loads back::

    model = aa_compile.dtm.load_applied("DIR")
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import aa_compile.ops  # noqa: F401  (defines aa::int8_linear)
from aa_compile.kernels.int8_linear.reference import quantize_absmax
from aa_compile.models.checkpoint import (
    CONFIG_FILE,
    load_state,
    model_from_config,
    read_config,
    save_model,
)

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
        raise TypeError(f"plan must be a dict {{component: compression}}, got "
                        f"{type(plan).__name__}")
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


def save_applied(model: nn.Module, plan: dict, directory: str | Path, *, tokenizer: Any = None,
                 measured: dict | None = None, training: dict | None = None) -> Path:
    """Write ``model`` (``apply(base, plan)``) to ``directory``: its weights (``Int8Linear``
    buffers included) and, in ``config.json``, the base config and ``{"dtm": {"plan",
    "measured"}}``. `load_applied` reads it."""
    if not isinstance(plan, dict):
        raise TypeError(f"plan must be a dict {{component: compression}}, got "
                        f"{type(plan).__name__}")
    dtm = {"plan": {n: parse(c).spec for n, c in plan.items()}}
    if measured is not None:
        dtm["measured"] = measured
    return save_model(model, directory, tokenizer=tokenizer, training=training,
                      extra={"dtm": dtm})


def load_applied(directory: str | Path) -> nn.Module:
    """The compressed model `save_applied` (``aa-compile fdtm apply --out DIR``) wrote, in
    eval mode: the base model rebuilt from its config, the plan applied, the weights loaded
    strictly (bit-exact)."""
    meta = read_config(directory)
    info = meta.get("dtm")
    if not isinstance(info, dict) or not isinstance(info.get("plan"), dict):
        raise ValueError(f"cannot load {Path(directory) / CONFIG_FILE} with load_applied: it "
                         "has no DTM plan (a plain saved model: use "
                         "aa_compile.models.load_model)")
    model = model_from_config(directory, meta)
    try:
        model = apply(model, info["plan"], inplace=True)
    except (TypeError, ValueError) as e:
        raise ValueError(f"cannot load {Path(directory) / CONFIG_FILE}: bad DTM plan: {e}") \
            from None
    return load_state(model, directory).eval()
