"""Saved models (`aa_compile.models.save_model` / `load_model`): bit-exact round trips of every
kind, the tokenizer saved with them, and a clear error for every kind of bad directory."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from aa_compile.models import (
    ByteTokenizer,
    Transformer,
    TransformerConfig,
    load_model,
    load_tokenizer,
    load_words,
    save_model,
)
from aa_compile.models.hat import HATConfig, HATModel
from aa_compile.models.tfree import TFreeLM, TFreeLMConfig, TrigramTokenizer
from aa_compile.models.umup import UmupConfig, UmupTransformer

WORDS = ["the", "cat", "sat", "on", "mat", "dog", "ran", "far"]


def _transformer(tied: bool = False) -> Transformer:
    return Transformer(TransformerConfig(vocab_size=260, d_model=32, n_layers=1, n_heads=2,
                                         max_seq_len=32, tie_embeddings=tied))


def _tfree() -> tuple[TFreeLM, TrigramTokenizer]:
    cfg = TFreeLMConfig(vocab_size=128, m=4, d_model=32, n_layers=1, n_heads=2, max_seq_len=32)
    return TFreeLM(cfg), TrigramTokenizer(vocab_size=128, m=4, k_lower=1)


def _generate(kind: str, model, tokenizer=None, words=None):
    """A short greedy continuation: what a user of the loaded model would see."""
    ids = torch.tensor([[84, 104, 101, 32, 99]])
    if kind == "tfree":
        return model.generate(tokenizer, "the cat sat", 4, words=words)
    if kind == "hat":
        return model.generate("The cat", max_bytes=6)
    return model.generate(ids, 6).tolist()


def _model(kind: str):
    torch.manual_seed(1)
    if kind == "transformer":
        return _transformer(), None
    if kind == "tied":
        return _transformer(tied=True), None
    if kind == "tfree":
        return _tfree()
    if kind == "hat":
        return HATModel(HATConfig.tiny()), None
    return UmupTransformer(UmupConfig(d_model=32, n_layers=1, n_heads=2, max_seq_len=32)), None


@pytest.mark.parametrize("kind", ["transformer", "tied", "tfree", "hat", "umup"])
def test_round_trip_is_bit_exact_and_generates_the_same(tmp_path, kind):
    model, tokenizer = _model(kind)
    model.eval()
    words = WORDS if kind == "tfree" else None
    before = _generate("tfree" if kind == "tfree" else kind, model, tokenizer, words)
    save_model(model, tmp_path / "m", tokenizer=tokenizer, words=words,
               training={"steps": 3, "final_loss": 1.5})
    loaded = load_model(tmp_path / "m")
    assert type(loaded) is type(model) and not loaded.training
    assert loaded.config == model.config
    ref, got = model.state_dict(), loaded.state_dict()
    assert list(got) == list(ref)
    for key in ref:
        assert got[key].dtype == ref[key].dtype and torch.equal(got[key], ref[key]), key
    tok = load_tokenizer(tmp_path / "m")
    if kind == "tfree":
        assert isinstance(tok, TrigramTokenizer) and repr(tok) == repr(tokenizer)
        assert load_words(tmp_path / "m") == WORDS
    else:
        assert isinstance(tok, ByteTokenizer) and load_words(tmp_path / "m") is None
    assert _generate(kind, loaded, tok, load_words(tmp_path / "m")) == before
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    assert meta["format"] == "aa-compile-model" and meta["training"]["steps"] == 3


def test_a_fresh_model_differs(tmp_path):
    """The round trip test compares real weights: another seed gives other ones."""
    model, _ = _model("transformer")
    save_model(model, tmp_path / "m")
    torch.manual_seed(2)
    other = _transformer()
    assert not torch.equal(other.embed.weight, load_model(tmp_path / "m").embed.weight)


def test_tied_weights_are_stored_once_and_stay_tied(tmp_path):
    model, _ = _model("tied")
    save_model(model, tmp_path / "m")
    stored = load_file(str(tmp_path / "m" / "model.safetensors"))
    assert "embed.weight" in stored and "lm_head.weight" not in stored
    loaded = load_model(tmp_path / "m")
    assert loaded.lm_head.weight is loaded.embed.weight


def test_dtype_is_kept(tmp_path):
    model = _transformer().to(torch.bfloat16)
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert loaded.embed.weight.dtype == torch.bfloat16
    assert torch.equal(loaded.embed.weight, model.embed.weight)


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    assert tok.encode("Aé") == [65, 0xC3, 0xA9]  # UTF-8 by hand
    assert tok.decode([65, 0xC3, 0xA9]) == "Aé"
    assert tok("Hi")["input_ids"] == [72, 105]
    assert tok.convert_ids_to_tokens([72, 105]) == ["H", "i"]
    with pytest.raises(TypeError, match="must be a str"):
        tok.encode(b"bytes")


def test_hugging_face_tokenizer_is_recorded_by_name(tmp_path):
    save_model(_transformer(), tmp_path / "m", tokenizer="some/local-tokenizer")
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    assert meta["tokenizer"] == {"type": "huggingface", "name": "some/local-tokenizer"}
    with pytest.raises(ValueError, match="bad tokenizer"):  # not there: local files only
        load_tokenizer(tmp_path / "m")


# -- bad input --------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    save_model(_transformer(), tmp_path / "m")
    return tmp_path / "m"


def _edit_config(directory, **changes):
    path = directory / "config.json"
    meta = json.loads(path.read_text())
    meta.update(changes)
    path.write_text(json.dumps(meta))
    return meta


def test_not_a_directory(tmp_path):
    with pytest.raises(ValueError, match=r"nothing.*does not exist"):
        load_model(tmp_path / "nothing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is not a directory"):
        load_model(tmp_path / "file")


def test_missing_files(tmp_path, saved):
    (saved / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"model\.safetensors: no such file"):
        load_model(saved)
    (saved / "config.json").unlink()
    with pytest.raises(ValueError, match=r"config\.json: no such file"):
        load_model(saved)


def test_bad_config_json(saved):
    (saved / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json: not valid JSON"):
        load_model(saved)
    (saved / "config.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not an aa-compile-model config"):
        load_model(saved)


def test_wrong_kind_and_version(saved):
    _edit_config(saved, kind="llama")
    with pytest.raises(ValueError, match=r"unknown kind 'llama'"):
        load_model(saved)
    _edit_config(saved, kind="transformer", version=99)
    with pytest.raises(ValueError, match="version 99 is not supported"):
        load_model(saved)


def test_kind_that_does_not_fit_the_config_or_the_weights(saved):
    meta = _edit_config(saved, kind="umup")
    with pytest.raises(ValueError, match=r"bad config for kind 'umup'.*tie_embeddings"):
        load_model(saved)
    umup_fields = {k: v for k, v in meta["config"].items() if k != "tie_embeddings"}
    _edit_config(saved, config=umup_fields)  # a valid UmupConfig: now the weights decide
    with pytest.raises(ValueError, match=r"do not fit the UmupTransformer: unexpected keys "
                       r".*norm\.weight"):
        load_model(saved)


def test_bad_config_field(saved):
    meta = json.loads((saved / "config.json").read_text())
    _edit_config(saved, config={**meta["config"], "n_experts": 4})
    with pytest.raises(ValueError, match=r"config\.json: bad config for kind 'transformer'.*"
                       "n_experts"):
        load_model(saved)
    _edit_config(saved, config={**meta["config"], "d_model": 33})
    with pytest.raises(ValueError, match="d_model=33 must be divisible"):
        load_model(saved)


def test_extra_and_missing_keys_are_named(saved):
    path = saved / "model.safetensors"
    tensors = load_file(str(path))
    del tensors["norm.weight"]
    tensors["adapter.weight"] = torch.zeros(2)
    save_file(tensors, str(path))
    with pytest.raises(ValueError, match=r"missing keys norm\.weight; unexpected keys "
                       r"adapter\.weight"):
        load_model(saved)


def test_shape_mismatch_is_named(saved):
    path = saved / "model.safetensors"
    tensors = load_file(str(path))
    tensors["norm.weight"] = torch.ones(7)
    save_file(tensors, str(path))
    with pytest.raises(ValueError, match=r"norm\.weight \(7,\) vs \(32,\)"):
        load_model(saved)


def test_corrupt_weights(saved):
    (saved / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_model(saved)


def test_save_refuses_other_models_and_misplaced_words(tmp_path):
    with pytest.raises(ValueError, match="cannot save a Linear"):
        save_model(torch.nn.Linear(2, 2), tmp_path / "m")
    with pytest.raises(ValueError, match="only apply to T-FREE"):
        save_model(_transformer(), tmp_path / "m", words=["a"])
    with pytest.raises(TypeError, match="cannot describe a int tokenizer"):
        save_model(_transformer(), tmp_path / "m", tokenizer=3)
    model, _ = _tfree()
    with pytest.raises(ValueError, match="does not match the model"):
        save_model(model, tmp_path / "m", tokenizer=TrigramTokenizer(vocab_size=64, m=4))


def test_unknown_tokenizer_type(saved):
    _edit_config(saved, tokenizer={"type": "sentencepiece"})
    with pytest.raises(ValueError, match="unknown tokenizer type 'sentencepiece'"):
        load_tokenizer(saved)
