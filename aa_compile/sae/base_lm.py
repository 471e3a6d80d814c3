"""The tiny base LM the SAEs read: the byte-level reference transformer trained on the train
split of the concept corpora (English and German documents), so held-out text stays unseen.

Weights are stored as safetensors with the config as JSON metadata.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from aa_compile.models.transformer import Transformer, TransformerConfig
from aa_compile.progress import progress

from .concepts import split_documents

BASE_CONFIG = TransformerConfig(vocab_size=256, d_model=128, n_layers=4, n_heads=4, d_ff=384,
                                max_seq_len=256)


def train_bytes(split: str = "train") -> torch.Tensor:
    """The split's English and German documents as one int64 byte stream."""
    docs = split_documents("en", split) + split_documents("de", split)
    data = "\n\n".join(docs).encode("utf-8")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def train_base_lm(cfg: TransformerConfig = BASE_CONFIG, *, steps: int = 300, batch: int = 16,
                  seq: int = 96, lr: float = 3e-3, seed: int = 0, show_progress: bool = True
                  ) -> tuple[Transformer, list[float]]:
    """AdamW with warm-up and cosine decay on random windows; returns ``(model, losses)``."""
    if steps <= 0:
        raise ValueError(f"steps must be > 0, got {steps}")
    torch.manual_seed(seed)
    data = train_bytes("train")
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps)
                                                                      / steps)))
    losses: list[float] = []
    bar = progress(range(steps), desc="base LM", unit="step", disable=not show_progress)
    for _ in bar:
        starts = torch.randint(0, len(data) - seq - 1, (batch,))
        ids = torch.stack([data[s:s + seq + 1] for s in starts.tolist()])
        loss = model.loss(ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    return model.eval(), losses


def save_base_lm(model: Transformer, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={"transformer_config": json.dumps(dataclasses.asdict(model.config))})


def load_base_lm(path: str | Path) -> Transformer:
    """A model written by `save_base_lm` (safetensors only)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"base LM weights load only from a .safetensors file, got {path}")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if "transformer_config" not in meta:
        raise ValueError(f"{path} has no transformer_config metadata")
    model = Transformer(TransformerConfig(**json.loads(meta["transformer_config"])))
    model.load_state_dict(load_file(str(path)))
    return model.eval()
