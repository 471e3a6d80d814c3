"""The smoke module's refusals and `init_from_env` outside torchrun (docs/distributed.md runs
the smoke module itself under torchrun, on two processes)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from aa_compile import distributed as aad
from aa_compile.distributed import smoke


def test_init_from_env_alone_is_none(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert aad.init_from_env() is None
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert aad.init_from_env() is None


def test_smoke_refuses_to_run_outside_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit, match="run me under torchrun"):
        smoke.main([])


@pytest.mark.parametrize("argv, match", [(["--steps", "0"], "--steps and --batch"),
                                          (["--batch", "0"], "--steps and --batch")])
def test_smoke_bad_arguments(argv, match):
    with pytest.raises(SystemExit, match=match):
        smoke.main(argv)


def test_smoke_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        smoke.parse_args(["--help"])
    out = capsys.readouterr().out
    assert "(default: fsdp)" in out and "(default: 3)" in out


def _aa_compile(*argv: str, cwd, nproc: int = 1) -> subprocess.CompletedProcess:
    bin_dir = Path(sys.executable).parent
    cmd = [str(bin_dir / "aa-compile"), *argv, "--threads", "1"]
    if nproc > 1:
        cmd = [str(bin_dir / "torchrun"), "--standalone", f"--nproc-per-node={nproc}",
               "--no-python", *cmd]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=180,
                          check=True)


def test_cli_under_torchrun_writes_what_one_process_writes(tmp_path):
    """``torchrun ... aa-compile fdtm sweep`` and ``... explain``: the ranks split the work,
    rank 0 writes, and the outputs are byte for byte those of one process."""
    sweep = ("fdtm", "sweep", "--n-prompts", "4", "--prompt-len", "8", "--n-tokens", "4",
             "--levels", "prune:0.5,int8")
    explain = ("explain", "--prompt", "The capital of France is", "--target", " Paris",
               "--json")
    _aa_compile(*sweep, "--out", "one", cwd=tmp_path)
    _aa_compile(*sweep, "--out", "two", cwd=tmp_path, nproc=2)
    assert (tmp_path / "two" / "sweep.json").read_bytes() == \
        (tmp_path / "one" / "sweep.json").read_bytes()
    alone = _aa_compile(*explain, cwd=tmp_path).stdout
    shared = _aa_compile(*explain, cwd=tmp_path, nproc=2).stdout
    assert json.loads(shared) == json.loads(alone)  # one JSON document: only rank 0 printed
