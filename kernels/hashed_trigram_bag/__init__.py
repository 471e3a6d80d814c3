"""Kernels of `aa::hashed_trigram_bag` (registered in ``aa_compile/ops/hashed_trigram_bag.py``):
``reference.py`` (the numerics spec, hashing with ``kernels/tfree_hashing.py``), ``cpu.py`` (the
hash in torch ops, then the trigram-bag CPU kernels; serves any device) and ``triton_kernel.py``
(CUDA: the hash inside the kernel)."""
