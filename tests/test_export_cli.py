"""``aa-compile export onnx`` (`aa_compile.export.cli`): writes a checked ONNX file of a random
or saved model and prints the report; bad options fail naming the option."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from aa_compile.export.cli import add_subcommand  # noqa: E402
from aa_compile.models import Transformer, TransformerConfig, save_model  # noqa: E402


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="aa-compile")
    add_subcommand(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


SMALL = ["--d-model", "32", "--layers", "1", "--vocab-size", "64", "--seq-len", "4",
         "--threads", "1"]


def test_random_model_json_report(tmp_path, capsys):
    out = tmp_path / "m.onnx"
    assert _run(["export", "onnx", "--out", str(out), "--json", *SMALL]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ops"]["aa::rms_norm"][0] == 3  # 2 per layer + the final norm
    assert report["runtime"] == "onnxruntime" and report["bounds"] == {"seq": 64}
    assert report["dynamic"] == {"0": {"0": "batch", "1": "seq"}}
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: torch.zeros(3, 5, dtype=torch.int64)
                                .numpy()})[0]
    assert logits.shape == (3, 5, 64)


def test_saved_checkpoint(tmp_path, capsys):
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2,
                                          max_seq_len=32))
    save_model(model, tmp_path / "saved")
    out = tmp_path / "saved.onnx"
    assert _run(["export", "onnx", "--checkpoint", str(tmp_path / "saved"), "--out", str(out),
                 "--static", "--seq-len", "4", "--threads", "1"]) == 0
    assert "aa::rms_norm x3" in capsys.readouterr().out
    assert out.exists()


@pytest.mark.parametrize("extra, match", [
    (["--options", "{not json"], "--options must be a JSON object"),
    (["--options", "[1]"], "--options must be a JSON object"),
    (["--batch", "1"], "--batch must be >= 2"),
    (["--checkpoint", "/nonexistent/dir"], "not a saved model directory"),
])
def test_bad_options(extra, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        _run(["export", "onnx", "--out", str(tmp_path / "x.onnx"), *SMALL, *extra])


def test_runtime_option(tmp_path, capsys):
    out = tmp_path / "s.onnx"
    assert _run(["export", "onnx", "--out", str(out), "--runtime", "standard", *SMALL]) == 0
    assert "for standard" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        _run(["export", "onnx", "--out", str(out), "--runtime", "tensorrt", *SMALL])
