"""The aa-compile command line."""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from aa_compile.cli import build_parser, main
from aa_compile.models import Transformer, TransformerConfig, save_model


def test_info_lists_ops_and_passes(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert "aa::rms_norm" in info["ops"]
    assert info["ops"]["aa::rms_norm"]["cpu"] == "aa_compile.kernels.rms_norm.cpu:rms_norm_fwd"
    assert "rms_norm" in info["passes"]
    assert "MatMulNBits" in info["onnx"]["aa::int8_linear"]
    assert info["onnx"]["aa::rms_norm"].startswith("standard ops")


def test_info_text_has_an_onnx_line_per_op(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    block = out.split("  aa::int8_linear\n", 1)[1].split("\n  aa::", 1)[0]
    assert "onnx" in block and "MatMulNBits" in block


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


def _checkpoint(kind: str, path: Path) -> str:
    """A checkpoint file that cannot be read (``kind``) at ``path``."""
    cfg = {"vocab_size": 50, "d_model": 32, "n_layers": 1, "n_heads": 2, "max_seq_len": 32}
    if kind == "garbage":  # torch advises weights_only=False for this one
        path.write_bytes(b"\x80\x02" + bytes(range(256)))
    elif kind == "truncated":
        torch.save({"config": cfg, "state_dict": {"w": torch.ones(64)}}, path)
        path.write_bytes(path.read_bytes()[:200])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "global":  # a class weights_only=True refuses
        torch.save({"config": argparse.Namespace(**cfg), "state_dict": {}}, path)
    elif kind == "bare_state_dict":  # fdtm needs {'config', 'state_dict'}
        torch.save({"w": torch.ones(2)}, path)
    elif kind == "wrong_weights":
        torch.save({"config": cfg, "state_dict": {"w": torch.ones(2)}}, path)
    return str(path)


COMMANDS = {
    "explain": ["explain", "--prompt-len", "3", "--target-len", "1"],
    "fdtm": ["fdtm", "sweep", "--n-prompts", "1", "--prompt-len", "3", "--n-tokens", "2"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("kind, reason", [
    ("missing", "No such file or directory"),
    ("garbage", "corrupt or not a torch.save file"),
    ("truncated", "corrupt or not a torch.save file"),
    ("empty", "empty"),
    ("global", "argparse.Namespace"),
    ("wrong_weights", "weights do not fit"),
])
def test_unreadable_checkpoint_is_one_line(tmp_path, capsys, command, kind, reason):
    path = _checkpoint(kind, tmp_path / "m.pt")
    argv = [*COMMANDS[command], "--checkpoint", path]
    if command == "fdtm":
        argv += ["--out", str(tmp_path / "out")]
    assert main(argv) == 2
    cap = capsys.readouterr()
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1, cap.err
    assert lines[0].startswith(f"aa-compile: error: cannot read checkpoint {path}: ")
    assert reason in lines[0]
    assert "weights_only" not in cap.err and "Traceback" not in cap.err
    assert not (tmp_path / "out").exists()


def test_fdtm_checkpoint_needs_a_config(tmp_path, capsys):
    path = _checkpoint("bare_state_dict", tmp_path / "m.pt")
    assert main(["fdtm", "sweep", "--checkpoint", path, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"aa-compile: error: cannot read checkpoint {path}: ")
    assert "'config'" in err


def test_unreadable_checkpoint_exit_code_in_a_process(tmp_path):
    path = _checkpoint("garbage", tmp_path / "m.pt")
    proc = subprocess.run([sys.executable, "-m", "aa_compile.cli", "explain", "--checkpoint",
                           path], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"aa-compile: error: cannot read checkpoint {path}: corrupt or not a torch.save file"]


# -- help, defaults, --threads (issue 16) ------------------------------------------------------


def _parsers(parser: argparse.ArgumentParser, name: str = "aa-compile"):
    """``(name, parser)`` for ``parser`` and every sub-command's parser below it."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, p in action.choices.items():
                yield from _parsers(p, f"{name} {sub}")


def test_every_option_has_help_and_shows_its_default():
    seen = []
    for name, parser in _parsers(build_parser()):
        formatter = parser._get_formatter()
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            if not action.option_strings:  # positionals
                continue
            assert action.help, f"{name} {action.option_strings[0]} has no help text"
            shown = formatter._expand_help(action)
            assert "default" in shown, f"{name} {action.option_strings[0]}: {shown!r}"
            seen.append(name)
    assert {"aa-compile generate", "aa-compile fdtm plan", "aa-compile explain"} <= set(seen)


def test_fdtm_actions_have_their_own_help(capsys):
    helps = {}
    for action in ("sweep", "plan", "apply"):
        with pytest.raises(SystemExit):
            main(["fdtm", action, "--help"])
        helps[action] = capsys.readouterr().out
    assert len(set(helps.values())) == 3
    assert "--levels" in helps["sweep"] and "--levels" not in helps["plan"]
    assert "--budget" in helps["plan"] and "--budget" not in helps["apply"]
    assert "load_applied" in helps["apply"]


@pytest.mark.parametrize("argv", [
    ["report"], ["explain"], ["generate", "--checkpoint", "d"], ["fdtm", "sweep"],
    ["fdtm", "plan"], ["fdtm", "apply"],
])
def test_threads_option(argv):
    assert build_parser().parse_args([*argv, "--threads", "3"]).threads == 3
    with pytest.raises(SystemExit):
        build_parser().parse_args([*argv, "--threads", "0"])


def test_threads_are_set(capsys):
    n = torch.get_num_threads()
    try:
        assert main(["report", "--n-layers", "1", "--d-model", "32", "--json", "--threads",
                     "1"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(n)


def test_generate_needs_a_saved_model_directory(tmp_path, capsys):
    assert main(["generate", "--checkpoint", str(tmp_path / "m.pt")]) == 2
    assert "generate takes a saved model directory" in capsys.readouterr().err
    (tmp_path / "d").mkdir()
    assert main(["generate", "--checkpoint", str(tmp_path / "d")]) == 2
    assert "config.json: no such file" in capsys.readouterr().err


def test_generate_with_a_saved_transformer(tmp_path, capsys):
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(vocab_size=256, d_model=32, n_layers=1, n_heads=2,
                                          max_seq_len=64)).eval()
    save_model(model, tmp_path / "m")
    assert main(["generate", "--checkpoint", str(tmp_path / "m"), "--prompt", "Hi",
                 "--max-new-tokens", "5"]) == 0
    ids = model.generate(torch.tensor([[72, 105]]), 5)[0].tolist()  # "Hi" in UTF-8 by hand
    expected = bytes(ids).decode("utf-8", errors="replace")
    assert capsys.readouterr().out == expected + "\n"
    assert main(["generate", "--checkpoint", str(tmp_path / "m"), "--max-new-tokens",
                 "-1"]) == 2
    assert "--max-new-tokens must be >= 0" in capsys.readouterr().err
