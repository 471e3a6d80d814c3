"""`onnx`: write a model, rewritten by the `aa` passes, as an ONNX file that onnxruntime runs,
and check it against eager PyTorch.

Steps: capture and rewrite (`aa_compile.export.capture`), refuse ops without a translation
(naming each with its way out), ``torch.onnx.export(..., dynamo=True,
custom_translation_table=...)`` with the translations the ops registered, ``onnx.checker``,
then onnxruntime on the example inputs against the eager model. `OnnxReport` says which op
became what and how close the file is.

``runtime="onnxruntime"`` (default) uses onnxruntime's contrib operators where an op has such a
variant (`aa_compile.export.translations.ONNXRUNTIME_VARIANTS`: the int8 linears as
``MatMulNBits``), ``runtime="standard"`` standard ONNX operators only. A lossy variant (int8
activations) is checked by the SQNR it promises instead of ``rtol``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from aa_compile.config import Config
from aa_compile.export.capture import ExportError, capture, dynamic_error, mark_dims
from aa_compile.export.translations import (RUNTIMES, check_translatable, how_exported,
                                            min_sqnr_db, translation_table)
from aa_compile.export.weight_packing import fold_weight_packing


class MismatchError(ExportError):
    """onnxruntime's output differs from eager PyTorch by more than the tolerance."""


@dataclasses.dataclass
class OnnxReport:
    """What `onnx` wrote and how it checked.

    Attributes:
        path: the ONNX file.
        ops: ``aa::`` op -> ``(calls in the graph, translation "module:function")``.
        rewrites: pass name -> rewrites it made.
        dynamic: input index -> ``{dim: name}`` of the dynamic dimensions.
        max_rel_error: per output, ``max|onnxruntime - eager| / max|eager|`` on the examples.
        opset: the file's default-domain opset.
        runtime: the runtime the file targets (`aa_compile.export.translations.RUNTIMES`).
        sqnr_db: per output, ``10 log10(sum eager^2 / sum (onnxruntime - eager)^2)`` (inf when
            equal; integer outputs: inf or -inf).
        min_sqnr_db: the SQNR every output had to keep (a lossy variant was used), else None
            (``max_rel_error`` was held to ``rtol``).
        bounds: dynamic dimension name -> the largest size the model takes there (a check in
            its forward, e.g. the length of its RoPE table); the file is valid up to it.
    """

    path: str
    ops: dict[str, tuple[int, str]]
    rewrites: dict[str, int]
    dynamic: dict[int, dict[int, str]]
    max_rel_error: list[float]
    opset: int
    runtime: str = "onnxruntime"
    sqnr_db: list[float] = dataclasses.field(default_factory=list)
    min_sqnr_db: float | None = None
    bounds: dict[str, int] = dataclasses.field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"ONNX file {self.path} (opset {self.opset}, for {self.runtime})"]
        lines.append("aa:: ops:" + ("" if self.ops else " none"))
        for name, (calls, how) in sorted(self.ops.items()):
            lines.append(f"  {name} x{calls}: {how}")
        fired = {k: v for k, v in self.rewrites.items() if v}
        lines.append(f"passes that rewrote: {fired or 'none'}")
        lines.append(f"dynamic dims: {self.dynamic or 'none (static shapes)'}")
        if self.bounds:
            lines.append("bounded by the model: " + ", ".join(
                f"{name} <= {high}" for name, high in sorted(self.bounds.items())))
        errs = ", ".join(f"{e:.2e}" for e in self.max_rel_error)
        lines.append(f"onnxruntime vs eager, max relative error per output: {errs}")
        if self.min_sqnr_db is not None:
            sqnr = ", ".join(f"{e:.1f}" for e in self.sqnr_db)
            lines.append(f"onnxruntime vs eager, SQNR per output: {sqnr} dB (lossy int8 "
                         f"activations: at least {self.min_sqnr_db:g} dB accepted)")
        return "\n".join(lines)


def _require_onnx():
    try:
        import onnx as onnx_lib
        import onnxruntime
        import onnxscript  # noqa: F401  (the translations are onnxscript)
    except ImportError as e:
        raise ImportError(f"aa_compile.export.onnx needs onnx, onnxscript and onnxruntime "
                          f"({e.name} is missing): pip install 'aa-compile[onnx]'") from e
    return onnx_lib, onnxruntime


def onnx(model: nn.Module, example_inputs: Sequence[torch.Tensor], path: str | os.PathLike, *,
         dynamic_shapes: Sequence[Mapping[int, Any] | None] | None = None,
         options: Mapping[str, Any] | Config | None = None, rtol: float = 1e-4,
         runtime: str = "onnxruntime") -> OnnxReport:
    """Export ``model`` (inference: eval mode, no grad) rewritten by the `aa` passes to
    ``path`` and check it in onnxruntime.

    Args:
        model: an ``nn.Module`` whose forward takes tensors.
        example_inputs: a tuple of tensors, one per forward argument.
        path: the ``.onnx`` file to write.
        dynamic_shapes: per input, ``{dim: name or torch.export.Dim}`` of the dimensions that
            may change (e.g. ``({0: "batch", 1: "seq"},)``); the same name ties dimensions
            together. None: static shapes.
        options: the ``aa`` backend options (`aa_compile.Config`): which passes run.
        rtol: the largest ``max|onnxruntime - eager| / max|eager|`` per output accepted (when
            a lossy variant is used, its SQNR bound is checked instead).
        runtime: ``"onnxruntime"`` (onnxruntime's contrib operators where an op has a faster
            variant, e.g. the int8 linears as ``MatMulNBits``) or ``"standard"`` (standard ONNX
            operators only, for any runtime). The check runs in onnxruntime either way.

    Returns the `OnnxReport`; raises `ExportError` (or its subclasses) naming the cause.
    """
    onnx_lib, ort = _require_onnx()
    if not isinstance(model, nn.Module):
        raise TypeError(f"aa_compile.export.onnx: model must be an nn.Module, got "
                        f"{type(model).__name__}")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    inputs = tuple(example_inputs)
    bad = [i for i, t in enumerate(inputs) if not isinstance(t, torch.Tensor)]
    if bad or not inputs:
        raise TypeError("aa_compile.export.onnx: example_inputs must be a non-empty tuple of "
                        f"tensors (non-tensor arguments: bind them with functools.partial or a "
                        f"wrapper module); positions {bad} are not tensors")
    if runtime not in RUNTIMES:
        raise ValueError(f"aa_compile.export.onnx: runtime={runtime!r} is not valid; choose one "
                         f"of {list(RUNTIMES)}")
    config = Config.from_options(options)
    dims = mark_dims(dynamic_shapes, inputs)
    modes = {m: m.training for m in model.modules()}  # restored one by one afterwards
    model.eval()
    try:
        return _export(model, inputs, os.fspath(path), dims, config, rtol, runtime, onnx_lib,
                       ort)
    finally:
        for m, training in modes.items():
            m.training = training


def _export(model, inputs, path, dims, config, rtol, runtime, onnx_lib, ort) -> OnnxReport:
    captured = capture(model, inputs, dims, config)
    captured.module.eval()
    check_translatable(captured.aa_ops)
    export_dims = _export_dims(dims, captured.bounds)
    try:
        program = torch.onnx.export(
            captured.module, inputs, dynamo=True, verbose=False, report=False, optimize=False,
            dynamic_shapes=export_dims, custom_translation_table=translation_table(runtime))
    except Exception as e:
        text = str(e)
        if "Constraints violated" in text or "specializ" in text or "Not all values" in text:
            raise ExportError(dynamic_error(e, model, len(inputs))) from e
        raise
    fold_weight_packing(program.model)  # before the optimizer folds small ones unnamed
    program.optimize()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    program.save(path)
    onnx_lib.checker.check_model(path)
    with torch.no_grad():
        want = [t for t in pytree.tree_leaves(model(*inputs)) if isinstance(t, torch.Tensor)]
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    feeds = {i.name: t.detach().cpu().numpy() for i, t in zip(session.get_inputs(), inputs)}
    got = session.run(None, feeds)
    bound = min_sqnr_db(captured.aa_ops, runtime)
    errors, sqnr = _compare(got, want, rtol, bound)
    opset = next((o.version for o in onnx_lib.load(path, load_external_data=False).opset_import
                  if o.domain in ("", "ai.onnx")), 0)
    return OnnxReport(
        path=path,
        ops={name: (calls, how_exported(name, runtime))
             for name, calls in captured.aa_ops.items()},
        rewrites={r.name: r.rewrites for r in captured.passes},
        dynamic={i: {d: str(getattr(v, "__name__", v)) for d, v in spec.items()}
                 for i, spec in enumerate(dims) if spec},
        max_rel_error=errors, opset=opset, runtime=runtime, sqnr_db=sqnr, min_sqnr_db=bound,
        bounds=captured.bounds)


def _export_dims(dims: list[dict[int, Any]], bounds: dict[str, int]) -> tuple | None:
    """``torch.export`` dynamic shapes: names become ``Dim``s (one per name), with the upper
    bound the model puts on them (`aa_compile.export.capture.model_bounds`)."""
    if not any(dims):
        return None
    named: dict[str, Any] = {}
    out = []
    for spec in dims:
        entry = {}
        for d, v in spec.items():
            if isinstance(v, str):
                v = named.setdefault(v, torch.export.Dim(v, max=bounds.get(v)))
            entry[d] = v
        out.append(entry or None)
    return (tuple(out),)  # RewrittenModel.forward(*inputs): one varargs entry


def _sqnr_db(got: torch.Tensor, want: torch.Tensor) -> float:
    noise = (got.double() - want.double()).pow(2).sum().item()
    signal = want.double().pow(2).sum().item()
    if noise == 0:
        return float("inf")
    return 10 * math.log10(signal / noise) if signal > 0 else float("-inf")


def _compare(got: list, want: list[torch.Tensor], rtol: float,
             min_sqnr: float | None) -> tuple[list[float], list[float]]:
    """Per output: max relative error and SQNR; raises `MismatchError` past ``rtol`` (or, with
    ``min_sqnr``, below that SQNR)."""
    if len(got) != len(want):
        raise MismatchError(f"onnxruntime returned {len(got)} outputs, eager {len(want)}")
    errors, sqnrs = [], []
    for i, (g, w) in enumerate(zip(got, want)):
        w = w.detach().cpu()
        g = torch.from_numpy(g)
        if tuple(g.shape) != tuple(w.shape):
            raise MismatchError(f"output {i}: onnxruntime shape {tuple(g.shape)} != eager "
                                f"{tuple(w.shape)}")
        if not w.dtype.is_floating_point:
            same = torch.equal(g.to(w.dtype), w)
            errors.append(0.0 if same else float("inf"))
            sqnrs.append(float("inf") if same else float("-inf"))
        else:
            scale = w.double().abs().max().item() if w.numel() else 0.0
            diff = (g.double() - w.double()).abs().max().item() if w.numel() else 0.0
            errors.append(diff / scale if scale > 0 else diff)
            sqnrs.append(_sqnr_db(g, w) if w.numel() else float("inf"))
        if min_sqnr is not None and w.dtype.is_floating_point:
            if sqnrs[-1] < min_sqnr:
                raise MismatchError(
                    f"output {i}: onnxruntime's SQNR vs eager is {sqnrs[-1]:.1f} dB, below the "
                    f"{min_sqnr:g} dB its int8-activation MatMulNBits linears promise: export "
                    "with runtime='standard' (float activations, within rtol) or find the "
                    "layer with outlier activations")
        elif errors[-1] > rtol:
            raise MismatchError(
                f"output {i}: onnxruntime differs from eager by {errors[-1]:.3g} (relative to "
                f"the output's largest magnitude), over rtol={rtol:g}: an op translation is "
                "off; tests/test_onnx_ops.py checks each op against eager")
    return errors, sqnrs
