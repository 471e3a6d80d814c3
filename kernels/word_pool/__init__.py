"""Kernels of `aa::word_pool` (registered in ``aa_compile/ops/word_pool.py``): ``reference.py``
(padded masked attention, the numerics spec, ``check_inputs``), ``cpu.py`` (the segment path:
device-generic torch over the bytes present) and ``triton_kernel.py`` (CUDA)."""
