"""HAT (Hierarchical Autoregressive Transformer): the byte/word reference model.

`splitter` (text <-> words <-> bytes, wrapping `hat_splitter`), `batch` (packed `ByteBatch`),
`config` (`HATConfig`), `rope` (RoPE at any position, Llama-3 scaling), `modules` (masked
byte attention, word pooling, guide vector), `model` (`HATModel`: forward, loss, generate),
`generate` (`HATCache`: the KV caches of cached generation), `pretrained` (the released
Hugging Face layout) and `train` (a tiny CPU training run).
"""

from .batch import IGNORE, ByteBatch
from .config import BYTE_VOCAB, EOS_BYTE, NON_UTF8_BYTES, HATConfig
from .generate import ByteWindowCache, HATCache
from .model import HATModel
from .modules import GuideVector, WordPooling, sliding_window_mask
from .rope import Llama3RopeScaling, rope_at
from .splitter import DEFAULT_SPECIAL_TOKENS, HATByteSplitter

__all__ = [
    "BYTE_VOCAB",
    "DEFAULT_SPECIAL_TOKENS",
    "EOS_BYTE",
    "IGNORE",
    "NON_UTF8_BYTES",
    "ByteBatch",
    "ByteWindowCache",
    "GuideVector",
    "HATByteSplitter",
    "HATCache",
    "HATConfig",
    "HATModel",
    "Llama3RopeScaling",
    "WordPooling",
    "rope_at",
    "sliding_window_mask",
]
