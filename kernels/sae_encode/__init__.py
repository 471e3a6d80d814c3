"""Kernels of `aa::sae_encode` (registered in ``aa_compile/ops/sae_encode.py``): ``reference.py``
(numerics spec and ``check_inputs``), ``cpu.py`` (any device: matmul, TopK, activation; sparse
backward on the trigram-bag kernels) and ``triton_kernel.py`` (CUDA backward on the trigram-bag
Triton kernels)."""
