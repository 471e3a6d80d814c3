"""`TFreeLMConfig`: the shape of a `TFreeLM` (its own module so that the released-checkpoint
reader `pretrained` and the model `lm` both use it without importing each other)."""

from __future__ import annotations

import dataclasses

from ..transformer import TransformerConfig
from .tokenizer import TrigramTokenizer


@dataclasses.dataclass(frozen=True)
class TFreeLMConfig:
    """Shape of a `TFreeLM`. ``vocab_size`` and ``m`` must match the tokenizer's.

    ``d_ff`` (the SwiGLU width), ``norm_eps`` and ``rope_theta`` default to the reference
    transformer's (``d_ff=None``: its 8/3·d rule), so models saved before these fields existed
    load unchanged; a released checkpoint sets them from its config (``mlp_factor``,
    ``layernorm_epsilon``, ``rotary_embedding_base``).
    """

    vocab_size: int = 8192
    m: int = 10
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None
    max_seq_len: int = 512
    aggregation: str = "sum"
    pos_weight: float = 300.0
    loss_scale: float = 100.0
    d_ff: int | None = None
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0

    def transformer(self) -> TransformerConfig:
        """The backbone's config (validates the shared fields)."""
        if self.d_ff is not None and (isinstance(self.d_ff, bool) or not isinstance(self.d_ff, int)
                                      or self.d_ff < 1):
            raise ValueError(f"TFreeLMConfig.d_ff must be None or a positive int, got "
                             f"{self.d_ff!r}")
        return TransformerConfig(vocab_size=self.vocab_size, d_model=self.d_model,
                                 n_layers=self.n_layers, n_heads=self.n_heads,
                                 n_kv_heads=self.n_kv_heads, d_ff=self.d_ff,
                                 max_seq_len=self.max_seq_len, rope_theta=float(self.rope_theta),
                                 norm_eps=float(self.norm_eps))

    def check_tokenizer(self, tokenizer: TrigramTokenizer) -> None:
        if (tokenizer.vocab_size, tokenizer.m) != (self.vocab_size, self.m):
            raise ValueError(
                f"tokenizer (vocab_size={tokenizer.vocab_size}, m={tokenizer.m}) does not match "
                f"the model (vocab_size={self.vocab_size}, m={self.m})")


__all__ = ["TFreeLMConfig"]
