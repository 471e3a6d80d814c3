"""`aa-compile explain`."""

import json

import torch

from aa_compile.cli import main
from aa_compile.models import Transformer, TransformerConfig


def test_explain_cli_random_and_checkpoint(tmp_path, capsys):
    png = tmp_path / "e.png"
    assert main(["explain", "--prompt-len", "6", "--target-len", "2", "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "AtMan explanation" in out and png.read_bytes()[:4] == b"\x89PNG"
    cfg = {"vocab_size": 50, "d_model": 32, "n_layers": 1, "n_heads": 2, "max_seq_len": 32}
    torch.save({"config": cfg, "state_dict": Transformer(TransformerConfig(**cfg)).state_dict()},
               tmp_path / "m.pt")
    assert main(["explain", "--checkpoint", str(tmp_path / "m.pt"), "--prompt", "1 2 3 4",
                 "--target", "5 6", "--mode", "multiplicative", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert len(d["scores"]) == 2 and len(d["scores"][0]) == 4
    assert main(["explain", "--factor", "2"]) == 2


def test_explain_cli_token_id_outside_the_vocabulary(capsys):
    assert main(["explain", "--vocab-size", "50", "--prompt", "1 2 3",
                 "--target", "4 50"]) == 2
    err = capsys.readouterr().err
    assert "aa-compile: error: target[1] = 50 " in err and "[0, 50)" in err
