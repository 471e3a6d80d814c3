"""Training loop of a byte-level reference transformer on a byte stream: the base models of the
DTM benchmarks (`bench.train_reference`) and of the concept SAEs (`aa_compile.sae.base_lm`).

AdamW (weight decay 0.01, betas 0.9/0.95), linear warm-up over the first 5% of the steps then
cosine decay, gradient norm clipped at 1, random windows of ``seq + 1`` bytes.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from aa_compile.progress import progress

from .transformer import Transformer, TransformerConfig


def text_bytes(text: str) -> Tensor:
    """``text`` as an int64 stream of its UTF-8 bytes."""
    data = text.encode("utf-8")
    if not data:  # frombuffer refuses an empty buffer
        return torch.zeros(0, dtype=torch.int64)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def train_byte_lm(cfg: TransformerConfig, data: Tensor, *, steps: int, batch: int, seq: int,
                  lr: float, seed: int = 0, show_progress: bool = True,
                  desc: str = "train") -> tuple[Transformer, list[float]]:
    """A `Transformer` of ``cfg`` trained on windows of ``data`` (int64 byte ids); returns
    ``(model in eval mode, loss per step)``."""
    if steps <= 0 or batch <= 0:
        raise ValueError(f"steps and batch must be > 0, got steps={steps}, batch={batch}")
    if data.numel() <= seq + 1:
        raise ValueError(f"data: {data.numel()} bytes, need more than seq + 1 = {seq + 1}")
    torch.manual_seed(seed)
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps)
                                                                      / steps)))
    losses: list[float] = []
    bar = progress(range(steps), desc=desc, unit="step", disable=not show_progress)
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
