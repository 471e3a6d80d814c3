"""Kernels of `aa::guide_add` and `aa::guide_add_rms_norm` (registered in
``aa_compile/ops/guide_add.py``): ``reference.py`` (the numerics spec, ``check_inputs``),
``cpu.py`` (gather + in-place add, ``segment_reduce``; device-generic torch) and
``triton_kernel.py`` (CUDA)."""
