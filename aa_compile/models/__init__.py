"""Lean reference models: the numerics spec of each technique. No aa:: kernels inside."""

from .transformer import KVCache, Transformer, TransformerConfig

__all__ = ["KVCache", "Transformer", "TransformerConfig"]
