"""u-μP (unit-scaled maximal update parametrisation, arXiv 2407.17465): the reference.

`functional` holds the unit-scaled ops with their scaling rules; `model` the u-μP transformer
and its optimiser param groups. Plain PyTorch, no ``aa::`` ops: this is the numerics spec the
FP8 passes rewrite.
"""

from .functional import (
    attention_output_scale,
    linear_scales,
    log_interpolate,
    residual_add,
    residual_scales,
    residual_split,
    residual_taus,
    rms_norm,
    scaled,
    silu_glu_scale,
    unit_attention,
    unit_cross_entropy,
    unit_embedding,
    unit_linear,
    unit_silu_glu,
)
from .model import (
    UmupAttention,
    UmupBlock,
    UmupConfig,
    UmupMLP,
    UmupTransformer,
    UnitRMSNorm,
    UnitScaledEmbedding,
    UnitScaledLinear,
    umup_lr_scale,
    umup_param_groups,
)

__all__ = [
    "UmupAttention",
    "UmupBlock",
    "UmupConfig",
    "UmupMLP",
    "UmupTransformer",
    "UnitRMSNorm",
    "UnitScaledEmbedding",
    "UnitScaledLinear",
    "attention_output_scale",
    "linear_scales",
    "log_interpolate",
    "residual_add",
    "residual_scales",
    "residual_split",
    "residual_taus",
    "rms_norm",
    "scaled",
    "silu_glu_scale",
    "umup_lr_scale",
    "umup_param_groups",
    "unit_attention",
    "unit_cross_entropy",
    "unit_embedding",
    "unit_linear",
    "unit_silu_glu",
]
