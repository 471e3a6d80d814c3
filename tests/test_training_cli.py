"""The training CLIs keep their work: ``--out DIR`` writes a saved model that `load_model` and
``aa-compile generate`` read back (the same continuation as right after training), ``--threads``
sets torch's thread count, ``umup_train --fp8`` trains through the aa backend, every option
has help with its default, and the HAT loss plot's legend names only lines that are drawn."""

from __future__ import annotations

import argparse
import ast
import json

import matplotlib.figure
import pytest
import torch

from aa_compile import cli
from aa_compile.models import Transformer, load_model, load_tokenizer, umup_train
from aa_compile.models.hat import HATModel
from aa_compile.models.hat import train as hat_train
from aa_compile.models.tfree import TFreeLM, TrigramTokenizer
from aa_compile.models.tfree import train as tfree_train
from aa_compile.models.umup import UmupTransformer
from bench import train_reference

PROMPT = "The function returns"


@pytest.fixture(autouse=True)
def _keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _generated(stdout: str) -> str:
    """The text the training CLI printed as ``generated: 'repr'``."""
    line = next(x for x in stdout.splitlines() if x.startswith("generated: "))
    return ast.literal_eval(line.removeprefix("generated: "))


def _cli_generate(capsys, directory, n: int) -> str:
    assert cli.main(["generate", "--checkpoint", str(directory), "--prompt", PROMPT,
                     "--max-new-tokens", str(n), "--threads", "1"]) == 0
    return capsys.readouterr().out.removesuffix("\n")


def test_tfree_train_out_round_trip(tmp_path, capsys):
    out = tmp_path / "tfree"
    assert tfree_train.main(["--steps", "3", "--batch", "2", "--seq", "8", "--vocab-size", "256",
                             "--m", "4", "--d-model", "32", "--layers", "1", "--heads", "2",
                             "--generate", "4", "--threads", "1", "--prompt", PROMPT,
                             "--out", str(out)]) == 0
    assert torch.get_num_threads() == 1
    generated = _generated(capsys.readouterr().out)
    model = load_model(out)
    assert isinstance(model, TFreeLM) and model.config.m == 4
    tok = load_tokenizer(out)
    assert isinstance(tok, TrigramTokenizer) and (tok.vocab_size, tok.m) == (256, 4)
    assert _cli_generate(capsys, out, 4) == generated
    meta = json.loads((out / "config.json").read_text())
    assert meta["kind"] == "tfree" and meta["training"]["steps"] == 3


def test_hat_train_out_round_trip(tmp_path, capsys):
    out = tmp_path / "hat"
    result = hat_train.main(["--steps", "2", "--docs", "2", "--window", "64", "--generate", "6",
                             "--threads", "1", "--no-progress", "--prompt", PROMPT,
                             "--out", str(out)])
    assert isinstance(result.model, HATModel)  # train() returns the model
    generated = _generated(capsys.readouterr().out)
    assert isinstance(load_model(out), HATModel)
    assert _cli_generate(capsys, out, 6) == generated


def test_umup_train_out_round_trip(tmp_path, capsys):
    out = tmp_path / "umup"
    assert umup_train.main(["--steps", "3", "--batch", "2", "--seq", "16", "--width", "32",
                            "--depth", "1", "--heads", "2", "--generate", "6", "--threads", "1",
                            "--prompt", PROMPT, "--out", str(out)]) == 0
    generated = _generated(capsys.readouterr().out)
    assert isinstance(load_model(out), UmupTransformer)
    assert _cli_generate(capsys, out, 6) == generated


def test_umup_train_fp8(tmp_path, capsys):
    out = tmp_path / "umup8"
    assert umup_train.main(["--steps", "2", "--batch", "2", "--seq", "16", "--width", "32",
                            "--depth", "1", "--heads", "2", "--generate", "0", "--threads", "1",
                            "--fp8", "static", "--inner-compiler", "eager", "--out", str(out)]) == 0
    assert "backend aa, fp8 static" in capsys.readouterr().out
    meta = json.loads((out / "config.json").read_text())
    assert meta["training"]["backend"] == "aa" and meta["training"]["args"]["fp8"] == "static"
    assert isinstance(load_model(out), UmupTransformer)
    with pytest.raises(SystemExit) as e:
        umup_train.main(["--fp8", "static", "--backend", "eager"])
    assert e.value.code == 2
    assert "--fp8 static needs --backend aa" in capsys.readouterr().err


def test_train_reference_out_dir_and_pt(tmp_path, capsys):
    argv = ["--steps", "2", "--batch", "2", "--seq", "16", "--threads", "1"]
    assert train_reference.main([*argv, "--out", str(tmp_path / "ref")]) == 0
    loaded = load_model(tmp_path / "ref")
    assert isinstance(loaded, Transformer)
    model, _ = train_reference.train(steps=2, batch=2, seq=16, progress=False)  # same seed
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert train_reference.main([*argv, "--out", str(tmp_path / "ref.pt")]) == 0  # older format
    old = train_reference.load(tmp_path / "ref.pt")
    assert torch.equal(old.embed.weight, loaded.embed.weight)


def test_hat_train_returns_the_model():
    result = hat_train.train(steps=1, docs=2, window=64, progress=False)
    assert isinstance(result.model, HATModel) and not result.model.training
    assert "model" not in result.to_dict() and result.to_dict()["steps"] == 1


@pytest.mark.parametrize("steps", [1, 3, 12])
def test_hat_plot_legend_names_only_drawn_lines(tmp_path, monkeypatch, steps):
    figures = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda self, *a, **k: figures.append(self))
    result = hat_train.TrainResult([3.0 - 0.1 * i for i in range(steps)], 1.0, steps, 10, 5)
    hat_train.plot(result, str(tmp_path / "p.png"))
    (ax,) = figures[0].axes
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert labels and len(set(labels)) == len(labels)
    for label in labels:  # a line needs two points, or a marker for one point
        line = lines[label]
        assert len(line.get_xdata()) >= 2 or line.get_marker() not in (None, "None", ""), label


def test_training_write_pngs(tmp_path):
    """--plot of a training CLI writes a PNG."""
    hat_train.plot(hat_train.TrainResult([3.0, 2.5, 2.0, 1.8], 1.0, 4, 10, 5),
                   str(tmp_path / "h.png"))
    assert (tmp_path / "h.png").read_bytes()[:4] == b"\x89PNG"


PARSERS = {
    "tfree.train": tfree_train.build_parser,
    "hat.train": hat_train.build_parser,
    "umup_train": umup_train.build_parser,
    "bench.train_reference": train_reference.build_parser,
}


@pytest.mark.parametrize("name", list(PARSERS))
def test_every_training_option_has_help_and_default(name):
    parser = PARSERS[name]()
    formatter = parser._get_formatter()
    options = {}
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{name} {action.option_strings} has no help"
        shown = formatter._expand_help(action)
        assert "default" in shown, f"{name} {action.option_strings}: {shown!r}"
        options[action.dest] = action
    assert {"out", "threads"} <= set(options)
