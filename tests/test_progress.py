"""`aa_compile.progress.progress`: a live bar on a terminal, a few lines in a redirected log."""

from __future__ import annotations

import io
import itertools
import sys

import pytest
import tqdm.std as tqdm_std
from tqdm import tqdm

from aa_compile.progress import LOG_INTERVAL_S, progress

STEPS = 200


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def slow_clock(monkeypatch):
    """tqdm's clock advances one second per reading: every iteration looks slow."""
    ticks = itertools.count()
    monkeypatch.setattr(tqdm_std, "time", lambda: float(next(ticks)))


def updates(stream: io.StringIO) -> int:
    """Bar refreshes written: tqdm starts each with a carriage return."""
    return stream.getvalue().count("\r")


def run(make_bar, stream, monkeypatch) -> int:
    monkeypatch.setattr(sys, "stderr", stream)
    for _ in make_bar(range(STEPS)):
        pass
    return updates(stream)


def test_redirected_log_gets_a_few_lines_not_one_per_iteration(slow_clock, monkeypatch):
    refreshes = run(lambda it: progress(it, desc="train"), io.StringIO(), monkeypatch)
    # a refresh at most every LOG_INTERVAL_S of (fake) seconds, plus the first and the last
    assert 2 <= refreshes <= STEPS / LOG_INTERVAL_S + 2
    # the control: plain tqdm on the same clock writes about one refresh per iteration
    plain = run(lambda it: tqdm(it, file=sys.stderr), io.StringIO(), monkeypatch)
    assert plain > STEPS / 2


def test_log_output_is_ascii_and_ends_complete(slow_clock, monkeypatch):
    stream = io.StringIO()
    run(lambda it: progress(it, desc="train", unit="step"), stream, monkeypatch)
    text = stream.getvalue()
    assert text.isascii()
    assert f"{STEPS}/{STEPS}" in text.split("\r")[-1] and "step" in text


def test_terminal_keeps_a_live_bar(slow_clock, monkeypatch):
    refreshes = run(lambda it: progress(it, desc="train"), Terminal(), monkeypatch)
    assert refreshes > STEPS / 2


def test_disable_and_total_without_iterable(monkeypatch):
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    with progress(total=3, desc="x", disable=True) as bar:
        bar.update(3)
    assert stream.getvalue() == ""
    with progress(total=3, desc="manual") as bar:
        bar.update(3)
    assert "3/3" in stream.getvalue()


def test_a_stream_without_isatty_counts_as_a_log(slow_clock, monkeypatch):
    class Bare:
        def __init__(self):
            self.parts = []

        def write(self, text):
            self.parts.append(text)

        def flush(self):
            pass

    bare = Bare()
    monkeypatch.setattr(sys, "stderr", bare)
    for _ in progress(range(STEPS)):
        pass
    assert 2 <= "".join(bare.parts).count("\r") <= STEPS / LOG_INTERVAL_S + 2


def test_only_the_progress_module_imports_tqdm():
    """Every bar of the package and the benchmarks goes through `progress` (throttled logs)."""
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parents[1]
    pattern = re.compile(r"^\s*(from tqdm\b|import tqdm\b)", re.MULTILINE)
    raw = [str(p.relative_to(root)) for folder in ("aa_compile", "bench")
           for p in sorted((root / folder).rglob("*.py"))
           if p.name != "progress.py" and pattern.search(p.read_text())]
    assert raw == [], f"use aa_compile.progress.progress instead of tqdm in {raw}"
