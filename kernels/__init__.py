"""Device kernels of the `aa::` ops (shipped as ``aa_compile.kernels``).

One sub-package per op family. Each holds ``reference.py`` (plain PyTorch, the numerics spec),
a CPU path, and a Triton path for CUDA. Ops in ``aa_compile.ops`` dispatch into these.
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
