"""Kernels of `aa::fp8_linear` (registered in ``aa_compile/ops/fp8_linear.py``): ``reference.py``
(the numerics spec), ``compose.py`` (the op's GEMMs from one device's NT GEMM), ``cpu.py``
(``torch._scaled_mm``), ``triton_kernel.py`` (CUDA sm_89+) and ``cutlass_emit.py`` (an optional
sm90a CUTLASS GEMM emitter, not dispatched to)."""
