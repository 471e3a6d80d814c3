"""Device kernels of the `aa::` ops (shipped as ``aa_compile.kernels``).

One sub-package per op family. Each holds ``reference.py`` (plain PyTorch, the numerics spec),
a CPU path, and a Triton path for CUDA. Ops in ``aa_compile.ops`` dispatch into these.
"""
