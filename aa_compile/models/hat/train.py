"""Train a tiny HAT on the offline corpus (CPU is enough): the loss must fall.

    python -m aa_compile.models.hat.train --steps 300 --backend eager --language mixed \
        --plot hat_loss.png --out runs/hat

Each step packs ``--docs`` windows of at most ``--window`` bytes, each starting and ending at a
word boundary of the splitter's words, into one `ByteBatch` (one document per window, so no
attention crosses windows) and takes an AdamW step on the next-byte loss. `train` returns the
trained model with its loss curve; ``--plot`` writes the curve as a PNG (needs matplotlib),
``--json`` as JSON, ``--out`` saves the model (`aa_compile.models.load_model` reads it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time

import numpy as np
import torch

from aa_compile.data import LANGUAGES, text
from aa_compile.progress import progress as progress_bar
from aa_compile.threads import add_threads_argument, set_threads

from ..checkpoint import save_model

from .batch import ByteBatch
from .config import HATConfig
from .model import HATModel
from .splitter import HATByteSplitter

BACKENDS = ("eager", "inductor", "aa")


class WordWindows:
    """Random byte windows of a text, cut at word boundaries (whole words only)."""

    def __init__(self, corpus: str, splitter: HATByteSplitter, window: int, seed: int = 0):
        words = splitter.words(corpus)
        if not words:
            raise ValueError("the corpus has no words")
        if window < splitter.max_word_bytes:
            raise ValueError(f"window={window} must be >= max_word_bytes="
                             f"{splitter.max_word_bytes} so that every window holds a word")
        self.data = torch.frombuffer(bytearray(b"".join(words)), dtype=torch.uint8).long()
        self.offsets = np.zeros(len(words) + 1, dtype=np.int64)
        np.cumsum([len(w) for w in words], out=self.offsets[1:])
        self.window = window
        self.rng = np.random.default_rng(seed)
        # the last start word whose window still fits in the text
        self.last_start = max(int(np.searchsorted(self.offsets, self.offsets[-1] - window)), 1)

    def sample(self, n_docs: int) -> ByteBatch:
        starts = self.rng.integers(0, self.last_start, size=n_docs)
        ends = np.searchsorted(self.offsets, self.offsets[starts] + self.window, "right") - 1
        ends = np.minimum(np.maximum(ends, starts + 1), len(self.offsets) - 1)
        pieces, word_offsets, doc_offsets = [], [np.zeros(1, np.int64)], [0]
        total, n_words = 0, 0
        for s, e in zip(starts.tolist(), ends.tolist()):
            a, b = int(self.offsets[s]), int(self.offsets[e])
            pieces.append(self.data[a:b])
            word_offsets.append(self.offsets[s + 1 : e + 1] - a + total)
            total += b - a
            n_words += e - s
            doc_offsets.append(n_words)
        return ByteBatch.from_offsets(torch.cat(pieces),
                                      torch.from_numpy(np.concatenate(word_offsets)),
                                      torch.tensor(doc_offsets))


@dataclasses.dataclass
class TrainResult:
    losses: list[float]
    seconds: float
    steps: int
    bytes_seen: int
    parameters: int
    model: HATModel | None = dataclasses.field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        """The loss curve and timing (everything but the model), JSON-able."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name != "model"}

    def summary(self) -> str:
        k = max(1, len(self.losses) // 10)
        first = sum(self.losses[:k]) / k
        last = sum(self.losses[-k:]) / k
        return (f"{self.steps} steps in {self.seconds:.1f} s ({self.seconds / self.steps:.3f} "
                f"s/step, {self.bytes_seen / self.seconds:,.0f} bytes/s); loss (mean of "
                f"{k} steps) {first:.3f} -> {last:.3f} nats/byte = "
                f"{last / math.log(2):.3f} bits/byte; {self.parameters:,} parameters")


def train(steps: int = 300, backend: str = "eager", language: str = "mixed", docs: int = 8,
          window: int = 128, lr: float = 3e-3, seed: int = 0, config: HATConfig | None = None,
          progress: bool = True) -> TrainResult:
    """Train ``HATModel(config or HATConfig.tiny())``; return it (``.model``) with its loss
    per step."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if language not in LANGUAGES:
        raise ValueError(f"language must be one of {LANGUAGES}, got {language!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    torch.manual_seed(seed)
    model = HATModel(config or HATConfig.tiny())
    windows = WordWindows(text(language), model.splitter, window, seed)
    loss_fn = model.loss if backend == "eager" else torch.compile(model.loss, backend=backend)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))))
    losses, n_bytes = [], 0
    start = time.perf_counter()
    bar = progress_bar(range(steps), desc=f"HAT {backend}", unit="step", disable=not progress)
    for _ in bar:
        batch = windows.sample(docs)
        loss = loss_fn(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        n_bytes += batch.n_bytes
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    seconds = time.perf_counter() - start
    return TrainResult(losses, seconds, steps, n_bytes, model.num_parameters()["total"],
                       model.eval())


def plot(result: TrainResult, path: str, title: str = "HAT tiny") -> None:
    """Write the loss curve to a PNG, with its moving average (over up to 10 steps) when the
    run is long enough for that to be a line of its own (at least 4 steps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = result.losses
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(len(losses)), losses, lw=0.8, alpha=0.5, label="loss",
            marker="o" if len(losses) == 1 else None)  # a single point is no line
    k = min(10, len(losses) // 2)
    if k >= 2:  # the mean has len - k + 1 >= 3 points
        avg = np.convolve(losses, np.ones(k) / k, mode="valid")
        ax.plot(range(k - 1, len(losses)), avg, lw=1.5, label=f"{k}-step mean")
    ax.set(xlabel="step", ylabel="next-byte loss (nats)", title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    """The command line of `main`."""
    p = argparse.ArgumentParser(prog="python -m aa_compile.models.hat.train",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300, help="optimizer steps (default: %(default)s)")
    p.add_argument("--backend", choices=BACKENDS, default="eager",
                   help="eager, or torch.compile with inductor or aa (default: %(default)s)")
    p.add_argument("--language", choices=LANGUAGES, default="mixed",
                   help="corpus of aa_compile.data.text (default: %(default)s)")
    p.add_argument("--docs", type=int, default=8, help="windows (documents) per batch"
                                                       " (default: %(default)s)")
    p.add_argument("--window", type=int, default=128, help="bytes per window, at most"
                                                           " (default: %(default)s)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate"
                                                          " (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the batches"
                                                       " (default: %(default)s)")
    p.add_argument("--plot", metavar="PNG", help="write the loss curve to this PNG"
                                                 " (default: %(default)s)")
    p.add_argument("--json", metavar="FILE", help="write the loss curve and timing as JSON"
                                                  " (default: %(default)s)")
    p.add_argument("--out", metavar="DIR", help="save the trained model to this directory "
                   "(aa_compile.models.load_model reads it) (default: %(default)s)")
    p.add_argument("--prompt", default="The function returns",
                   help="text to continue after training (default: %(default)s)")
    p.add_argument("--generate", type=int, default=0,
                   help="bytes to generate after training (0: none) (default: %(default)s)")
    add_threads_argument(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar"
                                                              " (default: %(default)s)")
    return p


def main(argv: list[str] | None = None) -> TrainResult:
    p = build_parser()
    args = p.parse_args(argv)
    set_threads(args.threads)
    result = train(args.steps, args.backend, args.language, args.docs, args.window, args.lr,
                   args.seed, progress=not args.no_progress)
    print(result.summary())
    if args.plot:
        plot(result, args.plot, f"HAT tiny, {args.language}, {args.backend}")
        print(f"wrote {args.plot}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**result.to_dict(), "args": vars(args)}, f)
        print(f"wrote {args.json}")
    if args.generate:
        print("generated:", repr(args.prompt + result.model.generate(args.prompt,
                                                                     args.generate)))
    if args.out:
        training = {"args": vars(args), "steps": result.steps,
                    "final_loss": result.losses[-1] if result.losses else None}
        save_model(result.model, args.out, training=training)
        print(f"saved the model to {args.out}")
    return result


if __name__ == "__main__":
    main()
