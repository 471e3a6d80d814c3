"""Modules that give each model family a forward of tensors only, as an export needs, their
example inputs and (T-FREE, HAT) their dynamic shapes: Hugging Face causal LMs (``ids ->
logits``), the T-FREE LM (trigram slots, their words and a ``[batch, seq]`` grid) and HAT (the
fields of a ``ByteBatch``)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch.export import Dim
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
    """`TFreeLM` on ``(trigram_slots, word_of_trigram, word_grid)``: ``word_grid`` is any
    ``[batch, seq]`` tensor (only its shape is read: `example` gives each word's index), so
    batch, sequence and the number of trigrams may all vary in an export (`dynamic_shapes`)."""

    def __init__(self, lm: TFreeLM) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, trigram_slots: torch.Tensor, word_of_trigram: torch.Tensor,
                word_grid: torch.Tensor) -> torch.Tensor:
        batch, seq = word_grid.shape
        return self.lm(trigram_slots, word_of_trigram, batch, seq)

    @staticmethod
    def example(tokenizer: TrigramTokenizer, words: list[list[str]]) -> tuple[torch.Tensor, ...]:
        """The inputs of ``words`` (one equally long word list per sequence)."""
        enc = TFreeInputs.from_words(tokenizer, words, targets=False)
        grid = torch.arange(enc.batch * enc.seq).view(enc.batch, enc.seq)
        return enc.trigram_slots, enc.word_of_trigram, grid

    def dynamic_shapes(self) -> tuple[dict[int, Any], ...]:
        """Trigrams, batch and sequence dynamic; the sequence at most the model's
        ``max_seq_len`` (its RoPE table)."""
        trigrams = Dim("trigrams", min=1)
        seq = Dim("seq", min=1, max=self.lm.tcfg.max_seq_len)
        return {0: trigrams}, {0: trigrams}, {0: Dim("batch", min=1), 1: seq}


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

    @staticmethod
    def dynamic_shapes() -> tuple[dict[int, Any], ...]:
        """Every size of a `ByteBatch` dynamic, tied as the fields share them: bytes ``T``,
        words ``W`` (offsets ``W + 1``), documents ``D`` (offsets ``D + 1``), the longest word
        ``L`` and the most words in a document ``M``."""
        t, w, d = Dim("bytes", min=1), Dim("words", min=1), Dim("docs", min=1)
        longest, most = Dim("longest_word", min=1), Dim("most_words", min=1)
        dims = {"bytes": {0: t}, "word_offsets": {0: w + 1}, "doc_offsets": {0: d + 1},
                "byte_word": {0: t}, "byte_doc": {0: t}, "byte_pos": {0: t},
                "word_doc": {0: w}, "word_pos": {0: w}, "word_bytes": {0: w, 1: longest},
                "word_mask": {0: w, 1: longest}, "doc_words": {0: d, 1: most},
                "doc_word_mask": {0: d, 1: most}, "targets": {0: t},
                "byte_doc_offsets": {0: d + 1}}
        return tuple(dims[f] for f in BYTE_BATCH_FIELDS)
