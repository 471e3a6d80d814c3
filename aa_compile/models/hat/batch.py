"""`ByteBatch`: documents packed into one byte stream, with the index tensors HAT needs.

Three CSR levels: ``bytes[word_offsets[w]:word_offsets[w + 1]]`` are the bytes of word w,
and words ``doc_offsets[d]:doc_offsets[d + 1]`` belong to document d. Every derived index
(which word and document a byte belongs to, its position in the document, padded per-word and
per-document index grids, next-byte targets) is computed once here on the host, so the model's
forward is made of fixed-shape tensor ops only and compiles without graph breaks.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

import torch
from torch import Tensor

#: target value of byte positions that predict nothing (ignored by the loss)
IGNORE = -100


@dataclasses.dataclass(frozen=True)
class ByteBatch:
    """Packed documents (all tensors int64 or bool, same device). Build with `from_offsets`
    or `from_words`; the derived fields are filled in there, never by hand."""

    #: ``[T]`` byte values 0..255
    bytes: Tensor
    #: ``[W + 1]`` strictly increasing from 0 to T: every word has at least one byte
    word_offsets: Tensor
    #: ``[D + 1]`` non-decreasing from 0 to W (in words; a document may be empty)
    doc_offsets: Tensor
    #: ``[T]`` word index of each byte
    byte_word: Tensor
    #: ``[T]`` document index of each byte
    byte_doc: Tensor
    #: ``[T]`` position of each byte in its document (the RoPE position of encoder/decoder)
    byte_pos: Tensor
    #: ``[W]`` document index of each word
    word_doc: Tensor
    #: ``[W]`` position of each word in its document (the RoPE position of the backbone)
    word_pos: Tensor
    #: ``[W, L]`` byte indices of each word, padded with 0 (L = longest word)
    word_bytes: Tensor
    #: ``[W, L]`` True where ``word_bytes`` is a real byte
    word_mask: Tensor
    #: ``[D, M]`` word indices of each document, padded with 0 (M = most words in a document)
    doc_words: Tensor
    #: ``[D, M]`` True where ``doc_words`` is a real word
    doc_word_mask: Tensor
    #: ``[T]`` the byte each position predicts: ``bytes[t + 1]`` within the same document,
    #: `IGNORE` at the last byte of every document
    targets: Tensor
    #: ``[D + 1]`` byte offsets of the documents (CSR over T; `doc_byte_offsets` as a field, so
    #: a compiled forward sees it as an input and can build the attention mask from it)
    byte_doc_offsets: Tensor

    @property
    def n_bytes(self) -> int:
        return self.bytes.shape[0]

    @property
    def n_words(self) -> int:
        return self.word_offsets.shape[0] - 1

    @property
    def n_docs(self) -> int:
        return self.doc_offsets.shape[0] - 1

    def doc_byte_offsets(self) -> Tensor:
        """``[D + 1]`` byte offsets of the documents."""
        return self.byte_doc_offsets

    def doc_bytes(self, d: int) -> bytes:
        """The bytes of document ``d``."""
        start, end = self.doc_byte_offsets()[d : d + 2].tolist()
        return bytes(self.bytes[start:end].tolist())

    def words(self) -> list[bytes]:
        """Every word's bytes, in order."""
        data = bytes(self.bytes.tolist())
        bounds = self.word_offsets.tolist()
        return [data[a:b] for a, b in itertools.pairwise(bounds)]

    def to(self, device: torch.device | str) -> ByteBatch:
        return dataclasses.replace(self, **{
            f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)})

    @classmethod
    def from_words(cls, docs: Sequence[Sequence[bytes]]) -> ByteBatch:
        """Pack documents given as lists of words (each a non-empty ``bytes``)."""
        if isinstance(docs, (bytes, str)) or not isinstance(docs, Sequence):
            raise TypeError("docs must be a list of documents, each a list of bytes words")
        data, word_offsets, doc_offsets = bytearray(), [0], [0]
        for d, doc in enumerate(docs):
            if isinstance(doc, (bytes, str)) or not isinstance(doc, Sequence):
                raise TypeError(f"docs[{d}] must be a list of bytes words, got "
                                f"{type(doc).__name__}")
            for w, word in enumerate(doc):
                if not isinstance(word, (bytes, bytearray)) or not word:
                    raise ValueError(f"docs[{d}][{w}] must be non-empty bytes, got {word!r}")
                data += word
                word_offsets.append(len(data))
            doc_offsets.append(len(word_offsets) - 1)
        return cls.from_offsets(torch.tensor(list(data), dtype=torch.int64),
                                torch.tensor(word_offsets), torch.tensor(doc_offsets))

    @classmethod
    def from_offsets(cls, bytes: Tensor, word_offsets: Tensor, doc_offsets: Tensor | None = None
                     ) -> ByteBatch:
        """Check the three CSR tensors and derive the index tensors (on their device).
        ``doc_offsets=None`` makes the whole stream one document."""
        data = _int_tensor("bytes", bytes, 1)
        if data.numel() and (int(data.min()) < 0 or int(data.max()) > 255):
            raise ValueError("bytes must hold values 0..255")
        wo = _int_tensor("word_offsets", word_offsets, 1)
        n_bytes = data.shape[0]
        if wo.numel() < 1 or int(wo[0]) != 0 or int(wo[-1]) != n_bytes:
            raise ValueError(f"word_offsets must start at 0 and end at len(bytes)={n_bytes}")
        if (wo.diff() <= 0).any():
            raise ValueError("word_offsets must be strictly increasing: every word needs at "
                             "least one byte")
        n_words = wo.shape[0] - 1
        if doc_offsets is None:
            doc_offsets = torch.tensor([0, n_words], device=wo.device)
        do = _int_tensor("doc_offsets", doc_offsets, 1)
        if do.numel() < 1 or int(do[0]) != 0 or int(do[-1]) != n_words:
            raise ValueError(f"doc_offsets must start at 0 and end at the word count {n_words}")
        if (do.diff() < 0).any():
            raise ValueError("doc_offsets must be non-decreasing")
        dev = data.device
        word_len = wo.diff()
        doc_len = do.diff()
        byte_word = torch.repeat_interleave(torch.arange(n_words, device=dev), word_len)
        word_doc = torch.repeat_interleave(torch.arange(do.shape[0] - 1, device=dev), doc_len)
        byte_doc = word_doc[byte_word]
        doc_start = wo[do[:-1]]
        byte_pos = torch.arange(n_bytes, device=dev) - doc_start[byte_doc]
        word_pos = torch.arange(n_words, device=dev) - do[:-1][word_doc]
        word_bytes, word_mask = _grid(wo, int(word_len.max()) if n_words else 0)
        doc_words, doc_word_mask = _grid(do, int(doc_len.max()) if doc_len.numel() else 0)
        targets = torch.full_like(data, IGNORE)
        if n_bytes > 1:
            same = byte_doc[1:] == byte_doc[:-1]
            targets[:-1] = torch.where(same, data[1:], IGNORE)
        return cls(data, wo, do, byte_word, byte_doc, byte_pos, word_doc, word_pos,
                   word_bytes, word_mask, doc_words, doc_word_mask, targets, wo[do])


def _grid(offsets: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """Rows ``offsets[i] + arange(width)`` masked to each row's length, padded with index 0."""
    cols = torch.arange(width, device=offsets.device)
    index = offsets[:-1, None] + cols
    mask = cols < offsets.diff()[:, None]
    return torch.where(mask, index, 0), mask


def _int_tensor(name: str, t, dim: int) -> Tensor:
    if not isinstance(t, Tensor) or t.dtype not in (torch.int64, torch.int32, torch.uint8,
                                                    torch.int16):
        raise TypeError(f"{name} must be an integer tensor (int64 preferred), got "
                        f"{getattr(t, 'dtype', type(t).__name__)}")
    if t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    return t.to(torch.int64)
