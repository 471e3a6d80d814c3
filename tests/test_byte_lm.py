"""The byte-level training loop shared by the DTM reference model and the SAE base LM."""

from __future__ import annotations

import pytest
import torch

from aa_compile.models.byte_lm import text_bytes, train_byte_lm
from aa_compile.models.transformer import TransformerConfig

CFG = TransformerConfig(vocab_size=256, d_model=32, n_layers=1, n_heads=2, max_seq_len=64)
DATA = text_bytes("abcabcabd " * 200)


def test_text_bytes_are_the_utf8_bytes():
    assert text_bytes("aä").tolist() == [0x61, 0xC3, 0xA4]
    assert text_bytes("").dtype == torch.int64


def test_same_seed_same_model_and_the_loss_falls():
    a, losses = train_byte_lm(CFG, DATA, steps=30, batch=4, seq=16, lr=1e-2, seed=3,
                              show_progress=False)
    b, again = train_byte_lm(CFG, DATA, steps=30, batch=4, seq=16, lr=1e-2, seed=3,
                             show_progress=False)
    assert losses == again
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(),
                                                  b.state_dict().values()))
    assert len(losses) == 30 and sum(losses[-5:]) < sum(losses[:5])
    assert not a.training


@pytest.mark.parametrize("kwargs, match", [
    ({"steps": 0}, "steps and batch must be > 0"),
    ({"batch": 0}, "steps and batch must be > 0"),
    ({"seq": 4000}, "need more than seq"),
])
def test_bad_settings(kwargs, match):
    settings = {"steps": 2, "batch": 2, "seq": 8, "lr": 1e-3, **kwargs}
    with pytest.raises(ValueError, match=match):
        train_byte_lm(CFG, DATA, show_progress=False, **settings)
