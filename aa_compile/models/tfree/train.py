"""Train a tiny `TFreeLM` on a local corpus (CPU is enough), eager or compiled.

    python -m aa_compile.models.tfree.train --steps 300 --backend aa --plot loss.png \
        --out runs/tfree

Shows a progress bar, prints the loss curve summary and a few generated words, can write the
curve as a PNG and saves the model with its tokenizer and word list (``--out``, a directory
`aa_compile.models.load_model` and ``aa-compile generate`` read). `train` is the same loop as a
function (tests and benchmarks call it); it returns the model with the losses.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from aa_compile.data import LANGUAGES, text
from aa_compile.plotting import plot_loss_curve
from aa_compile.progress import progress as progress_bar
from aa_compile.threads import add_threads_argument, set_threads

from ..checkpoint import save_model

from .lm import TFreeInputs, TFreeLM, TFreeLMConfig, WordStream
from .tokenizer import TrigramTokenizer

BACKENDS = ("eager", "inductor", "aa")


@dataclasses.dataclass
class TrainResult:
    model: TFreeLM
    tokenizer: TrigramTokenizer
    stream: WordStream
    losses: list[float]
    seconds: float

    @property
    def words(self) -> list[str]:
        """The distinct words of the training corpus: the dictionary `generate` picks from."""
        return sorted(set(self.stream.enc.words))


def loss_function(model: TFreeLM, backend: str = "eager"):
    """``fn(inputs: TFreeInputs) -> loss``; compiled with ``backend`` unless ``"eager"``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")

    def step(slots, where, targets, weights, batch: int, seq: int):
        logits = model(slots, where, batch, seq)
        return model.head.loss(logits, targets, weights)

    fn = step if backend == "eager" else torch.compile(step, backend=backend)

    def run(inputs: TFreeInputs):
        return fn(inputs.trigram_slots, inputs.word_of_trigram, inputs.targets,
                  inputs.loss_weights, inputs.batch, inputs.seq)

    return run


def train(config: TFreeLMConfig | None = None, *, steps: int = 300, batch: int = 8,
          seq: int = 64, lr: float = 3e-3, backend: str = "eager", language: str = "en",
          k_lower: int = 2, seed: int = 0, progress: bool = False) -> TrainResult:
    """AdamW on random ``seq``-word windows of the ``language`` corpus; the per-step losses."""
    config = config or TFreeLMConfig(vocab_size=2048, m=10, d_model=128, n_layers=2,
                                     n_heads=4, max_seq_len=max(seq, 128))
    if steps < 0 or batch < 1 or seq < 1:
        raise ValueError(f"need steps >= 0, batch >= 1, seq >= 1; got {steps}, {batch}, {seq}")
    torch.manual_seed(seed)
    tokenizer = TrigramTokenizer(vocab_size=config.vocab_size, m=config.m, k_lower=k_lower)
    stream = WordStream(tokenizer, text(language))
    model = TFreeLM(config)
    loss_fn = loss_function(model, backend)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    g = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    bar = progress_bar(total=steps, desc=f"T-FREE LM ({backend})", unit="step") \
        if progress else None
    start = time.perf_counter()
    for _ in range(steps):
        loss = loss_fn(stream.batch(batch, seq, g))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if bar is not None:
            bar.update()
            bar.set_postfix(loss=f"{losses[-1]:.2f}", refresh=False)
    if bar is not None:
        bar.close()
    return TrainResult(model, tokenizer, stream, losses, time.perf_counter() - start)


def plot(losses: list[float], path: str, title: str = "T-FREE LM training loss") -> None:
    plot_loss_curve(losses, path, title, "loss (BCE x loss_scale)")


def build_parser() -> argparse.ArgumentParser:
    """The command line of `main`."""
    p = argparse.ArgumentParser(prog="python -m aa_compile.models.tfree.train",
                                description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300, help="optimizer steps (default: %(default)s)")
    p.add_argument("--batch", type=int, default=8, help="sequences per step (default: %(default)s)")
    p.add_argument("--seq", type=int, default=64, help="words per sequence (default: %(default)s)")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate"
                                                          " (default: %(default)s)")
    p.add_argument("--backend", choices=BACKENDS, default="eager",
                   help="eager, or torch.compile with inductor or aa (default: %(default)s)")
    p.add_argument("--language", choices=LANGUAGES, default="en",
                   help="training corpus (aa_compile.data.text) (default: %(default)s)")
    p.add_argument("--vocab-size", type=int, default=2048, help="T-FREE slots v"
                                                                " (default: %(default)s)")
    p.add_argument("--m", type=int, default=10, help="slots per trigram (default: %(default)s)")
    p.add_argument("--d-model", type=int, default=128, help="model width (default: %(default)s)")
    p.add_argument("--layers", type=int, default=2, help="transformer blocks"
                                                         " (default: %(default)s)")
    p.add_argument("--heads", type=int, default=4, help="attention heads (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the batches"
                                                       " (default: %(default)s)")
    p.add_argument("--prompt", default="The function returns",
                   help="text to continue after training (default: %(default)s)")
    p.add_argument("--generate", type=int, default=12,
                   help="words to generate after training (0: none) (default: %(default)s)")
    p.add_argument("--plot", metavar="PNG", help="write the loss curve to this file"
                                                 " (default: %(default)s)")
    p.add_argument("--out", metavar="DIR", help="save the trained model, its tokenizer and "
                   "word list to this directory (aa_compile.models.load_model reads it)"
                   " (default: %(default)s)")
    add_threads_argument(p)
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    threads = set_threads(args.threads)
    try:
        config = TFreeLMConfig(vocab_size=args.vocab_size, m=args.m, d_model=args.d_model,
                               n_layers=args.layers, n_heads=args.heads,
                               max_seq_len=max(args.seq, 128))
    except ValueError as e:
        p.error(str(e))
    res = train(config, steps=args.steps, batch=args.batch, seq=args.seq, lr=args.lr,
                backend=args.backend, language=args.language, seed=args.seed, progress=True)
    n = len(res.losses)
    if n:
        k = max(1, n // 10)
        first, last = sum(res.losses[:k]) / k, sum(res.losses[-k:]) / k
        print(f"{n} steps in {res.seconds:.1f} s ({res.seconds / n * 1e3:.0f} ms/step, "
              f"{threads} threads); mean loss of the first {k} steps {first:.2f}, of the last "
              f"{k} {last:.2f}")
    if args.plot:
        plot(res.losses, args.plot)
        print(f"loss curve: {args.plot}")
    if args.generate:
        out = res.model.generate(res.tokenizer, args.prompt, args.generate, words=res.words)
        print("generated:", repr(res.tokenizer.decode(res.tokenizer.words(args.prompt) + out)))
    if args.out:
        training = {"args": vars(args), "steps": n, "final_loss": res.losses[-1] if n else None}
        save_model(res.model, args.out, tokenizer=res.tokenizer, words=res.words,
                   training=training)
        print(f"saved the model to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
