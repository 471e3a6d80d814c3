"""TFreeLM: batching, causality, KV-cache decoding, a tiny training run, compiled == eager."""

import subprocess
import sys

import pytest
import torch

from aa_compile.models.tfree import TrigramTokenizer, text_to_words
from aa_compile.models.tfree.lm import TFreeInputs, TFreeLM, TFreeLMConfig, WordStream
from aa_compile.models.tfree.train import loss_function, train

CFG = TFreeLMConfig(vocab_size=256, m=4, d_model=32, n_layers=2, n_heads=4, max_seq_len=32)


def tok():
    return TrigramTokenizer(vocab_size=CFG.vocab_size, m=CFG.m, k_lower=1)


def model(seed=0):
    torch.manual_seed(seed)
    return TFreeLM(CFG).eval()


def test_inputs_from_words_layout_and_targets():
    t = tok()
    seqs = [["Hello", "world", "!"], ["a", "b", "c", "d", "e"]]
    x = TFreeInputs.from_words(t, seqs)
    assert (x.batch, x.seq) == (2, 4)  # the longest row has 5 words -> 4 inputs
    # the trigrams of input word (b, s) carry flat position b * 4 + s, in order
    want_pos, want_slots = [], []
    for b, seq in enumerate(seqs):
        for s, w in enumerate(seq[:-1]):
            slots = t.word_slots(w).view(-1, CFG.m)
            want_slots.append(slots)
            want_pos += [b * 4 + s] * slots.shape[0]
    assert x.word_of_trigram.tolist() == want_pos
    assert torch.equal(x.trigram_slots, torch.cat(want_slots))
    for b, seq in enumerate(seqs):
        for s in range(4):
            has_next = s + 1 < len(seq)
            assert x.loss_weights[b, s].item() == float(has_next)
            want = torch.zeros(CFG.vocab_size)
            if has_next:
                want[t.target_pattern(seq[s + 1])] = 1
            assert torch.equal(x.targets[b, s], want)


def test_inputs_bad_rows_and_empty():
    t = tok()
    enc = t.encode("one two three")
    with pytest.raises(ValueError, match="rows"):
        TFreeInputs.from_trigrams(enc, CFG.m, [range(5)], CFG.vocab_size)
    with pytest.raises(ValueError, match="rows"):
        TFreeInputs.from_trigrams(enc, CFG.m, [range(0, 3, 2)], CFG.vocab_size)
    with pytest.raises(ValueError, match="at least one"):
        TFreeInputs.from_words(t, [["only"]])


def test_encode_words_keeps_words_as_given():
    t = tok()
    words = text_to_words("Größe 12, <|endoftext|>\n\n  x")
    a, b = t.encode_words(words), t.encode(words_text := "Größe 12, <|endoftext|>\n\n  x")
    assert a.words == b.words == text_to_words(words_text)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.offsets, b.offsets)
    e = t.encode_words(["", "ab"])
    assert e.offsets[:2].tolist() == [0, 0]  # the empty word has no trigrams
    with pytest.raises(TypeError):
        t.encode_words("not a list")


def test_causal_over_words():
    lm, t = model(), tok()
    a = TFreeInputs.from_words(t, [["the", "cat", "sat", "on", "mat"]], targets=False)
    b = TFreeInputs.from_words(t, [["the", "cat", "sat", "on", "hat"]], targets=False)
    la = lm(a.trigram_slots, a.word_of_trigram, 1, a.seq)
    lb = lm(b.trigram_slots, b.word_of_trigram, 1, b.seq)
    torch.testing.assert_close(la[:, :4], lb[:, :4])
    assert not torch.allclose(la[:, 4], lb[:, 4])


def test_kv_cache_steps_equal_the_full_forward():
    lm, t = model(), tok()
    words = ["one", "small", "step", "for", "a", "model"]
    full = TFreeInputs.from_words(t, [words], targets=False)
    want = lm(full.trigram_slots, full.word_of_trigram, 1, full.seq)
    cache = lm.new_cache(1, 8)
    got = []
    for chunk in (words[:3], words[3:4], words[4:]):
        x = TFreeInputs.from_words(t, [chunk], targets=False)
        got.append(lm(x.trigram_slots, x.word_of_trigram, 1, x.seq, cache))
    torch.testing.assert_close(torch.cat(got, 1), want, atol=1e-5, rtol=1e-5)


def test_generate_returns_dictionary_words_and_checks_arguments():
    lm, t = model(), tok()
    vocab = ["red", "green", "blue", "<|endoftext|>"]
    out = lm.generate(t, "the sky is", 5, words=vocab)
    assert 1 <= len(out) <= 5
    assert set(out) <= set(vocab) | {"the", "sky", "is"}
    with pytest.raises(ValueError, match="max_words"):
        lm.generate(t, "x", -1)
    with pytest.raises(ValueError, match="no words"):
        lm.generate(t, "", 3)
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        lm.generate(t, "x", 40)
    with pytest.raises(ValueError, match="does not match"):
        lm.generate(TrigramTokenizer(vocab_size=512, m=4), "x", 1)


def test_config_and_inputs_errors():
    with pytest.raises(TypeError):
        TFreeLM(CFG.transformer())
    with pytest.raises(ValueError):
        TFreeLMConfig(d_model=30, n_heads=4).transformer()
    lm = model()
    x = TFreeInputs.from_words(tok(), [["a", "b"]], targets=False)
    with pytest.raises(ValueError, match="targets"):
        lm.loss(x)


def test_tiny_training_run_loss_falls():
    cfg = TFreeLMConfig(vocab_size=512, m=6, d_model=64, n_layers=2, n_heads=4,
                        max_seq_len=64)
    res = train(cfg, steps=60, batch=4, seq=32, lr=3e-3)
    first, last = sum(res.losses[:10]) / 10, sum(res.losses[-10:]) / 10
    assert last < 0.9 * first, (first, last)


def test_compiled_loss_and_grads_equal_eager():
    """backend="aa" (inner compiler inductor) trains the same numbers as eager."""
    backend = "aa"
    lm, t = model(), tok()
    stream = WordStream(t, "A tiny corpus, with some words: and more words to train on. " * 4)
    batch = stream.batch(2, 8, torch.Generator().manual_seed(0))
    want = loss_function(lm, "eager")(batch)
    want.backward()
    grads = {n: p.grad.clone() for n, p in lm.named_parameters()}
    lm.zero_grad()
    got = loss_function(lm, backend)(batch)
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for n, p in lm.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-3, atol=1e-4, msg=n)


def test_aa_rewrites_the_tfree_layers_of_the_lm():
    """Under backend="aa" the embedding becomes aa::trigram_bag and the 2L+1 RMSNorms
    aa::rms_norm (eager inner compiler: the graph rewrite without inductor's compile time)."""
    import aa_compile

    lm, t = model(), tok()
    x = TFreeInputs.from_words(t, [["a", "tiny", "test", "of", "words"]])

    def step(slots, where, targets, weights):
        return lm.head.loss(lm(slots, where, x.batch, x.seq), targets, weights)

    args = (x.trigram_slots, x.word_of_trigram, x.targets, x.loss_weights)
    rep = aa_compile.report(step, *args, options={"inner_compiler": "eager"})
    assert rep.rewrites["tfree_embedding"] == 1
    assert rep.rewrites["rms_norm"] == 2 * CFG.n_layers + 1
    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aa", options={"inner_compiler": "eager"})
    torch.testing.assert_close(compiled(*args), step(*args), rtol=1e-5, atol=1e-5)


def test_training_cli(tmp_path):
    png = tmp_path / "loss.png"
    out = subprocess.run(
        [sys.executable, "-m", "aa_compile.models.tfree.train", "--steps", "3", "--batch", "2",
         "--seq", "8", "--vocab-size", "256", "--m", "4", "--d-model", "32", "--layers", "1",
         "--generate", "3", "--plot", str(png)],
        check=False, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "3 steps" in out.stdout and "generated:" in out.stdout
    assert png.stat().st_size > 1000
    helped = subprocess.run([sys.executable, "-m", "aa_compile.models.tfree.train", "--help"],
                            check=False, capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0 and "--backend" in helped.stdout
