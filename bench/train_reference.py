"""Train the reference transformer (byte-level, a few million parameters) for the DTM
benchmarks, on CPU in minutes, and cache the checkpoint.

    python -m bench.train_reference --steps 300 --out ~/.cache/aa-compile/dtm_reference.pt

`load_or_train` returns the cached model when the checkpoint exists (same config), trains and
saves it otherwise. The cache folder is ``$AA_COMPILE_CACHE`` (default ``~/.cache/aa-compile``).
Trains on the first 90% of ``aa_compile.data.text("mixed")``; DTM prompts come from the rest
(`aa_compile.dtm.byte_prompts`).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import time
from pathlib import Path

import torch

from aa_compile.data import text
from aa_compile.models.transformer import Transformer, TransformerConfig

DEFAULT_CONFIG = TransformerConfig(vocab_size=256, d_model=128, n_layers=6, n_heads=4,
                                   d_ff=384, max_seq_len=256)


def cache_path(name: str = "dtm_reference.pt") -> Path:
    root = os.environ.get("AA_COMPILE_CACHE", os.path.expanduser("~/.cache/aa-compile"))
    return Path(root) / name


def save(model: Transformer, path: str | Path, **meta) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"config": dataclasses.asdict(model.config), "state_dict": model.state_dict(),
                **meta}, path)


def load(path: str | Path) -> Transformer:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model = Transformer(TransformerConfig(**ckpt["config"]))
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()


def train(cfg: TransformerConfig = DEFAULT_CONFIG, steps: int = 250, batch: int = 16,
          seq: int = 96, lr: float = 3e-3, seed: int = 0, progress: bool = True):
    """AdamW, linear warm-up then cosine decay; returns ``(model, losses)``."""
    torch.manual_seed(seed)
    data = torch.frombuffer(bytearray(text("mixed").encode("utf-8")), dtype=torch.uint8)
    data = data[: int(len(data) * 0.9)].long()
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps)
                                                                      / steps)))
    losses = []
    it = range(steps)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="train reference", unit="step")
    for _ in it:
        starts = torch.randint(0, len(data) - seq - 1, (batch,))
        ids = torch.stack([data[s:s + seq + 1] for s in starts.tolist()])
        loss = model.loss(ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if progress:
            it.set_postfix(loss=f"{losses[-1]:.3f}")
    return model.eval(), losses


def load_or_train(path: str | Path | None = None, steps: int = 250, **kw) -> Transformer:
    path = Path(path) if path else cache_path()
    if path.exists():
        return load(path)
    t = time.time()
    model, losses = train(steps=steps, **kw)
    save(model, path, losses=losses, seconds=time.time() - t, steps=steps)
    return model


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=96)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--out", default=None, help="checkpoint path (default: the cache path)")
    ap.add_argument("--plot", default=None, help="write the loss curve as a PNG")
    args = ap.parse_args(argv)
    t = time.time()
    model, losses = train(steps=args.steps, batch=args.batch, seq=args.seq, lr=args.lr)
    out = Path(args.out) if args.out else cache_path()
    save(model, out, losses=losses, seconds=time.time() - t, steps=args.steps)
    n = sum(p.numel() for p in model.parameters())
    print(f"{n / 1e6:.2f}M parameters, loss {losses[0]:.3f} -> {sum(losses[-20:]) / 20:.3f} "
          f"in {time.time() - t:.0f}s; saved {out}")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        plt.figure(figsize=(5, 3))
        plt.plot(losses)
        plt.xlabel("step")
        plt.ylabel("loss (nats/byte)")
        plt.tight_layout()
        plt.savefig(args.plot, dpi=120)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
