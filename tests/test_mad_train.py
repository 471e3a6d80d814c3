"""MAD training, the parallel grid, the guard and the ``mad`` CLI on tiny settings (seconds)."""

import json

import pytest
import torch

from aa_compile.mad import (
    RunConfig,
    Setting,
    grid_runs,
    guard,
    make_data,
    rewrite_from_spec,
    run_grid,
    run_one,
    train_model,
    uniform_share,
)
from aa_compile.mad.cli import build_parser, main
from aa_compile.models.mad import LanguageModel

TINY = Setting("memorization", vocab_size=16, seq_len=8, num_train_examples=32,
               num_test_examples=16)


def test_training_lowers_the_loss_and_reports_mad_metrics(one_thread):
    torch.manual_seed(0)
    data = make_data(TINY)
    model = LanguageModel(16, dim=16, max_length=8)
    x, y = torch.from_numpy(data.train_inputs), torch.from_numpy(data.train_targets)
    loss = torch.nn.functional.cross_entropy
    with torch.no_grad():
        before = loss(model(x).flatten(0, 1), y.flatten(), ignore_index=-100).item()
    out = train_model(model, data, lr=1e-2, epochs=15, batch_size=8)
    assert out["train_loss"] < before
    assert out["epochs_run"] <= 15
    assert 0.0 <= out["test_acc"] <= 1.0 and 0.0 <= out["test_token_acc"] <= 1.0


def test_early_stop_at_the_threshold():
    row = run_one(RunConfig("attention-swiglu", TINY, epochs=5, dim=16, stop_accuracy=0.0))
    assert row["epochs_run"] == 1
    assert row["task"] == "memorization" and row["setting"] == TINY.name
    assert row["params"] > 0


def test_grid_expands_models_settings_and_hyperparameters():
    comp = Setting("compression", vocab_size=8, seq_len=8, num_train_examples=8,
                   num_test_examples=8)
    runs = grid_runs(["attention-swiglu", "transformer"], [TINY, comp], lrs=[1e-3, 1e-4],
                     wds=[0.0], epochs={"memorization": 3, "compression": 2}, dim=16)
    # the reference transformer has no auto-encoder form: it skips compression
    assert [(r.model, r.setting.task, r.lr, r.epochs) for r in runs] == [
        ("attention-swiglu", "memorization", 1e-3, 3),
        ("attention-swiglu", "memorization", 1e-4, 3),
        ("transformer", "memorization", 1e-3, 3), ("transformer", "memorization", 1e-4, 3),
        ("attention-swiglu", "compression", 1e-3, 2), ("attention-swiglu", "compression", 1e-4, 2)]


def test_grid_in_two_processes_matches_one_process():
    runs = grid_runs(["attention-swiglu"], [TINY], lrs=[1e-2, 1e-3], wds=[0.0], epochs=2, dim=16)
    seen = []
    parallel = run_grid(runs, workers=2, on_result=seen.append, show_progress=False)
    serial = run_grid(runs, workers=1, show_progress=False)
    assert len(seen) == 2
    for a, b in zip(parallel, serial):
        assert a["lr"] == b["lr"]
        assert a["test_acc"] == pytest.approx(b["test_acc"], abs=1e-6)


def test_guard_aa_backend_keeps_accuracy_and_pruning_is_measured(one_thread):
    torch.manual_seed(0)
    # gated linear attention RMS-normalises its heads: the aa backend rewrites that norm
    model = LanguageModel(16, layers=("gated-linear-attention", "swiglu") * 2, dim=16,
                          max_length=8)
    train_model(model, make_data(TINY), lr=1e-2, epochs=3, batch_size=8)
    same = guard(None, "aa", TINY, trained=model)
    assert same["aa_rewrites"] == {"rms_norm": 2}
    assert same["delta_acc"] == 0.0 and same["max_logit_change"] < 1e-5
    pruned = guard(None, "prune:0.9", TINY, trained=model)
    assert pruned["max_logit_change"] > 0
    assert pruned["before"] == same["before"]


def test_uniform_share_hand_computed():
    model = LanguageModel(16, layers=["swiglu"], dim=16, max_length=8)  # 3 weights of 16 x 48
    assert uniform_share(model, 0.5) == pytest.approx(0.5)
    assert uniform_share(model, 0.3) == pytest.approx(230 / 768)  # round(0.3 * 768) zeroed


def test_bad_run_and_guard_inputs():
    with pytest.raises(ValueError, match="unknown MAD model"):
        RunConfig("mamba", TINY)
    with pytest.raises(ValueError, match="lr"):
        RunConfig("attention-swiglu", TINY, lr=0.0)
    with pytest.raises(ValueError, match="epochs"):
        RunConfig("attention-swiglu", TINY, epochs=0)
    with pytest.raises(ValueError, match="workers"):
        run_grid([], workers=0)
    with pytest.raises(ValueError, match="models"):
        grid_runs([], [TINY])
    with pytest.raises(ValueError, match="unknown rewrite"):
        rewrite_from_spec("int4")
    with pytest.raises(ValueError, match="sparsity"):
        rewrite_from_spec("prune:1.5")
    with pytest.raises(TypeError, match="Setting"):
        guard(None, "aa", "memorization")


def test_cli_run_and_report(tmp_path, capsys):
    out = tmp_path / "mad"
    rc = main(["run", "--tasks", "memorization", "--settings-per-task", "1", "--epochs", "1",
               "--dim", "16", "--train-examples", "16", "--test-examples", "8",
               "--no-progress", "--out", str(out)])
    assert rc == 0
    rows = json.loads((out / "results.json").read_text())
    assert len(rows) == 1 and rows[0]["num_train_examples"] == 16
    assert "attention-swiglu" in capsys.readouterr().out
    assert main(["report", "--results", str(out)]) == 0
    for name in ("results.csv", "scores.csv", "scores.json", "tasks.png", "heatmap.png"):
        assert (out / name).stat().st_size > 0


def test_cli_bad_inputs(tmp_path, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["mad", "run", "--tasks", "copying"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["mad", "run", "--lrs", "fast"])
    assert main(["report", "--results", str(tmp_path)]) == 2
    assert "no MAD results" in capsys.readouterr().err


class SeenLengths(LanguageModel):
    """A MAD stack that records the length of every training batch it sees."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lengths = []

    def forward(self, input_ids):
        if self.training:
            self.lengths.append(input_ids.shape[1])
        return super().forward(input_ids)


def test_length_curriculum_crops_the_first_epochs(one_thread):
    torch.manual_seed(0)
    model = SeenLengths(16, dim=16, max_length=8)
    epochs = []
    train_model(model, make_data(TINY), lr=1e-3, epochs=3, batch_size=8, crop_len=4,
                crop_epochs=2, stop_accuracy=2.0, on_epoch=epochs.append)
    # 32 examples at batch 8: 4 steps per epoch; two epochs at 4 tokens, then the full 8
    assert model.lengths == [4] * 8 + [8] * 4
    assert [e["epoch"] for e in epochs] == [1, 2, 3]
    assert set(epochs[0]) == {"epoch", "train_loss", "test_loss", "test_acc", "test_token_acc",
                              "seconds"}


def test_warmup_ramps_the_lr_then_follows_the_cosine(monkeypatch, one_thread):
    seen = []

    class Recording(torch.optim.AdamW):
        def step(self, closure=None):
            seen.append(self.param_groups[0]["lr"])
            return super().step(closure)

    monkeypatch.setattr(torch.optim, "AdamW", Recording)
    model = LanguageModel(16, dim=16, max_length=8)
    train_model(model, make_data(TINY), lr=1e-2, epochs=2, batch_size=8, warmup_steps=3,
                stop_accuracy=2.0)
    half = 1e-6 + (1e-2 - 1e-6) * 0.5  # cosine over 2 epochs, after the first one
    want = [1e-2 / 3, 2e-2 / 3, 1e-2, 1e-2, half, half, half, half]
    assert seen == pytest.approx(want, rel=1e-9)


def test_bad_schedules():
    with pytest.raises(ValueError, match="go together"):
        RunConfig("attention-swiglu", TINY, crop_len=4)
    with pytest.raises(ValueError, match="go together"):
        RunConfig("attention-swiglu", TINY, crop_epochs=2)
    with pytest.raises(ValueError, match="crop_len"):
        RunConfig("attention-swiglu", TINY, crop_len=0, crop_epochs=1)
    with pytest.raises(ValueError, match="warmup_steps"):
        train_model(LanguageModel(16, dim=16, max_length=8), make_data(TINY), warmup_steps=-1)


def test_cli_passes_the_schedule_to_the_runs(tmp_path):
    out = tmp_path / "mad"
    rc = main(["run", "--models", "attention4-swiglu", "--tasks", "memorization",
               "--settings-per-task", "1", "--epochs", "2", "--dim", "16",
               "--train-examples", "16", "--test-examples", "8", "--warmup-steps", "2",
               "--crop-len", "4", "--crop-epochs", "1", "--no-progress", "--out", str(out)])
    assert rc == 0
    rows = json.loads((out / "results.json").read_text())
    assert rows[0]["model"] == "attention4-swiglu" and rows[0]["epochs_run"] == 2
    assert (rows[0]["warmup_steps"], rows[0]["crop_len"], rows[0]["crop_epochs"]) == (2, 4, 1)
