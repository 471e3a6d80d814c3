"""Train the reference transformer (byte-level, a few million parameters) for the DTM
benchmarks, on CPU in minutes, and cache the checkpoint.

    python -m bench.train_reference --steps 300 --out runs/ref

``--out DIR`` writes a saved model directory (`aa_compile.models.load_model`, ``aa-compile
generate|explain|fdtm --checkpoint DIR`` read it); an ``--out`` ending in ``.pt`` (and the
default, the cache path) writes the older ``{'config', 'state_dict'}`` torch file instead.
`load_or_train` returns the cached model when the checkpoint exists (same config), trains and
saves it otherwise. The cache folder is ``$AA_COMPILE_CACHE`` (default ``~/.cache/aa-compile``).
Trains on the first 90% of ``aa_compile.data.text("mixed")``; DTM prompts come from the rest
(`aa_compile.dtm.byte_prompts`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path

import torch

from aa_compile.data import text
from aa_compile.models import save_model
from aa_compile.models.byte_lm import text_bytes, train_byte_lm
from aa_compile.models.transformer import Transformer, TransformerConfig
from aa_compile.threads import add_threads_argument, set_threads

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
    """`aa_compile.models.byte_lm.train_byte_lm` on the first 90% of the mixed corpus; returns
    ``(model in eval mode, losses)``."""
    data = text_bytes(text("mixed"))
    return train_byte_lm(cfg, data[: int(len(data) * 0.9)], steps=steps, batch=batch, seq=seq,
                         lr=lr, seed=seed, show_progress=progress, desc="train reference")


def load_or_train(path: str | Path | None = None, steps: int = 250, **kw) -> Transformer:
    path = Path(path) if path else cache_path()
    if path.exists():
        return load(path)
    t = time.time()
    model, losses = train(steps=steps, **kw)
    save(model, path, losses=losses, seconds=time.time() - t, steps=steps)
    return model


def build_parser() -> argparse.ArgumentParser:
    """The command line of `main`."""
    ap = argparse.ArgumentParser(prog="python -m bench.train_reference",
                                 description="Train the byte-level reference transformer for the "
                                 "DTM benchmarks and save it.")
    ap.add_argument("--steps", type=int, default=250, help="optimizer steps (default: %(default)s)")
    ap.add_argument("--batch", type=int, default=16, help="sequences per step"
                                                          " (default: %(default)s)")
    ap.add_argument("--seq", type=int, default=96, help="bytes per sequence (default: %(default)s)")
    ap.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate"
                                                           " (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the weights and the batches"
                                                        " (default: %(default)s)")
    ap.add_argument("--out", default=None, metavar="DIR",
                    help="saved model directory to write; a path ending in .pt writes the "
                    "torch file {'config', 'state_dict'} (default: the cache path, "
                    f"{cache_path()})")
    ap.add_argument("--plot", default=None, metavar="PNG", help="write the loss curve as a PNG"
                                                                " (default: %(default)s)")
    add_threads_argument(ap)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    set_threads(args.threads)
    t = time.time()
    model, losses = train(steps=args.steps, batch=args.batch, seq=args.seq, lr=args.lr,
                          seed=args.seed)
    seconds = time.time() - t
    out = Path(args.out) if args.out else cache_path()
    if out.suffix == ".pt":
        save(model, out, losses=losses, seconds=seconds, steps=args.steps)
    else:
        save_model(model, out, tokenizer="bytes",
                   training={"args": vars(args), "steps": args.steps, "seconds": seconds,
                             "final_loss": losses[-1] if losses else None})
    n = sum(p.numel() for p in model.parameters())
    tail = losses[-20:]
    print(f"{n / 1e6:.2f}M parameters, loss {losses[0]:.3f} -> {sum(tail) / len(tail):.3f} "
          f"in {seconds:.0f}s; saved {out}" if losses else f"0 steps; saved {out}")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        plt.figure(figsize=(5, 3))
        plt.plot(losses)
        plt.title("reference transformer: training loss")
        plt.xlabel("step")
        plt.ylabel("loss (nats/byte)")
        plt.tight_layout()
        plt.savefig(args.plot, dpi=120)
        plt.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
