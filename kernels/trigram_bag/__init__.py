"""Kernels of `aa::trigram_bag` (registered in ``aa_compile/ops/trigram_bag.py``): ``reference.py``
(the numerics spec and ``check_inputs``), ``cpu.py`` with ``cpu_avx2.py`` (CPU; its ATen path
serves any device) and ``triton_kernel.py`` (CUDA)."""
