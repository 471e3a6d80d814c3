"""`HATConfig`: the shape of a HAT model (byte encoder, word backbone, byte decoder).

Each of the three stacks is described by a `TransformerConfig` (the reference transformer's
config), so the Llama-style blocks are shared with `aa_compile.models.transformer`. Fields of
those configs that a stack does not use: ``vocab_size`` and ``tie_embeddings`` of the backbone
(it has no embedding and no head), ``max_seq_len`` everywhere (RoPE angles are computed from
the positions themselves, so there is no position table to overflow).
"""

from __future__ import annotations

import dataclasses

from aa_compile.models.transformer import TransformerConfig

from .rope import Llama3RopeScaling

#: byte vocabulary of the encoder embedding and the decoder head
BYTE_VOCAB = 256
#: the end-of-text byte (``<|eot_id|>``); 0xC0 never occurs in valid UTF-8
EOS_BYTE = 192
#: bytes that never occur in valid UTF-8: the only ones EOS and special tokens may use
NON_UTF8_BYTES = frozenset([0xC0, 0xC1, *range(0xF5, 0x100)])


def _stack(d_model: int, n_layers: int, n_heads: int, n_kv_heads: int | None = None,
           d_ff: int | None = None, rope_theta: float = 10000.0) -> TransformerConfig:
    return TransformerConfig(vocab_size=BYTE_VOCAB, d_model=d_model, n_layers=n_layers,
                             n_heads=n_heads, n_kv_heads=n_kv_heads, d_ff=d_ff,
                             rope_theta=rope_theta)


@dataclasses.dataclass(frozen=True)
class HATConfig:
    """Shape of a HAT model. ``decoder.d_model`` must equal ``encoder.d_model``: the decoder
    reads the encoder's byte activations (it has no byte embedding of its own).

    Args:
        encoder: byte encoder stack (``vocab_size`` must be 256).
        backbone: word-level stack (its ``vocab_size`` is ignored).
        decoder: byte decoder stack (``vocab_size`` must be 256; its heads/kv heads are also
            those of the guide vector's v/o projections).
        sliding_window: bytes a query sees in the encoder and decoder, itself included.
        pool_heads: heads of the latent-query pooling (must divide ``backbone.d_model``).
        pool_qk_norm: per-head RMSNorm on the pooling query and keys.
        pool_rope: RoPE in the pooling as the released models have it: the query at the
            word's position, the keys at their bytes' positions (with the encoder's
            ``rope_theta``, at the pooling head size). Off by default (see `WordPooling`).
        guide_every_layer: add a guide vector before every decoder layer, not only the first.
        max_word_bytes: longest word in bytes (longer words are cut into chunks).
        eos_byte: the byte that ends generation.
        backbone_rope_scaling: Llama-3 RoPE frequency scaling of the backbone (the released
            8B/70B backbones are Llama-3.1); a `Llama3RopeScaling` or its fields as a dict.
    """

    encoder: TransformerConfig = dataclasses.field(
        default_factory=lambda: _stack(1024, 6, 8))
    backbone: TransformerConfig = dataclasses.field(
        default_factory=lambda: TransformerConfig(vocab_size=1, d_model=4096, n_layers=32,
                                                  n_heads=32, n_kv_heads=8, d_ff=14336,
                                                  rope_theta=500000.0))
    decoder: TransformerConfig = dataclasses.field(
        default_factory=lambda: _stack(1024, 4, 8))
    sliding_window: int = 768
    pool_heads: int = 8
    pool_qk_norm: bool = True
    guide_every_layer: bool = False
    max_word_bytes: int = 100
    eos_byte: int = EOS_BYTE
    pool_rope: bool = False
    backbone_rope_scaling: Llama3RopeScaling | None = None

    def __post_init__(self) -> None:
        scaling = self.backbone_rope_scaling
        if isinstance(scaling, dict):  # as a saved JSON config holds it
            object.__setattr__(self, "backbone_rope_scaling", Llama3RopeScaling(**scaling))
        elif scaling is not None and not isinstance(scaling, Llama3RopeScaling):
            raise TypeError(f"HATConfig.backbone_rope_scaling must be None or a "
                            f"Llama3RopeScaling, got {type(scaling).__name__}")
        for name in ("encoder", "backbone", "decoder"):
            if not isinstance(getattr(self, name), TransformerConfig):
                raise TypeError(f"HATConfig.{name} must be a TransformerConfig, got "
                                f"{type(getattr(self, name)).__name__}")
        for name in ("encoder", "decoder"):
            if getattr(self, name).vocab_size != BYTE_VOCAB:
                raise ValueError(f"HATConfig.{name}.vocab_size must be {BYTE_VOCAB} (bytes), "
                                 f"got {getattr(self, name).vocab_size}")
        if self.decoder.d_model != self.encoder.d_model:
            raise ValueError(f"HATConfig: decoder.d_model={self.decoder.d_model} must equal "
                             f"encoder.d_model={self.encoder.d_model} (the decoder reads the "
                             "encoder's byte activations)")
        for name, low in (("sliding_window", 1), ("pool_heads", 1), ("max_word_bytes", 4)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"HATConfig.{name} must be an int >= {low}, got {value!r}"
                                 + ("; 4 bytes keep every UTF-8 character whole"
                                    if name == "max_word_bytes" else ""))
        if self.backbone.d_model % self.pool_heads:
            raise ValueError(f"HATConfig: pool_heads={self.pool_heads} must divide "
                             f"backbone.d_model={self.backbone.d_model}")
        if (self.backbone.d_model // self.pool_heads) % 2:
            raise ValueError("HATConfig: backbone.d_model / pool_heads must be even")
        if isinstance(self.eos_byte, bool) or self.eos_byte not in NON_UTF8_BYTES:
            raise ValueError(f"HATConfig.eos_byte must be a byte that never occurs in valid "
                             f"UTF-8 (0xC0, 0xC1, 0xF5..0xFF), got {self.eos_byte!r}")
        for name in ("pool_qk_norm", "guide_every_layer", "pool_rope"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"HATConfig.{name} must be a bool, got {getattr(self, name)!r}")

    @property
    def d_enc(self) -> int:
        return self.encoder.d_model

    @property
    def d_backbone(self) -> int:
        return self.backbone.d_model

    @classmethod
    def tiny(cls, **overrides) -> HATConfig:
        """A few-hundred-thousand-parameter model for tests and CPU training runs."""
        fields = {
            "encoder": _stack(64, 1, 4, d_ff=128),
            "backbone": TransformerConfig(vocab_size=1, d_model=96, n_layers=2, n_heads=4,
                                          n_kv_heads=2, d_ff=192),
            "decoder": _stack(64, 1, 4, n_kv_heads=2, d_ff=128),
            "sliding_window": 64, "pool_heads": 4, "max_word_bytes": 32,
        }
        fields.update(overrides)
        return cls(**fields)
