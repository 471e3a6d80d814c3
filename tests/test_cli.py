"""The aa-compile command line."""

import json

import pytest

from aa_compile.cli import main


def test_info_lists_ops_and_passes(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert "aa::rms_norm" in info["ops"]
    assert info["ops"]["aa::rms_norm"]["cpu"] == "aa_compile.kernels.rms_norm.cpu"
    assert "rms_norm" in info["passes"]


def test_report_on_reference_transformer(capsys):
    assert main(["report", "--n-layers", "2", "--d-model", "32", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["rewrites"]["rms_norm"] == 5


def test_bad_model_shape_is_a_clean_error(capsys):
    assert main(["report", "--d-model", "30", "--n-heads", "4"]) == 2
    assert "d_model=30 must be divisible by n_heads=4" in capsys.readouterr().err


def test_unknown_command_exits_with_usage():
    with pytest.raises(SystemExit) as e:
        main(["frobnicate"])
    assert e.value.code == 2
