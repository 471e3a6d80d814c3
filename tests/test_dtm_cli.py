"""``aa-compile fdtm sweep|plan|apply`` end to end on a tiny random model."""

from __future__ import annotations

import json

import pytest
import torch

from aa_compile import dtm
from aa_compile.cli import main
from aa_compile.models import Transformer, TransformerConfig, load_model, save_model


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
                 "--out", str(tmp_path / "small")]) == 0
    assert main(["fdtm", "plan", *common]) == 2  # no --input: a clear error, exit code 2


@pytest.fixture
def saved_reference(tmp_path):
    """A tiny byte-level reference transformer saved as a model directory."""
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(vocab_size=256, d_model=32, n_layers=2, n_heads=2,
                                          max_seq_len=64))
    return save_model(model, tmp_path / "ref")


def test_plan_and_apply_take_the_sweep_settings(tmp_path, saved_reference, capsys):
    """After a sweep with --n-tokens 8, plan without --tau uses the sweep's N, prompts and
    checkpoint and a tau it can meet (N/2 = 4), says so, and selects something; apply takes
    them (and tau) from the plan and writes a directory `load_applied` loads bit-exactly."""
    torch.set_num_threads(1)
    sweep_dir, plan_json, out = tmp_path / "s", tmp_path / "plan.json", tmp_path / "small"
    assert main(["fdtm", "sweep", "--checkpoint", str(saved_reference), "--n-prompts", "3",
                 "--prompt-len", "6", "--n-tokens", "8", "--seed", "1", "--levels",
                 "int8,prune:0.5", "--out", str(sweep_dir)]) == 0
    sweep = json.loads((sweep_dir / "sweep.json").read_text())
    assert (sweep["n_tokens"], sweep["n_prompts"], sweep["prompt_len"], sweep["seed"]) == \
        (8, 3, 6, 1)
    capsys.readouterr()
    assert main(["fdtm", "plan", "--input", str(sweep_dir / "sweep.json"),
                 "--out", str(plan_json)]) == 0
    err = capsys.readouterr().err
    assert (f"n_tokens=8, n_prompts=3, prompt_len=6, seed=1, checkpoint={saved_reference} "
            f"from {sweep_dir / 'sweep.json'}") in err
    assert "tau=4 (default: n_tokens / 2)" in err
    plan = json.loads(plan_json.read_text())
    assert plan["tau"] == 4.0 and plan["settings"]["n_tokens"] == 8
    assert plan["plan"], "the default tau must be reachable at the sweep's N"
    assert plan["measured"]["fdt_median"] >= 4

    assert main(["fdtm", "apply", "--input", str(plan_json), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"seed=1, checkpoint={saved_reference} from {plan_json}" in err
    assert f"tau=4 ({plan_json})" in err
    small = dtm.load_applied(out)
    expected = dtm.apply(load_model(saved_reference), plan["plan"]).eval()
    ids = dtm.byte_prompts(2, 10, seed=3)
    with torch.no_grad():
        assert torch.equal(small(ids), expected(ids))
    assert any(isinstance(m, dtm.Int8Linear) for m in small.modules()) == \
        ("int8" in plan["plan"].values())
    with pytest.raises(ValueError, match="load_applied"):  # not a plain saved model
        load_model(out)


def test_apply_bad_inputs(tmp_path, saved_reference, capsys):
    with pytest.raises(ValueError, match="has no DTM plan"):
        dtm.load_applied(saved_reference)
    assert main(["fdtm", "apply", "--input", str(tmp_path / "none.json")]) == 2
    assert "cannot read" in capsys.readouterr().err
    sweep = tmp_path / "sweep.json"
    sweep.write_text(json.dumps({"n_tokens": 8, "results": {}, "levels": []}))
    assert main(["fdtm", "plan", "--input", str(sweep), "--n-tokens", "16"]) == 2
    assert "differs from the sweep's n_tokens=8" in capsys.readouterr().err
    (tmp_path / "plan.json").write_text(json.dumps({"plan": {"nope": "int8"}}))
    assert main(["fdtm", "apply", "--input", str(tmp_path / "plan.json"), "--checkpoint",
                 str(saved_reference), "--out", str(tmp_path / "o")]) == 2
    assert "plan names components the model does not have" in capsys.readouterr().err
