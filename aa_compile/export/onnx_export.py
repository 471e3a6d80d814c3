"""`onnx`: write a model, rewritten by the `aa` passes, as an ONNX file that onnxruntime runs,
and check it against eager PyTorch.

Steps: capture and rewrite (`aa_compile.export.capture`), refuse ops without a translation
(naming each with its way out), ``torch.onnx.export(..., dynamo=True,
custom_translation_table=...)`` with the translations the ops registered, ``onnx.checker``,
then onnxruntime on the example inputs against the eager model. `OnnxReport` says which op
became what and how close the file is.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from aa_compile.config import Config
from aa_compile.export.capture import ExportError, capture, mark_dims
from aa_compile.export.translations import check_translatable, how_exported, translation_table


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
    """

    path: str
    ops: dict[str, tuple[int, str]]
    rewrites: dict[str, int]
    dynamic: dict[int, dict[int, str]]
    max_rel_error: list[float]
    opset: int

    def __str__(self) -> str:
        lines = [f"ONNX file {self.path} (opset {self.opset})"]
        lines.append("aa:: ops:" + ("" if self.ops else " none"))
        for name, (calls, how) in sorted(self.ops.items()):
            lines.append(f"  {name} x{calls}: {how}")
        fired = {k: v for k, v in self.rewrites.items() if v}
        lines.append(f"passes that rewrote: {fired or 'none'}")
        lines.append(f"dynamic dims: {self.dynamic or 'none (static shapes)'}")
        errs = ", ".join(f"{e:.2e}" for e in self.max_rel_error)
        lines.append(f"onnxruntime vs eager, max relative error per output: {errs}")
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
         options: Mapping[str, Any] | Config | None = None, rtol: float = 1e-4) -> OnnxReport:
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
        rtol: the largest ``max|onnxruntime - eager| / max|eager|`` per output accepted.

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
    config = Config.from_options(options)
    dims = mark_dims(dynamic_shapes, inputs)
    modes = {m: m.training for m in model.modules()}  # restored one by one afterwards
    model.eval()
    try:
        return _export(model, inputs, os.fspath(path), dims, config, rtol, onnx_lib, ort)
    finally:
        for m, training in modes.items():
            m.training = training


def _export(model, inputs, path, dims, config, rtol, onnx_lib, ort) -> OnnxReport:
    captured = capture(model, inputs, dims, config)
    captured.module.eval()
    check_translatable(captured.aa_ops)
    export_dims = _export_dims(dims, inputs)
    try:
        program = torch.onnx.export(
            captured.module, inputs, dynamo=True, verbose=False, report=False,
            dynamic_shapes=export_dims, custom_translation_table=translation_table())
    except Exception as e:
        text = str(e)
        if "Constraints violated" in text or "specializ" in text:
            raise ExportError(
                "a dimension marked dynamic is fixed by the model; drop it from dynamic_shapes "
                f"or remove the code that fixes it. torch says: {text[:600]}") from e
        raise
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    program.save(path)
    onnx_lib.checker.check_model(path)
    with torch.no_grad():
        want = [t for t in pytree.tree_leaves(model(*inputs)) if isinstance(t, torch.Tensor)]
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    feeds = {i.name: t.detach().cpu().numpy() for i, t in zip(session.get_inputs(), inputs)}
    got = session.run(None, feeds)
    errors = _compare(got, want, rtol)
    opset = next((o.version for o in onnx_lib.load(path, load_external_data=False).opset_import
                  if o.domain in ("", "ai.onnx")), 0)
    return OnnxReport(
        path=path,
        ops={name: (calls, how_exported(name)) for name, calls in captured.aa_ops.items()},
        rewrites={r.name: r.rewrites for r in captured.passes},
        dynamic={i: {d: str(getattr(v, "__name__", v)) for d, v in spec.items()}
                 for i, spec in enumerate(dims) if spec},
        max_rel_error=errors, opset=opset)


def _export_dims(dims: list[dict[int, Any]], inputs) -> tuple | None:
    """``torch.export`` dynamic shapes: names become ``Dim``s (one per name)."""
    if not any(dims):
        return None
    named: dict[str, Any] = {}
    out = []
    for spec in dims:
        entry = {}
        for d, v in spec.items():
            if isinstance(v, str):
                v = named.setdefault(v, torch.export.Dim(v))
            entry[d] = v
        out.append(entry or None)
    return (tuple(out),)  # RewrittenModel.forward(*inputs): one varargs entry


def _compare(got: list, want: list[torch.Tensor], rtol: float) -> list[float]:
    if len(got) != len(want):
        raise MismatchError(f"onnxruntime returned {len(got)} outputs, eager {len(want)}")
    errors = []
    for i, (g, w) in enumerate(zip(got, want)):
        w = w.detach().cpu()
        g = torch.from_numpy(g)
        if tuple(g.shape) != tuple(w.shape):
            raise MismatchError(f"output {i}: onnxruntime shape {tuple(g.shape)} != eager "
                                f"{tuple(w.shape)}")
        if not w.dtype.is_floating_point:
            errors.append(0.0 if torch.equal(g.to(w.dtype), w) else float("inf"))
        else:
            scale = w.double().abs().max().item() if w.numel() else 0.0
            diff = (g.double() - w.double()).abs().max().item() if w.numel() else 0.0
            errors.append(diff / scale if scale > 0 else diff)
        if errors[-1] > rtol:
            raise MismatchError(
                f"output {i}: onnxruntime differs from eager by {errors[-1]:.3g} (relative to "
                f"the output's largest magnitude), over rtol={rtol:g}: an op translation is "
                "off; tests/test_onnx_ops.py checks each op against eager")
    return errors
