"""The HAT adapter of the MAD suite: the library's HAT model on MAD tokens (seconds)."""

import pytest
import torch

from aa_compile.mad import Setting, grid_runs, guard, make_data, model_spec, train_model
from aa_compile.models.hat import ByteBatch
from aa_compile.models.mad import HATTokenModel

RECALL = Setting("in-context-recall", vocab_size=16, seq_len=16, num_train_examples=64,
                 num_test_examples=16)


def test_hat_adapter_equals_hat_on_hand_packed_words(one_thread):
    torch.manual_seed(0)
    model = HATTokenModel(16, dim=32, max_length=16, word_len=2).eval()
    ids = torch.randint(0, 16, (3, 7))
    # restated: each row one document, each pair of tokens one word (the last one alone)
    docs = [[bytes(row[i:i + 2].tolist()) for i in range(0, 7, 2)] for row in ids]
    with torch.no_grad():
        want = model.hat(ByteBatch.from_words(docs)).view(3, 7, 256)[..., :16]
        got = model(ids)
    assert got.shape == (3, 7, 16)
    torch.testing.assert_close(got, want)


def test_hat_adapter_is_causal(one_thread):
    torch.manual_seed(0)
    model = HATTokenModel(16, dim=32, max_length=16, word_len=2).eval()
    ids = torch.randint(0, 16, (1, 12))
    changed = ids.clone()
    changed[0, 7] = (ids[0, 7] + 1) % 16  # the second token of word 3
    with torch.no_grad():
        a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_hat_spec_takes_byte_vocabularies_only():
    spec = model_spec("hat")
    small = Setting("memorization", vocab_size=256, seq_len=8, num_train_examples=4)
    big = Setting("memorization", vocab_size=512, seq_len=8, num_train_examples=4)
    comp = Setting("compression", vocab_size=16, seq_len=8, num_train_examples=4)
    assert spec.takes(small) and not spec.takes(big) and not spec.takes(comp)
    with pytest.raises(ValueError, match="at most 256"):
        spec.model_for(big, 32)
    runs = grid_runs(["hat", "attention-swiglu"], [small, big, comp], lrs=[1e-3], wds=[0.0])
    assert [(r.model, r.setting.vocab_size, r.setting.task) for r in runs] == [
        ("hat", 256, "memorization"), ("attention-swiglu", 256, "memorization"),
        ("attention-swiglu", 512, "memorization"), ("attention-swiglu", 16, "compression")]


def test_guard_aa_on_hat_fires_the_hat_passes_and_keeps_accuracy(one_thread):
    torch.manual_seed(0)
    model = model_spec("hat").model_for(RECALL, 32)
    train_model(model, make_data(RECALL), lr=3e-3, epochs=2, batch_size=16)
    out = guard(None, "aa", RECALL, trained=model)
    # one windowed attention per byte stack (1 encoder + 1 decoder layer), one word pooling,
    # one guide vector; RMSNorm: 2 per block in 4 blocks, 3 final norms, the pooling query norm
    assert out["aa_rewrites"] == {"rms_norm": 12, "hat_window_attention": 2,
                                  "hat_word_pool": 1, "hat_guide_add": 1}
    assert out["delta_acc"] == 0.0 and out["max_logit_change"] < 1e-4


def test_bad_hat_adapter_inputs():
    with pytest.raises(ValueError, match="256 byte values"):
        HATTokenModel(300)
    with pytest.raises(ValueError, match="word_len"):
        HATTokenModel(16, word_len=0)
    model = HATTokenModel(16, dim=32, max_length=8)
    with pytest.raises(ValueError, match="token ids"):
        model(torch.full((1, 4), 16))
    with pytest.raises(ValueError, match="exceeds max_length"):
        model(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[batch, seq\]"):
        model(torch.zeros(4, dtype=torch.long))
