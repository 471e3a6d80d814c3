"""Kernels of `aa::dictionary_score` (registered in ``aa_compile/ops/dictionary_score.py``):
``reference.py`` (the numerics spec, the top-k tie order and the input checks), ``cpu.py``
(ATen's embedding bag and a candidate top-k; ATen ops only, so it runs on every device) and
``triton_kernel.py`` (CUDA: segment sums and normalisation in one kernel)."""
