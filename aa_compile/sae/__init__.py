"""Concept SAEs (SCAR, G-SAE) as a task: activation store, local concepts, training, FMS.

Reads a model's activations at a site (``block.<i>`` / ``mlp.<i>``), trains a sparse autoencoder
whose first latents are conditioned on concept labels, measures how monosemantic its latents are
with FMS, and steers / detects concepts inside compiled graphs (`attach`). The reference
autoencoder and its losses live in ``aa_compile.models.sae``.
"""

from aa_compile.models.sae import SAEConfig, SparseAutoencoder

from .concepts import CONCEPTS, ConceptWindows, balanced_tokens, concept_batches, concept_windows
from .fms import FMSResult, concept_fms, depth_accuracies, fms_scores, pooled_latents
from .sites import available_sites, site_module
from .steering import MODES, SteeredModel, SteeredOutput, SteeredSite, attach
from .store import ActivationStore, collect_activations
from .training import KINDS, TrainConfig, sae_config_for, train_sae

__all__ = [
    "CONCEPTS", "KINDS", "MODES", "ActivationStore", "ConceptWindows", "FMSResult", "SAEConfig",
    "SteeredModel", "SteeredOutput", "SteeredSite", "SparseAutoencoder", "TrainConfig", "available_sites", "balanced_tokens", "collect_activations",
    "concept_batches", "concept_fms", "concept_windows", "depth_accuracies", "fms_scores",
    "attach", "pooled_latents", "sae_config_for", "site_module", "train_sae",
]
