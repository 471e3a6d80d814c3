"""`aa_compile.threads`: the default thread count follows the idle cores; ``--threads`` checks."""

from __future__ import annotations

import argparse
import os

import pytest
import torch

from aa_compile.threads import add_threads_argument, default_threads, set_threads


@pytest.fixture
def machine(monkeypatch):
    """``machine(cores, load)``: pretend to run on ``cores`` cores with this load average
    (``None``: a platform without one)."""

    def pretend(cores: int, load: float | None) -> None:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
        monkeypatch.setattr(os, "cpu_count", lambda: cores)

        def getloadavg():
            if load is None:
                raise OSError("no load average here")
            return (load, load, load)

        monkeypatch.setattr(os, "getloadavg", getloadavg)

    return pretend


@pytest.mark.parametrize(
    "cores, load, expected",
    [
        (2, 0.0, 2),    # idle: every core
        (2, 1.2, 1),    # one core busy
        (2, 3.7, 1),    # overloaded: still one thread
        (16, 5.4, 11),  # 16 - round(5.4)
        (8, -0.6, 8),   # never more than the cores
        (4, None, 4),   # no load average: every core
    ],
)
def test_default_threads_takes_the_idle_cores(machine, cores, load, expected):
    machine(cores, load)
    assert default_threads() == expected


def test_without_sched_getaffinity_the_cpu_count_is_used(machine, monkeypatch):
    machine(6, 2.0)
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    assert default_threads() == 4
    monkeypatch.setattr(os, "cpu_count", lambda: None)  # unknown count: one core
    assert default_threads() == 1


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tool", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_threads_argument(p)
    return p


def test_threads_argument_parses_and_defaults_to_none():
    assert parser().parse_args(["--threads", "3"]).threads == 3
    assert parser().parse_args([]).threads is None
    assert "idle" in parser().format_help()


@pytest.mark.parametrize("bad", ["0", "-2"])
def test_threads_argument_rejects_zero_and_negatives(bad, capsys):
    with pytest.raises(SystemExit) as exit_:
        parser().parse_args(["--threads", bad])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "argument --threads" in err and f"must be at least 1, got {int(bad)}" in err


def test_threads_argument_rejects_non_integers(capsys):
    with pytest.raises(SystemExit):
        parser().parse_args(["--threads", "two"])
    err = capsys.readouterr().err
    assert "argument --threads: expected a whole number, got 'two'" in err


def test_set_threads(machine, monkeypatch):
    before = torch.get_num_threads()
    try:
        assert set_threads(1) == 1 and torch.get_num_threads() == 1
        machine(2, 0.0)
        assert set_threads(None) == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
