"""`HATTokenModel`: the library's HAT model (`aa_compile.models.hat`) on MAD token ids.

HAT reads bytes grouped into words. A MAD token becomes one byte (so the vocabulary must fit in
256), every ``word_len`` tokens form one word, and every sequence is one document. The byte
encoder and decoder see the whole sequence (their sliding window is ``max_length``), so the
byte stacks alone can still find any earlier token; the word backbone adds a summary of the
earlier words. The logits of byte t (which HAT trains to predict byte t + 1) are returned for
position t, cut to the task's vocabulary: ``[B, S] -> [B, S, vocab]``, like the MAD stacks.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from aa_compile.models.hat import BYTE_VOCAB, ByteBatch, HATConfig, HATModel
from aa_compile.models.transformer import TransformerConfig


def hat_config(dim: int, max_length: int, word_len: int, heads: int | None = None,
               encoder_layers: int = 1, backbone_layers: int = 2, decoder_layers: int = 1
               ) -> HATConfig:
    """A small HAT: ``dim``-wide byte stacks and backbone, heads of width 16 by default."""
    heads = heads or max(1, dim // 16)

    def stack(vocab: int, layers: int) -> TransformerConfig:
        return TransformerConfig(vocab_size=vocab, d_model=dim, n_layers=layers, n_heads=heads,
                                 d_ff=2 * dim, max_seq_len=max_length)
    return HATConfig(encoder=stack(BYTE_VOCAB, encoder_layers),
                     backbone=stack(1, backbone_layers), decoder=stack(BYTE_VOCAB, decoder_layers),
                     sliding_window=max_length, pool_heads=heads,
                     max_word_bytes=max(4, word_len))  # (the text splitter needs 4)


class HATTokenModel(nn.Module):
    """HAT over MAD tokens: one byte per token, ``word_len`` tokens per word, one document per
    sequence (see the module doc)."""

    def __init__(self, vocab_size: int, dim: int = 64, max_length: int = 1280,
                 word_len: int = 2, **hat_kwargs) -> None:
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("dim", dim),
                            ("max_length", max_length), ("word_len", word_len)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if vocab_size > BYTE_VOCAB:
            raise ValueError(f"HAT reads bytes: vocab_size={vocab_size} does not fit in "
                             f"{BYTE_VOCAB} byte values")
        self.vocab_size, self.max_length, self.word_len = vocab_size, max_length, word_len
        self.hat = HATModel(hat_config(dim, max_length, word_len, **hat_kwargs))

    @torch.compiler.disable
    def batch_for(self, input_ids: Tensor) -> ByteBatch:
        """The packed `ByteBatch` of ``[B, S]`` ids: B documents of ``ceil(S / word_len)``
        words (the last one shorter when ``word_len`` does not divide S). Built on the host
        outside any compiled graph, as HAT's own callers build their batches."""
        if input_ids.numel() and (int(input_ids.min()) < 0
                                  or int(input_ids.max()) >= self.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.vocab_size})")
        b, s = input_ids.shape
        starts = torch.arange(0, s, self.word_len)
        per_doc = starts.numel()
        word_starts = (torch.arange(b)[:, None] * s + starts[None, :]).reshape(-1)
        word_offsets = torch.cat([word_starts, torch.tensor([b * s])])
        doc_offsets = torch.arange(b + 1) * per_doc
        return ByteBatch.from_offsets(input_ids.reshape(-1).cpu(), word_offsets, doc_offsets
                                      ).to(input_ids.device)

    def forward(self, input_ids: Tensor) -> Tensor:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got {tuple(input_ids.shape)}")
        b, s = input_ids.shape
        if s > self.max_length:
            raise ValueError(f"sequence length {s} exceeds max_length={self.max_length}")
        logits = self.hat(self.batch_for(input_ids))
        return logits.view(b, s, BYTE_VOCAB)[..., :self.vocab_size]
