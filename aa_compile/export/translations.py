"""The ONNX translation table of the `aa::` ops, from their registrations
(`aa_compile.ops.registry.register_onnx`), per target runtime, and the check that a graph can
use it.

Every translation registered with an op uses standard ONNX operators (``runtime="standard"``:
any runtime). For ``runtime="onnxruntime"`` some ops have a faster variant built on
onnxruntime's contrib operators (`ONNXRUNTIME_VARIANTS`); the rest keep their standard
translation. Building a table imports each translation module (``kernels/<op>/onnx_translation.py``)
and with it onnxscript, so it happens only when exporting; `translation_kinds` imports none.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Iterable

import torch

from aa_compile.ops import registry

#: what `aa_compile.export.onnx` can target: ``"onnxruntime"`` (contrib operators where an op
#: has a variant) or ``"standard"`` (standard ONNX operators only, any runtime)
RUNTIMES = ("onnxruntime", "standard")

#: the accepted signal-to-quantisation-noise ratio (dB) of every output of a model whose int8
#: linears run as MatMulNBits with int8 activations (docs/export.md: how it follows from the
#: per-linear rounding bound)
INT8_ACTIVATIONS_MIN_SQNR_DB = 30.0


class MissingTranslationError(RuntimeError):
    """An `aa::` op in the graph has no ONNX translation (its registered reason says why)."""


@dataclasses.dataclass(frozen=True)
class Variant:
    """An op's translation for one runtime, instead of its standard one.

    Attributes:
        translation: ``"module:function"`` of the onnxscript function (same arguments as the op).
        operator: the contrib operator it uses, as reports name it.
        min_sqnr_db: the SQNR (dB) every output keeps when the variant is lossy (it rounds
            something the op does not), else None (it matches the op as the standard one does).
    """

    translation: str
    operator: str
    min_sqnr_db: float | None = None


#: ``aa::`` op -> its onnxruntime variant (contrib operators, ``com.microsoft`` domain)
ONNXRUNTIME_VARIANTS: dict[str, Variant] = {
    "aa::int8_linear": Variant(
        "aa_compile.kernels.int8_linear.onnx_translation:int8_linear_matmulnbits",
        "com.microsoft::MatMulNBits (8-bit codes, int8 activations)",
        min_sqnr_db=INT8_ACTIVATIONS_MIN_SQNR_DB),
}


def _check_runtime(runtime: str) -> None:
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime={runtime!r} is not valid; choose one of {list(RUNTIMES)} "
                         "('standard': standard ONNX operators only, for any runtime)")


def _load(translation: str) -> Callable:
    module, name = translation.split(":", 1)
    return getattr(importlib.import_module(module), name)


def translation_table(runtime: str = "onnxruntime") -> dict[torch._ops.OpOverload, Callable]:
    """``{torch.ops.aa.<op>.default: onnxscript function}`` for every op with a translation,
    the runtime's variant where it has one: what ``torch.onnx.export(...,
    custom_translation_table=...)`` takes."""
    _check_runtime(runtime)
    table = {}
    for name, export in registry.onnx_exports().items():
        if export.translation is not None:
            short = name.split("::", 1)[1]
            variant = ONNXRUNTIME_VARIANTS.get(name) if runtime == "onnxruntime" else None
            fn = _load(variant.translation) if variant is not None else export.load()
            table[getattr(torch.ops.aa, short).default] = fn
    return table


def how_exported(name: str, runtime: str = "onnxruntime") -> str:
    """``"module:function"`` of the op's translation for ``runtime``, or ``"none: <reason>"``;
    raises for an op that registered neither."""
    _check_runtime(runtime)
    export = registry.onnx_exports().get(name)
    if export is None:
        raise MissingTranslationError(
            f"{name} registered no ONNX export: add register_onnx({name!r}, "
            "\"aa_compile.kernels.<op>.onnx_translation:<function>\") (or a reason=) in its "
            "aa_compile/ops/<op>.py")
    if export.translation is None:
        return f"none: {export.reason}"
    variant = ONNXRUNTIME_VARIANTS.get(name) if runtime == "onnxruntime" else None
    return variant.translation if variant is not None else export.translation


def min_sqnr_db(names: Iterable[str], runtime: str) -> float | None:
    """The SQNR bound (dB) the outputs of a graph with these ops keep on ``runtime``: the
    loosest bound of its lossy variants, or None when every translation is exact."""
    _check_runtime(runtime)
    if runtime != "onnxruntime":
        return None
    bounds = [v.min_sqnr_db for n in set(names) if (v := ONNXRUNTIME_VARIANTS.get(n)) is not None
              and v.min_sqnr_db is not None]
    return min(bounds) if bounds else None


def translation_kinds() -> dict[str, str]:
    """Every registered op -> how it exports to ONNX, in a few words (for ``aa-compile info``):
    ``"standard ops"``, ``"standard ops; onnxruntime: <contrib operator>"`` or ``"none
    (<reason>)"``. Imports no translation (no onnx needed)."""
    kinds = {}
    for name in registry.defined_ops():
        export = registry.onnx_exports().get(name)
        if export is None:
            kinds[name] = "none (no register_onnx)"
        elif export.translation is None:
            kinds[name] = f"none ({export.reason})"
        elif name in ONNXRUNTIME_VARIANTS:
            kinds[name] = f"standard ops; onnxruntime: {ONNXRUNTIME_VARIANTS[name].operator}"
        else:
            kinds[name] = "standard ops"
    return kinds


def check_translatable(names: Iterable[str]) -> None:
    """Raise `MissingTranslationError` naming every op of ``names`` without a translation,
    with its reason (the way out)."""
    missing = []
    for name in sorted(set(names)):
        export = registry.onnx_exports().get(name)
        if export is None:
            how_exported(name)  # raises, naming the missing registration
        if export.translation is None:
            missing.append(f"{name}: {export.reason}")
    if missing:
        raise MissingTranslationError(
            "cannot export to ONNX, these aa:: ops have no translation:\n  "
            + "\n  ".join(missing)
            + "\n(each reason names the way out; a pass's op can also be left out with "
            "options={'disable': ['<pass name>']})")
