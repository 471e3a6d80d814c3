"""`bench.reference_cache`: the DTM benchmarks' trained model is trained once, then loaded."""

from __future__ import annotations

import pytest
import torch

from aa_compile.models.transformer import TransformerConfig
from bench import reference_cache, train_reference

TINY = TransformerConfig(vocab_size=256, d_model=16, n_layers=1, n_heads=2, d_ff=32,
                         max_seq_len=16)
FAST = {"steps": 2, "batch": 2, "seq": 8}


@pytest.fixture
def trainings(monkeypatch, tmp_path):
    """An empty cache folder; counts the trainings that run."""
    monkeypatch.setenv("AA_COMPILE_CACHE", str(tmp_path / "cache"))
    calls = []
    real = train_reference.train

    def counting(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(train_reference, "train", counting)
    return calls


def test_trains_once_then_loads_the_same_weights(trainings, tmp_path):
    first = reference_cache.reference_model(TINY, FAST, progress=False)
    second = reference_cache.reference_model(TINY, FAST, progress=False)
    assert len(trainings) == 1
    assert not second.training
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name
    entry = reference_cache.cache_dir(TINY, {**reference_cache.SETTINGS, **FAST})
    assert entry.parent == tmp_path / "cache"
    assert {p.name for p in entry.iterdir()} >= {"config.json", "model.safetensors"}
    assert [p.name for p in entry.parent.iterdir()] == [entry.name]  # no partial entry left


def test_other_settings_or_config_train_afresh(trainings):
    reference_cache.reference_model(TINY, FAST, progress=False)
    reference_cache.reference_model(TINY, {**FAST, "seed": 1}, progress=False)
    wider = TransformerConfig(**{**TINY.__dict__, "d_ff": 48})
    reference_cache.reference_model(wider, FAST, progress=False)
    assert [c["seed"] for c in trainings] == [0, 1, 0]
    keys = {reference_cache.cache_key(c, s) for c, s in
            ((TINY, FAST), (TINY, {**FAST, "seed": 1}), (wider, FAST))}
    assert len(keys) == 3


def test_the_key_follows_the_training_code(monkeypatch):
    before = reference_cache.cache_key(TINY, FAST)

    def train(cfg, steps=1, **kw):  # another training function
        return None

    monkeypatch.setattr(train_reference, "train", train)
    assert reference_cache.cache_key(TINY, FAST) != before


def test_unknown_settings_are_rejected(trainings):
    with pytest.raises(ValueError, match="unknown training settings \\['epochs'\\]"):
        reference_cache.reference_model(TINY, {"epochs": 3})
    assert trainings == []
