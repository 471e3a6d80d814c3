"""Kernels of `aa::window_attention` (registered in ``aa_compile/ops/window_attention.py``):
``reference.py`` (dense masked attention, the numerics spec, ``check_inputs``), ``layout.py``
(the per-position key / query ranges), ``blocked.py`` (query blocking and a device-generic
path), ``cpu.py`` (ATen's CPU flash kernel over the blocks) and ``triton_kernel.py`` (CUDA)."""
