"""Lazy loading of an op's Triton module, so that ``import aa_compile`` does not import Triton.

``kernels/`` (shipped as ``aa_compile.kernels``) holds one sub-package per op family:
``reference.py`` (plain PyTorch, the numerics spec), a CPU path and a Triton path for CUDA. It has
no ``__init__.py`` on purpose: from the repository root a top-level ``kernels`` must never shadow
Hugging Face's ``kernels`` package, which ``transformers`` imports.
"""

import functools
import importlib
from types import ModuleType


@functools.cache
def triton_module(package: str) -> ModuleType | None:
    """``<package>.triton_kernel``, or None when Triton is not installed (imported lazily: the
    module compiles its kernels with ``@triton.jit`` at import)."""
    try:
        return importlib.import_module(f"{package}.triton_kernel")
    except ImportError:
        return None
