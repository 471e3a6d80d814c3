"""``aa-compile fdtm sweep|plan|apply`` end to end on a tiny random model."""

from __future__ import annotations

import json

import pytest
import torch

from aa_compile.cli import main


def test_fdtm_cli(tmp_path):
    torch.set_num_threads(1)
    common = ["--n-prompts", "3", "--prompt-len", "6", "--n-tokens", "6"]
    assert main(["fdtm", "sweep", *common, "--levels", "int8,prune:0.5",
                 "--out", str(tmp_path / "s")]) == 0
    assert (tmp_path / "s" / "sweep.png").exists()
    assert main(["fdtm", "plan", *common, "--input", str(tmp_path / "s" / "sweep.json"),
                 "--tau", "3", "--out", str(tmp_path / "plan.json")]) == 0
    assert "plan" in json.loads((tmp_path / "plan.json").read_text())
    assert main(["fdtm", "plan", *common, "--budget", "0.3",
                 "--out", str(tmp_path / "budget.json")]) == 0
    budget = json.loads((tmp_path / "budget.json").read_text())
    assert budget["share_saved"] == pytest.approx(0.3, abs=1e-3)
    assert budget["measured"]["fdt_mean"] >= budget["uniform"]["fdt_mean"]
    assert main(["fdtm", "plan", *common, "--budget", "0.3", "--budget-method", "rounds",
                 "--out", str(tmp_path / "rounds.json")]) == 0
    rounds = json.loads((tmp_path / "rounds.json").read_text())
    assert rounds["share_saved"] >= 0.3 and "fdt_median" in rounds["uniform"]
    assert main(["fdtm", "apply", *common, "--input", str(tmp_path / "plan.json"),
                 "--out", str(tmp_path / "m.pt")]) == 0
    assert main(["fdtm", "plan", *common]) == 2  # no --input: a clear error, exit code 2
