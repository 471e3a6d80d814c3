"""Export of models rewritten by the `aa` passes: `onnx` (an ONNX file onnxruntime runs,
checked against eager; `translation_kinds` says how each op exports) and, in
``aa_compile.export.tensorrt`` (imported on use: it imports torch-tensorrt), the TensorRT
lowering behind ``inner_compiler="tensorrt"``. The ONNX path needs the ``onnx`` extra (onnx,
onnxscript, onnxruntime), imported when exporting. See ``docs/export.md``."""

from aa_compile.export.capture import ExportError
from aa_compile.export.onnx_export import MismatchError, OnnxReport, onnx
from aa_compile.export.translations import MissingTranslationError, translation_kinds

__all__ = ["ExportError", "MismatchError", "MissingTranslationError", "OnnxReport", "onnx",
           "translation_kinds"]
