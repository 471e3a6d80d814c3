"""Progress bars for long work: a live tqdm bar on a terminal, a few plain lines in a log.

A redirected stderr (CI logs, ``nohup``, ``> run.log 2>&1``) would otherwise receive one
carriage-return update per iteration; there the bar refreshes at most every 30 seconds.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

from tqdm import tqdm

LOG_INTERVAL_S = 30.0


def progress(iterable: Iterable | None = None, *, total: int | None = None,
             desc: str | None = None, unit: str = "it", disable: bool = False,
             leave: bool = True, **kwargs: Any) -> tqdm:
    """``tqdm(iterable, ...)`` on stderr, throttled when stderr is not a terminal."""
    if not _is_terminal(sys.stderr):
        kwargs.setdefault("mininterval", LOG_INTERVAL_S)
        kwargs.setdefault("maxinterval", 2 * LOG_INTERVAL_S)
        kwargs.setdefault("ascii", True)
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, leave=leave,
                file=sys.stderr, **kwargs)


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
