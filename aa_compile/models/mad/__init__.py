"""MAD's layer menu and backbones in plain PyTorch (arXiv 2403.17844): the models the MAD
capability suite (`aa_compile.mad`) trains, and `HATTokenModel`, the HAT model on MAD tokens.
No ``aa::`` op inside."""

from .hat_tokens import HATTokenModel, hat_config
from .layers import (
    LAYERS,
    MLP,
    GatedLinearAttention,
    RotaryAttention,
    SwiGLU,
    apply_rotary,
    causal_window_mask,
    make_layer,
    rotary_tables,
    swiglu_hidden,
)
from .model import DEFAULT_LAYERS, AutoEncoder, LanguageModel, param_count, sincos_positions

__all__ = [
    "DEFAULT_LAYERS",
    "LAYERS",
    "MLP",
    "AutoEncoder",
    "GatedLinearAttention",
    "HATTokenModel",
    "LanguageModel",
    "RotaryAttention",
    "SwiGLU",
    "apply_rotary",
    "causal_window_mask",
    "hat_config",
    "make_layer",
    "param_count",
    "rotary_tables",
    "sincos_positions",
    "swiglu_hidden",
]
