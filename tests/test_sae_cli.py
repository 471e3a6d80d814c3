"""``aa-compile sae train|fms|steer`` end to end at tiny sizes, help text, bad input."""

from __future__ import annotations

import json

import pytest

from aa_compile.sae import cli
from aa_compile.sae.experiment import markdown_table


def test_train_fms_steer_end_to_end(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert cli.main(["sae", "train", "--out", out, "--lm-steps", "3", "--d-model", "16",
                     "--n-layers", "2", "--site", "mlp.1", "--windows", "16",
                     "--test-windows", "8", "--seq-len", "16", "--epochs", "1",
                     "--latent-factor", "2", "--k", "4"]) == 0
    assert cli.main(["sae", "fms", "--out", out]) == 0
    rows = json.loads((tmp_path / "run" / "fms.json").read_text())
    assert [(r["sae"], r["concept"]) for r in rows] == [
        (s, c) for s in ("vanilla", "gsae") for c in ("german", "digit", "uppercase")]
    assert [r["latent"] for r in rows[3:]] == [0, 1, 2]   # G-SAE: the conditioned latents
    assert all(-1.0 <= r["fms@1"] <= 1.0 for r in rows)
    assert (tmp_path / "run" / "fms.png").stat().st_size > 0
    assert "| gsae | german | 0 |" in capsys.readouterr().out
    assert cli.main(["sae", "steer", "--out", out, "--alphas", "0 1", "--scar-alphas", "1",
                     "--prompts", "2", "--new-tokens", "3"]) == 0
    steer = json.loads((tmp_path / "run" / "steering.json").read_text())
    assert [(r["method"], r["alpha"]) for r in steer] == [
        ("gsae", 0.0), ("gsae", 1.0), ("vector", 0.0), ("vector", 1.0), ("scar", 1.0),
        ("none", 0.0)]
    # α = 0 of residual steering is the unsteered model
    assert steer[0]["bits_per_byte"] == pytest.approx(steer[-1]["bits_per_byte"], rel=1e-5)
    assert steer[0]["german_share"] == steer[-1]["german_share"]
    assert (tmp_path / "run" / "steering.png").stat().st_size > 0


def test_markdown_table():
    row = {"sae": "gsae", "concept": "digit", "latent": 1, "fms@1": 0.5, "fms@5": 0.25,
           "held_out_fms@1": 0.125, "shuffled_fms@1": 0.0, "auroc": 1.0}
    assert markdown_table([row]).splitlines()[2] == \
        "| gsae | digit | 1 | 0.500 | 0.250 | 0.125 | 0.000 | 1.000 |"


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.main(["sae", "train", "--help"])
    text = capsys.readouterr().out
    assert "(default: 300)" in text and "--positive-scale" in text


def test_bad_input(tmp_path, capsys):
    assert cli.main(["sae", "fms", "--out", str(tmp_path)]) == 2
    assert "settings.json" in capsys.readouterr().err
    assert cli.main(["sae", "train", "--out", str(tmp_path), "--site", "block.99",
                     "--lm-steps", "1", "--d-model", "16", "--n-layers", "1", "--windows", "2",
                     "--seq-len", "8"]) == 2
    assert "valid sites: block.0, mlp.0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["sae", "steer", "--out", str(tmp_path), "--alphas", "one"])
