"""Train a tiny u-μP transformer on byte-level tokens of a local corpus (CPU is enough).

    python -m aa_compile.models.umup_train --steps 300 --backend aa --plot loss.png --out runs/umup

Tokens are the UTF-8 bytes of `aa_compile.data.text(language)` (vocabulary 0..255, nothing to
download). Adam(W) with the u-μP per-parameter learning rates (`umup_param_groups`), a global
η of O(1), a short linear warm-up and cosine decay. `train` is the same loop as a function: it
returns the trained model, the per-step losses and a held-out loss, the numbers an FP8 run is
compared against. ``--fp8 MODE`` trains with the aa backend's FP8 linears (option ``fp8``);
``--out DIR`` saves the model (`aa_compile.models.load_model` reads it).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from typing import Any

import torch

from aa_compile.data import LANGUAGES, text
from aa_compile.plotting import plot_loss_curve
from aa_compile.progress import progress as progress_bar
from aa_compile.threads import add_threads_argument, set_threads

from .checkpoint import save_model
from .umup import UmupConfig, UmupTransformer, umup_param_groups

BACKENDS = ("eager", "inductor", "aa")
#: the aa backend's ``fp8`` option values (aa_compile.config.FP8_MODES; "none": off)
FP8_MODES = ("none", "static", "tensorwise", "rowwise")


@dataclasses.dataclass
class TrainResult:
    model: UmupTransformer
    losses: list[float]  # training loss per step (mean nats per byte)
    eval_loss: float  # mean loss on fixed held-out windows after training
    seconds: float  # wall time of the training steps (compile included)

    @property
    def final_loss(self) -> float:
        """Mean training loss over the last 10% of steps (at least one)."""
        k = max(1, len(self.losses) // 10)
        return sum(self.losses[-k:]) / k if self.losses else math.nan


def byte_tokens(language: str = "en") -> torch.Tensor:
    """The corpus as an int64 tensor of UTF-8 byte values."""
    data = text(language).encode("utf-8")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int64)


def split(tokens: torch.Tensor, holdout: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train, held_out)``: the last ``holdout`` fraction of the stream is held out."""
    cut = int(len(tokens) * (1.0 - holdout))
    return tokens[:cut], tokens[cut:]


def windows(tokens: torch.Tensor, batch: int, length: int, g: torch.Generator) -> torch.Tensor:
    """``[batch, length]`` random windows of the token stream."""
    if len(tokens) <= length:
        raise ValueError(f"the corpus has {len(tokens)} tokens, fewer than a window ({length})")
    start = torch.randint(0, len(tokens) - length, (batch,), generator=g)
    return torch.stack([tokens[s:s + length] for s in start.tolist()])


def loss_function(model: UmupTransformer, backend: str = "eager",
                  options: dict[str, Any] | None = None):
    """``fn(ids) -> loss``; ``model.loss`` compiled with ``backend`` unless ``"eager"``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "eager":
        return model.loss
    return torch.compile(model.loss, backend=backend, options=options)


def train(config: UmupConfig | None = None, *, steps: int = 300, batch: int = 8, seq: int = 128,
          lr: float = 1.0, warmup: float = 0.05, weight_decay: float = 0.0,
          backend: str = "eager", options: dict[str, Any] | None = None, language: str = "en",
          eval_batches: int = 4, seed: int = 0, progress: bool = False) -> TrainResult:
    """AdamW(betas 0.9/0.95) with `umup_param_groups(model, lr)` on random ``seq``-byte windows.

    ``lr`` is the global η; each step's rate is ``η · warm-up/cosine factor`` (warm-up over the
    first ``warmup`` fraction of ``steps``, cosine to 10% at the end). The same ``seed`` gives
    the same initial weights, batches and held-out windows, so two runs (e.g. FP32 and FP8)
    differ only by their numerics.
    """
    config = config or UmupConfig(vocab_size=256, d_model=128, n_layers=2, n_heads=4,
                                  max_seq_len=max(seq, 128))
    if steps < 0 or batch < 1 or seq < 1 or eval_batches < 0:
        raise ValueError("need steps >= 0, batch >= 1, seq >= 1, eval_batches >= 0; got "
                         f"{steps}, {batch}, {seq}, {eval_batches}")
    if config.vocab_size < 256:
        raise ValueError(f"byte tokens need vocab_size >= 256, got {config.vocab_size}")
    if not 0.0 <= warmup < 1.0:
        raise ValueError(f"warmup must be a fraction in [0, 1), got {warmup}")
    torch.manual_seed(seed)
    train_tokens, held_out = split(byte_tokens(language))
    model = UmupTransformer(config)
    loss_fn = loss_function(model, backend, options)
    opt = torch.optim.AdamW(umup_param_groups(model, lr, weight_decay), betas=(0.9, 0.95))
    warm = max(1, int(warmup * steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress_ = (step - warm) / max(1, steps - warm)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress_))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    g = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    bar = progress_bar(total=steps, desc=f"u-μP d={config.d_model} L={config.n_layers} "
                       f"({backend})", unit="step") if progress else None
    start = time.perf_counter()
    for _ in range(steps):
        loss = loss_fn(windows(train_tokens, batch, seq + 1, g))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if bar is not None:
            bar.update()
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    seconds = time.perf_counter() - start
    if bar is not None:
        bar.close()
    g_eval = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        evals = [model.loss(windows(held_out, batch, seq + 1, g_eval)).item()
                 for _ in range(eval_batches)]
    eval_loss = sum(evals) / len(evals) if evals else math.nan
    return TrainResult(model, losses, eval_loss, seconds)


def plot(losses: list[float], path: str, title: str = "u-μP training loss") -> None:
    plot_loss_curve(losses, path, title, "cross-entropy (nats / byte)")


def build_parser() -> argparse.ArgumentParser:
    """The command line of `main`."""
    p = argparse.ArgumentParser(prog="python -m aa_compile.models.umup_train",
                                description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300, help="optimizer steps (default: %(default)s)")
    p.add_argument("--batch", type=int, default=8, help="sequences per step (default: %(default)s)")
    p.add_argument("--seq", type=int, default=128, help="bytes per sequence (default: %(default)s)")
    p.add_argument("--lr", type=float, default=1.0, help="global u-μP learning rate η"
                                                         " (default: %(default)s)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay"
                                                                   " (default: %(default)s)")
    p.add_argument("--backend", choices=("auto", *BACKENDS), default="auto",
                   help="eager, or torch.compile with inductor or aa; auto: aa with --fp8, "
                   "else eager (default: %(default)s)")
    p.add_argument("--fp8", choices=FP8_MODES, default="none",
                   help="train the linears in FP8 with the aa backend (its fp8 option; see "
                   "docs/fp8.md); none: full precision (default: %(default)s)")
    p.add_argument("--inner-compiler", choices=("inductor", "eager", "aot_eager"),
                   default="inductor", help="backend aa: what compiles the graph after its "
                   "passes (eager: quick to start) (default: %(default)s)")
    p.add_argument("--language", choices=LANGUAGES, default="en",
                   help="training corpus (aa_compile.data.text) (default: %(default)s)")
    p.add_argument("--width", type=int, default=128, help="d_model (default: %(default)s)")
    p.add_argument("--depth", type=int, default=2, help="transformer blocks (default: %(default)s)")
    p.add_argument("--heads", type=int, default=4, help="attention heads (default: %(default)s)")
    p.add_argument("--kv-heads", type=int, default=None,
                   help="key/value heads (grouped-query attention); None: --heads"
                        " (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the batches"
                                                       " (default: %(default)s)")
    p.add_argument("--prompt", default="The function returns",
                   help="text to continue after training (default: %(default)s)")
    p.add_argument("--generate", type=int, default=60,
                   help="bytes to generate after training (0: none) (default: %(default)s)")
    p.add_argument("--plot", metavar="PNG", help="write the loss curve to this file"
                                                 " (default: %(default)s)")
    p.add_argument("--out", metavar="DIR", help="save the trained model to this directory "
                   "(aa_compile.models.load_model reads it) (default: %(default)s)")
    add_threads_argument(p)
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    backend = args.backend if args.backend != "auto" else "aa" if args.fp8 != "none" else "eager"
    if args.fp8 != "none" and backend != "aa":
        p.error(f"--fp8 {args.fp8} needs --backend aa (or auto), got --backend {backend}")
    options = None
    if backend == "aa":
        options = {"inner_compiler": args.inner_compiler}
        if args.fp8 != "none":
            options["fp8"] = args.fp8
    threads = set_threads(args.threads)
    try:
        config = UmupConfig(vocab_size=256, d_model=args.width, n_layers=args.depth,
                            n_heads=args.heads, n_kv_heads=args.kv_heads,
                            max_seq_len=max(args.seq, 128))
    except ValueError as e:
        p.error(str(e))
    res = train(config, steps=args.steps, batch=args.batch, seq=args.seq, lr=args.lr,
                weight_decay=args.weight_decay, backend=backend, options=options,
                language=args.language, seed=args.seed, progress=True)
    n = len(res.losses)
    if n:
        k = max(1, n // 10)
        first = sum(res.losses[:k]) / k
        print(f"{n} steps in {res.seconds:.1f} s ({res.seconds / n * 1e3:.0f} ms/step, "
              f"{threads} threads, backend {backend}, fp8 {args.fp8}); mean loss of the first "
              f"{k} steps {first:.3f}, of the last {k} {res.final_loss:.3f}; held-out "
              f"{res.eval_loss:.3f} nats/byte (uniform: {math.log(256):.3f})")
    if args.plot:
        plot(res.losses, args.plot)
        print(f"loss curve: {args.plot}")
    if args.generate:
        ids = torch.tensor([list(args.prompt.encode("utf-8"))], dtype=torch.int64)
        out = res.model.generate(ids, args.generate)[0].tolist()
        print("generated:", repr(bytes(out).decode("utf-8", errors="replace")))
    if args.out:
        training = {"args": vars(args), "backend": backend, "steps": n,
                    "final_loss": res.final_loss if n else None, "eval_loss": res.eval_loss}
        save_model(res.model, args.out, tokenizer="bytes", training=training)
        print(f"saved the model to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
