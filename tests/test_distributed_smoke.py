"""The smoke module's refusals and `init_from_env` outside torchrun (docs/distributed.md runs
the smoke module itself under torchrun, on two processes)."""

from __future__ import annotations

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
