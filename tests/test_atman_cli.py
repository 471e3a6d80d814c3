"""`aa-compile explain`."""

import json

import pytest
import torch

from aa_compile.cli import main
from aa_compile.models import Transformer, TransformerConfig, save_model
from aa_compile.models.hat import HATConfig, HATModel


def test_explain_cli_random_and_checkpoint(tmp_path, capsys):
    png = tmp_path / "e.png"
    assert main(["explain", "--prompt-len", "6", "--target-len", "2", "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "AtMan explanation" in out and png.read_bytes()[:4] == b"\x89PNG"
    cfg = {"vocab_size": 50, "d_model": 32, "n_layers": 1, "n_heads": 2, "max_seq_len": 32}
    torch.save({"config": cfg, "state_dict": Transformer(TransformerConfig(**cfg)).state_dict()},
               tmp_path / "m.pt")
    assert main(["explain", "--checkpoint", str(tmp_path / "m.pt"), "--prompt-ids", "1 2 3 4",
                 "--target-ids", "5 6", "--mode", "multiplicative", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert len(d["scores"]) == 2 and len(d["scores"][0]) == 4
    assert main(["explain", "--factor", "2"]) == 2


def test_explain_cli_token_id_outside_the_vocabulary(capsys):
    assert main(["explain", "--vocab-size", "50", "--prompt-ids", "1 2 3",
                 "--target-ids", "4 50"]) == 2
    err = capsys.readouterr().err
    assert "aa-compile: error: target[1] = 50 " in err and "[0, 50)" in err


def test_explain_text_equals_explain_ids(capsys):
    """--prompt/--target are text (UTF-8 bytes by default on the byte-level model) and give
    the same scores as the same bytes given as ids."""
    argv = ["explain", "--d-model", "32", "--n-layers", "1", "--json"]
    assert main([*argv, "--prompt", "The capital of France is", "--target", " Paris"]) == 0
    by_text = json.loads(capsys.readouterr().out)
    prompt_ids = " ".join(str(b) for b in b"The capital of France is")
    assert main([*argv, "--prompt-ids", prompt_ids, "--target-ids", "32 80 97 114 105 115"]) == 0
    by_ids = json.loads(capsys.readouterr().out)
    assert len(by_text["scores"]) == 6 and len(by_text["scores"][0]) == 24
    assert by_text["scores"] == by_ids["scores"]


def test_explain_text_with_a_saved_model(tmp_path, capsys):
    cfg = TransformerConfig(vocab_size=256, d_model=32, n_layers=1, n_heads=2, max_seq_len=64)
    save_model(Transformer(cfg), tmp_path / "m")
    assert main(["explain", "--checkpoint", str(tmp_path / "m"), "--prompt", "Paris is in",
                 "--target", " France", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert len(d["scores"]) == len(" France") and len(d["scores"][0]) == len("Paris is in")


def test_explain_bad_text_options(capsys):
    assert main(["explain", "--prompt", "a", "--prompt-ids", "1"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["explain", "--prompt-ids", "The"]) == 2
    assert "--prompt-ids takes token ids" in capsys.readouterr().err
    assert main(["explain", "--prompt", "a", "--target", "b", "--tokenizer",
                 "/nonexistent/tokenizer"]) == 2
    assert "no such local Hugging Face tokenizer" in capsys.readouterr().err


def test_explain_with_a_local_hugging_face_tokenizer(tmp_path, capsys):
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    vocab = {"[UNK]": 0, "the": 1, "capital": 2, "of": 3, "france": 4, "is": 5, "paris": 6}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]") \
        .save_pretrained(tmp_path / "tok")
    argv = ["explain", "--vocab-size", "16", "--d-model", "32", "--n-layers", "1", "--json"]
    assert main([*argv, "--tokenizer", str(tmp_path / "tok"), "--prompt",
                 "the capital of france is", "--target", "paris"]) == 0
    by_text = json.loads(capsys.readouterr().out)
    assert main([*argv, "--prompt-ids", "1 2 3 4 5", "--target-ids", "6"]) == 0
    by_ids = json.loads(capsys.readouterr().out)
    assert by_text["scores"] == by_ids["scores"] and len(by_text["scores"][0]) == 5


def test_explain_refuses_a_word_level_model(tmp_path, capsys):
    save_model(HATModel(HATConfig.tiny()), tmp_path / "hat")
    assert main(["explain", "--checkpoint", str(tmp_path / "hat"), "--prompt", "a",
                 "--target", "b"]) == 2
    assert "holds a hat model" in capsys.readouterr().err
