"""Kernels of `aa::sae_encode` (registered in ``aa_compile/ops/sae_encode.py``): ``reference.py``
(numerics spec, tie rule and ``check_inputs``), ``cpu.py`` (any device: matmul, TopK,
activation; sparse backward on the trigram-bag kernels) and ``triton_kernel.py`` (CUDA: the
fused linear + TopK + activation forward, and the backward on the trigram-bag Triton
kernels)."""
