"""Kernels of `aa::rms_norm` (registered in ``aa_compile/ops/rms_norm.py``): ``reference.py``
(the numerics spec), ``cpu.py`` (eager CPU) and ``triton_kernel.py`` (CUDA)."""
