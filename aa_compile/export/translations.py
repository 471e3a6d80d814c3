"""The ONNX translation table of the `aa::` ops, from their registrations
(`aa_compile.ops.registry.register_onnx`), and the check that a graph can use it.

Building the table imports each translation module (``kernels/<op>/onnx_translation.py``) and
with it onnxscript, so it happens only when exporting.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from aa_compile.ops import registry


class MissingTranslationError(RuntimeError):
    """An `aa::` op in the graph has no ONNX translation (its registered reason says why)."""


def translation_table() -> dict[torch._ops.OpOverload, Callable]:
    """``{torch.ops.aa.<op>.default: onnxscript function}`` for every op with a translation:
    what ``torch.onnx.export(..., custom_translation_table=...)`` takes."""
    table = {}
    for name, export in registry.onnx_exports().items():
        if export.translation is not None:
            short = name.split("::", 1)[1]
            table[getattr(torch.ops.aa, short).default] = export.load()
    return table


def how_exported(name: str) -> str:
    """``"module:function"`` of the op's translation, or ``"none: <reason>"``; raises for an
    op that registered neither."""
    export = registry.onnx_exports().get(name)
    if export is None:
        raise MissingTranslationError(
            f"{name} registered no ONNX export: add register_onnx({name!r}, "
            "\"aa_compile.kernels.<op>.onnx_translation:<function>\") (or a reason=) in its "
            "aa_compile/ops/<op>.py")
    return export.translation if export.translation is not None else f"none: {export.reason}"


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
