"""CPU thread count for the command-line tools: one that does not oversubscribe a busy machine.

torch uses one thread per core by default; when other processes already keep those cores
busy, its threads wait on each other and small-model training runs many times slower than
with a single thread. The default here takes the cores that are idle now (1-minute load
average), at least one.
"""

from __future__ import annotations

import argparse
import os

import torch


def default_threads() -> int:
    """Idle cores right now: ``cpu_count - round(1-minute load average)``, at least 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average on this platform
        return cores
    return max(1, min(cores, cores - round(load)))


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    """``--threads N`` (default: :func:`default_threads` at start-up)."""
    parser.add_argument(
        "--threads", type=_positive_int, default=None, metavar="N",
        help="CPU threads for torch (default: the cores idle at start-up, from the load "
        "average, at least 1)",
    )


def set_threads(n: int | None) -> int:
    """``torch.set_num_threads(n or default_threads())``; returns the number set."""
    n = n or default_threads()
    torch.set_num_threads(n)
    return n


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value
