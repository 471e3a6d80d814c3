"""Token-labelled concepts on the offline corpora (byte tokens), with held-out document splits.

Three concepts, labels per byte token:

- ``german`` (semantic): the token belongs to a German document (label broadcast to every token
  of the text, as SCAR/G-SAE broadcast a prompt's toxicity label);
- ``digit``: the byte is an ASCII digit;
- ``uppercase``: the byte is an ASCII capital letter.

Documents of ``aa_compile.data.documents("en")`` and ``("de")`` are split by position: every
``test_every``-th document is held out (``split="test"``), the rest is ``split="train"``.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from aa_compile.data import documents

CONCEPTS = ("german", "digit", "uppercase")
SPLITS = ("train", "test")
TEST_EVERY = 5


@dataclasses.dataclass
class ConceptWindows:
    """Byte windows of the corpora and their concept labels."""

    ids: Tensor         # [N, S] int64 byte ids
    labels: Tensor      # [N, S, C] float {0, 1}
    concepts: tuple[str, ...]

    def window_labels(self, concept: str) -> Tensor:
        """One label per window: the share of its tokens carrying the concept is >= 0.5."""
        c = self.concepts.index(concept)
        return (self.labels[..., c].mean(1) >= 0.5).long()


def split_documents(language: str, split: str) -> list[str]:
    """The documents of one language in one split."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    docs = documents(language)
    keep = (lambda i: i % TEST_EVERY == TEST_EVERY - 1) if split == "test" else \
        (lambda i: i % TEST_EVERY != TEST_EVERY - 1)
    return [d for i, d in enumerate(docs) if keep(i)]


def byte_labels(data: bytes, german: bool) -> Tensor:
    """``[len(data), 3]`` labels of the concepts for one run of bytes of one document."""
    ids = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    digit = (ids >= ord("0")) & (ids <= ord("9"))
    upper = (ids >= ord("A")) & (ids <= ord("Z"))
    return torch.stack([torch.full_like(ids, int(german)).bool(), digit, upper], dim=1).float()


def concept_windows(split: str = "train", *, n_windows: int = 256, seq_len: int = 64,
                    seed: int = 0) -> ConceptWindows:
    """``n_windows`` random byte windows, half from English and half from German documents."""
    if n_windows <= 0 or seq_len <= 0:
        raise ValueError(f"n_windows and seq_len must be > 0, got {n_windows}, {seq_len}")
    gen = torch.Generator().manual_seed(seed)
    ids, labels = [], []
    for lang_i, language in enumerate(("en", "de")):
        data = [d.encode("utf-8") for d in split_documents(language, split)]
        data = [d for d in data if len(d) > seq_len]
        count = n_windows // 2 + (n_windows % 2 if lang_i == 0 else 0)
        for _ in range(count):
            doc = data[int(torch.randint(len(data), (1,), generator=gen))]
            start = int(torch.randint(len(doc) - seq_len, (1,), generator=gen))
            chunk = doc[start:start + seq_len]
            ids.append(torch.frombuffer(bytearray(chunk), dtype=torch.uint8).long())
            labels.append(byte_labels(chunk, language == "de"))
    return ConceptWindows(torch.stack(ids), torch.stack(labels), CONCEPTS)


def concept_batches(windows: ConceptWindows, batch_size: int):
    """``(ids, labels)`` batches of the windows, in order (for `collect_activations`)."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    for i in range(0, len(windows.ids), batch_size):
        yield windows.ids[i:i + batch_size], windows.labels[i:i + batch_size]


def balanced_tokens(labels: Tensor, concept: int, n_per_class: int, seed: int = 0) -> Tensor:
    """Indices of up to ``n_per_class`` positive and as many negative tokens of one concept
    (token-level concepts are rare, and FMS on a 1% base rate measures the majority class)."""
    if labels.dim() != 2 or not 0 <= concept < labels.shape[1]:
        raise ValueError(f"labels must be [tokens, concepts] with concept {concept} in range, "
                         f"got shape {tuple(labels.shape)}")
    gen = torch.Generator().manual_seed(seed)
    picked = []
    for value in (1.0, 0.0):
        idx = torch.nonzero(labels[:, concept] == value).flatten()
        picked.append(idx[torch.randperm(len(idx), generator=gen)[:n_per_class]])
    n = min(len(p) for p in picked)
    return torch.cat([p[:n] for p in picked])
