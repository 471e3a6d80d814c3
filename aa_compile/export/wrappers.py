"""Modules that give each model family a forward of tensors only, as an export needs, and
their example inputs: Hugging Face causal LMs (``ids -> logits``), the T-FREE LM (trigram slots
and their words, the batch x sequence grid bound) and HAT (the fields of a ``ByteBatch``)."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from aa_compile.models.hat import HATModel
from aa_compile.models.hat.batch import ByteBatch
from aa_compile.models.tfree import TFreeLM, TrigramTokenizer
from aa_compile.models.tfree.lm import TFreeInputs

#: the tensors of a `ByteBatch`, in the order `HATBytes.forward` takes them
BYTE_BATCH_FIELDS = tuple(f.name for f in dataclasses.fields(ByteBatch))


class CausalLMLogits(nn.Module):
    """A Hugging Face causal LM as ``ids -> logits`` (no KV cache, no output object)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, use_cache=False).logits


class TFreeWords(nn.Module):
    """`TFreeLM` on ``(trigram_slots, word_of_trigram)`` with its ``batch`` x ``seq`` word grid
    bound (ints, not tensors); the number of trigrams may vary."""

    def __init__(self, lm: TFreeLM, batch: int, seq: int) -> None:
        super().__init__()
        self.lm, self.batch, self.seq = lm, batch, seq

    def forward(self, trigram_slots: torch.Tensor, word_of_trigram: torch.Tensor) -> torch.Tensor:
        return self.lm(trigram_slots, word_of_trigram, self.batch, self.seq)

    @staticmethod
    def example(tokenizer: TrigramTokenizer, words: list[list[str]]) -> tuple[torch.Tensor, ...]:
        """The inputs of ``words`` (one equally long word list per sequence)."""
        enc = TFreeInputs.from_words(tokenizer, words, targets=False)
        return enc.trigram_slots, enc.word_of_trigram


class HATBytes(nn.Module):
    """`HATModel` on the tensors of a `ByteBatch` (`BYTE_BATCH_FIELDS`, in order)."""

    def __init__(self, model: HATModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, *fields: torch.Tensor) -> torch.Tensor:
        return self.model(ByteBatch(**dict(zip(BYTE_BATCH_FIELDS, fields))))

    @staticmethod
    def example(model: HATModel, texts: list[str]) -> tuple[torch.Tensor, ...]:
        """The inputs of ``texts`` (one document each), split by the model's splitter."""
        batch = model.splitter.encode(texts)
        return tuple(getattr(batch, f) for f in BYTE_BATCH_FIELDS)
