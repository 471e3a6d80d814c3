"""Prompts for DTM runs: byte-level windows of the offline corpora (`aa_compile.data`)."""

from __future__ import annotations

import torch
from torch import Tensor

from aa_compile.data import text


def byte_prompts(n_prompts: int, prompt_len: int, language: str = "mixed", seed: int = 0,
                 held_out: float = 0.1) -> Tensor:
    """``[n_prompts, prompt_len]`` int64 byte ids from random windows of the last ``held_out``
    share of the corpus (the part `bench/train_reference.py` does not train on)."""
    if prompt_len < 1:
        raise ValueError(f"prompt_len must be >= 1, got {prompt_len}")
    data = torch.frombuffer(bytearray(text(language).encode("utf-8")), dtype=torch.uint8)
    tail = data[int(len(data) * (1 - held_out)):].long()
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(tail) - prompt_len, (n_prompts,), generator=g)
    return torch.stack([tail[s:s + prompt_len] for s in starts.tolist()])
