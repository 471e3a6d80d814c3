"""Export of models rewritten by the `aa` passes: `onnx` (an ONNX file onnxruntime runs,
checked against eager). Needs the ``onnx`` extra (onnx, onnxscript, onnxruntime), imported
when exporting. See ``docs/export.md``."""

from aa_compile.export.capture import ExportError
from aa_compile.export.onnx_export import MismatchError, OnnxReport, onnx
from aa_compile.export.translations import MissingTranslationError

__all__ = ["ExportError", "MismatchError", "MissingTranslationError", "OnnxReport", "onnx"]
