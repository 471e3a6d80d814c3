"""Parameter table: T-FREE embedding + head vs a classic subword vocabulary, same hidden size.

    python -m bench.tfree_params [--hidden 1024 4096] [--tfree 8000 16000 32000]
                                 [--subword 64000 128000]

Counts come from the modules themselves, built on the ``meta`` device (no memory): T-FREE is
`TFreeEmbedding(v, h)` + `TFreeHead(h, v)` (untied, as the reference), the classic baseline
``nn.Embedding(V, h)`` + ``nn.Linear(h, V, bias=False)`` (untied). Saving columns are
``1 - params / subword params`` against each subword size (64k: the paper's Unigram baseline;
128k: a Llama-3-sized vocabulary). Prints a Markdown table.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from aa_compile.models.tfree import TFreeEmbedding, TFreeHead


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def tfree_params(vocab: int, hidden: int) -> int:
    """Embedding + head parameters of a T-FREE model with ``vocab`` slots."""
    with torch.device("meta"):
        return n_params(TFreeEmbedding(vocab, hidden)) + n_params(TFreeHead(hidden, vocab))


def subword_params(vocab: int, hidden: int) -> int:
    """Embedding + head parameters of a classic (untied) subword model."""
    with torch.device("meta"):
        return n_params(nn.Embedding(vocab, hidden)) + n_params(
            nn.Linear(hidden, vocab, bias=False))


def table(hidden: list[int], tfree: list[int], subword: list[int]) -> str:
    """Markdown rows per hidden size and vocabulary; one saving column per subword size."""
    head = " | ".join(f"saving vs {v // 1000}k subword" for v in subword)
    rows = [f"| hidden | model | vocabulary | embedding + head params | {head} |",
            "|---:|---|---:|---:|" + "---:|" * len(subword)]
    for h in hidden:
        refs = [subword_params(v, h) for v in subword]
        for kind, sizes, fn in (("subword", subword, subword_params),
                                ("T-FREE", tfree, tfree_params)):
            for v in sizes:
                p = fn(v, h)
                savings = " | ".join(f"{1 - p / r:.1%}" for r in refs)
                rows.append(f"| {h} | {kind} | {v:,} | {p / 1e6:,.1f}M | {savings} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.tfree_params",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--tfree", type=int, nargs="+", default=[8000, 16000, 32000],
                    help="T-FREE slot counts v")
    ap.add_argument("--subword", type=int, nargs="+", default=[64000, 128000],
                    help="subword vocabulary sizes (one saving column each)")
    args = ap.parse_args(argv)
    for name in ("hidden", "tfree", "subword"):
        if any(x <= 0 for x in getattr(args, name)):
            ap.error(f"--{name} sizes must be positive")
    print(table(args.hidden, args.tfree, args.subword))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
