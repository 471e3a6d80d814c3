"""Kernels of `aa::int8_linear` (registered in ``aa_compile/ops/int8_linear.py``): ``reference.py``
(the numerics spec and the absmax quantiser), ``cpu.py`` (``cpu_avx2.py``'s C kernel for small
``M``, blocked dequantise + GEMM otherwise) and ``triton_kernel.py`` (CUDA)."""
