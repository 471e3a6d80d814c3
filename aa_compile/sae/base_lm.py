"""The tiny base LM the SAEs read: the byte-level reference transformer trained on the train
split of the concept corpora (English and German documents), so held-out text stays unseen.

Weights are stored as safetensors with the config as JSON metadata.
"""

from __future__ import annotations

from pathlib import Path

import torch

from aa_compile.models.byte_lm import text_bytes, train_byte_lm
from aa_compile.models.checkpoint import load_with_config, save_with_config
from aa_compile.models.transformer import Transformer, TransformerConfig

from .concepts import split_documents

BASE_CONFIG = TransformerConfig(vocab_size=256, d_model=128, n_layers=4, n_heads=4, d_ff=384,
                                max_seq_len=256)


def train_bytes(split: str = "train") -> torch.Tensor:
    """The split's English and German documents as one int64 byte stream."""
    docs = split_documents("en", split) + split_documents("de", split)
    return text_bytes("\n\n".join(docs))


def train_base_lm(cfg: TransformerConfig = BASE_CONFIG, *, steps: int = 300, batch: int = 16,
                  seq: int = 96, lr: float = 3e-3, seed: int = 0, show_progress: bool = True
                  ) -> tuple[Transformer, list[float]]:
    """`aa_compile.models.byte_lm.train_byte_lm` on the train split's documents; returns
    ``(model in eval mode, losses)``."""
    return train_byte_lm(cfg, train_bytes("train"), steps=steps, batch=batch, seq=seq, lr=lr,
                         seed=seed, show_progress=show_progress, desc="base LM")


def save_base_lm(model: Transformer, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_with_config(model, path, "transformer_config")


def load_base_lm(path: str | Path) -> Transformer:
    """A model written by `save_base_lm` (safetensors only)."""
    fields, state = load_with_config(path, "transformer_config", "base LM")
    model = Transformer(TransformerConfig(**fields))
    model.load_state_dict(state)
    return model.eval()
