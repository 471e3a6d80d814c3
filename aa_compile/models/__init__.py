"""Lean reference models: the numerics spec of each technique. No aa:: kernels inside.

`save_model` / `load_model` (module `checkpoint`) write and read any of them as a directory of
safetensors weights and a JSON config; every training CLI's ``--out`` writes one.
"""

from .checkpoint import (
    ByteTokenizer,
    load_model,
    load_tokenizer,
    load_words,
    register_kind,
    register_tokenizer,
    save_model,
)
from .hat import HATConfig, HATModel
from .tfree import TFreeLM, TFreeLMConfig, TrigramTokenizer
from .transformer import KVCache, Transformer, TransformerConfig
from .umup import UmupConfig, UmupTransformer

register_kind("transformer", Transformer, TransformerConfig)
register_kind("tfree", TFreeLM, TFreeLMConfig)
register_kind("hat", HATModel, HATConfig)
register_kind("umup", UmupTransformer, UmupConfig)
register_tokenizer("trigram", TrigramTokenizer)

__all__ = [
    "ByteTokenizer",
    "KVCache",
    "Transformer",
    "TransformerConfig",
    "load_model",
    "load_tokenizer",
    "load_words",
    "register_kind",
    "register_tokenizer",
    "save_model",
]
