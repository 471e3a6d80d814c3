"""Kernels of `aa::sae_decode` (registered in ``aa_compile/ops/sae_decode.py``): ``reference.py``
(numerics spec and ``check_inputs``), ``cpu.py`` and ``triton_kernel.py``, both the trigram-bag
kernels on the TopK latents seen as bags of k decoder rows."""
