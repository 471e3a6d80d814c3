"""``python -m aa_compile.bench``: the benchmark harness from any directory of an editable install."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import aa_compile.bench as entry


def run_from(cwd, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_harness_runs_from_another_directory(tmp_path):
    proc = run_from(tmp_path, "-m", "aa_compile.bench", "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: python -m bench") and "--quick" in proc.stdout


def test_arguments_reach_the_harness(tmp_path):
    proc = run_from(tmp_path, "-m", "aa_compile.bench", "--rounds", "0")
    assert proc.returncode == 2
    assert "--rounds must be >= 1" in proc.stderr


def test_plain_python_m_bench_needs_the_repository_root(tmp_path):
    """The limitation the entry exists for (and the README states)."""
    proc = run_from(tmp_path, "-m", "bench", "--help")
    assert proc.returncode != 0 and "No module named bench" in proc.stderr


def test_without_a_checkout_it_says_where_the_harness_is(monkeypatch, capsys):
    monkeypatch.setattr(entry, "checkout_root", lambda: None)
    assert entry.main(["--quick"]) == 2
    err = capsys.readouterr().err
    assert "bench/ folder of the source repository" in err and "python -m bench" in err


def test_checkout_root_is_this_repository():
    root = entry.checkout_root()
    assert root is not None and (root / "bench" / "__main__.py").is_file()
    assert (root / "aa_compile" / "bench.py").resolve() == pathlib.Path(entry.__file__).resolve()
