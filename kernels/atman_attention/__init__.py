"""Kernels of `aa::atman_attention` (registered in ``aa_compile/ops/atman_attention.py``):
``reference.py`` (dense float64, the numerics spec), ``cpu.py`` (fused flash attention per key
part, merged by log-sum-exp) and ``triton_kernel.py`` (CUDA, flash-style with the suppression in
the key loop)."""
