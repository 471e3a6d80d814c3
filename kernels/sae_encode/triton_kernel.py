"""CUDA kernels of `aa::sae_encode`: the forward is cuBLAS (``addmm``) plus ATen's TopK (no fused
Triton encoder yet); the sparse backward runs the trigram-bag Triton kernels through
`aa_compile.kernels.sae_decode.triton_kernel`."""

from __future__ import annotations

from torch import Tensor

from aa_compile.kernels.sae_decode import triton_kernel as decode

from . import cpu


def sae_encode_bwd(grad: Tensor, x: Tensor, weight: Tensor, pre_bias: Tensor, values: Tensor,
                   indices: Tensor, sigmoid: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dx, dweight, dbias, dpre_bias)`` (see ``reference.py``), 16/32-bit floats."""
    return cpu.sae_encode_bwd(grad, x, weight, pre_bias, values, indices, sigmoid,
                              bag=decode.sae_decode_fwd, bag_bwd=decode.sae_decode_bwd)
