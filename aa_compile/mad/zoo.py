"""The models the MAD suite can train, by name: MAD layer stacks and adapters for the library's
reference models.

A `ModelSpec` builds a fresh model for a setting's vocabulary and length, and may hand the
optimiser its own parameter groups (u-μP scales each tensor's learning rate). The compression
task needs an encoder-decoder, so only the MAD stacks (built as an `AutoEncoder` there) take it;
the HAT adapter reads bytes, so it takes vocabularies of at most 256.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from torch import nn

from aa_compile.models import Transformer, TransformerConfig
from aa_compile.models.mad import AutoEncoder, HATTokenModel, LanguageModel
from aa_compile.models.umup import UmupConfig, UmupTransformer, umup_param_groups

from .settings import Setting


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """``build(vocab_size, max_length, dim, autoencoder) -> nn.Module`` returning logits
    ``[B, S, vocab]``; ``param_groups(model, lr, wd)`` or None for one AdamW group."""

    name: str
    build: Callable[[int, int, int, bool], nn.Module]
    param_groups: Callable[[nn.Module, float, float], list[dict]] | None = None
    autoencoder: bool = False  # can build an AutoEncoder for the compression task
    max_vocab: int | None = None  # the largest vocabulary it can read (None: any)

    def supports(self, task: str) -> bool:
        return task != "compression" or self.autoencoder

    def takes(self, setting: Setting) -> bool:
        """Whether it can train on ``setting``: the task (`supports`) and the vocabulary."""
        return self.supports(setting.task) and (self.max_vocab is None
                                                or setting.vocab_size <= self.max_vocab)

    def model_for(self, setting: Setting, dim: int) -> nn.Module:
        if not self.supports(setting.task):
            raise ValueError(f"model {self.name!r} has no encoder-decoder form for "
                             f"{setting.task!r}")
        if not self.takes(setting):
            raise ValueError(f"model {self.name!r} reads at most {self.max_vocab} tokens; "
                             f"{setting.name!r} has a vocabulary of {setting.vocab_size}")
        return self.build(setting.vocab_size, setting.seq_len + 1, dim,
                          setting.task == "compression")


def mad_stack(layers: Sequence[str]) -> Callable[[int, int, int, bool], nn.Module]:
    """Builder of a MAD `LanguageModel` / `AutoEncoder` over ``layers``."""
    def build(vocab: int, max_length: int, dim: int, autoencoder: bool) -> nn.Module:
        cls = AutoEncoder if autoencoder else LanguageModel
        return cls(vocab, layers=tuple(layers), dim=dim, max_length=max_length)
    return build


def reference_transformer(vocab: int, max_length: int, dim: int, autoencoder: bool) -> nn.Module:
    """The library's Llama-style `Transformer`: 2 blocks, heads of width 16 (at least 1 head)."""
    heads = max(1, dim // 16)
    return Transformer(TransformerConfig(vocab_size=vocab, d_model=dim, n_layers=2,
                                         n_heads=heads, max_seq_len=max_length))


def reference_umup(vocab: int, max_length: int, dim: int, autoencoder: bool) -> nn.Module:
    """The library's u-μP transformer, 2 blocks, heads of width 16 (at least 1 head)."""
    heads = max(1, dim // 16)
    return UmupTransformer(UmupConfig(vocab_size=max(vocab, 2), d_model=dim, n_layers=2,
                                      n_heads=heads, max_seq_len=max_length))


def reference_hat(vocab: int, max_length: int, dim: int, autoencoder: bool) -> nn.Module:
    """The library's HAT model on MAD tokens (`HATTokenModel`): one byte per token, words of
    two tokens (a key-value pair in the recall tasks, a key and its insert token in
    memorization), 1 + 2 + 1 layers."""
    return HATTokenModel(vocab, dim=dim, max_length=max_length, word_len=2)


def umup_groups(model: nn.Module, lr: float, wd: float) -> list[dict]:
    if not isinstance(model, UmupTransformer):
        raise TypeError(f"umup_groups expects a UmupTransformer, got {type(model).__name__}")
    return umup_param_groups(model, lr, wd)


MODELS: dict[str, ModelSpec] = {
    "attention-swiglu": ModelSpec(
        "attention-swiglu", mad_stack(("mh-attention", "swiglu") * 2), autoencoder=True),
    "attention4-swiglu": ModelSpec(
        "attention4-swiglu", mad_stack(("mh4-attention", "swiglu") * 2), autoencoder=True),
    "sliding-attention-swiglu": ModelSpec(
        "sliding-attention-swiglu", mad_stack(("mh-sliding-attention", "swiglu") * 2),
        autoencoder=True),
    "gla-swiglu": ModelSpec(
        "gla-swiglu", mad_stack(("mh-gated-linear-attention", "swiglu") * 2), autoencoder=True),
    "attention-mlp": ModelSpec(
        "attention-mlp", mad_stack(("mh-attention", "mlp") * 2), autoencoder=True),
    "transformer": ModelSpec("transformer", reference_transformer),
    "umup": ModelSpec("umup", reference_umup, param_groups=umup_groups),
    "hat": ModelSpec("hat", reference_hat, max_vocab=256),
}


def model_spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ValueError(f"unknown MAD model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name]
