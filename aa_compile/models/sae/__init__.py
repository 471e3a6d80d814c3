"""Concept sparse autoencoders (SCAR, G-SAE): the reference autoencoder and its losses.

Plain PyTorch, the numerics spec of the technique: no ``aa::`` op inside (the task API
``aa_compile.sae`` and the ops ``aa::sae_encode`` / ``aa::sae_decode`` build on it).
"""

from .losses import (
    LossParts,
    auxk_loss,
    concept_loss,
    normalized_mse,
    sae_loss,
    scale_positive_grad,
)
from .model import ACTIVATIONS, SAEConfig, SAEOutput, SparseAutoencoder

__all__ = [
    "ACTIVATIONS", "LossParts", "SAEConfig", "SAEOutput", "SparseAutoencoder", "auxk_loss",
    "concept_loss", "normalized_mse", "sae_loss", "scale_positive_grad",
]
