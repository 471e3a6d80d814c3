"""MAD task generators: each task's rules as properties over seeds and parameters, the fixed
public bugs, and bad inputs."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from aa_compile.mad.tasks import (
    IGNORE,
    compression,
    fuzzy_in_context_recall,
    in_context_recall,
    memorization,
    memorization_map,
    noisy_in_context_recall,
    selective_copying,
)

seeds = st.integers(0, 2**32 - 1)


def full_sequence(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The unshifted test sequence: inputs[:-1] plus the last input, which is the last target."""
    return np.append(x, y[-1])


@given(seeds, st.sampled_from([8, 16, 32]), st.sampled_from([4, 8, 16, 64]))
def test_recall_train_targets_are_next_tokens(seed, vocab, seq_len):
    x, y = in_context_recall(np.random.default_rng(seed), vocab, seq_len, is_training=True)
    assert x.shape == y.shape == (seq_len - 1,)
    assert np.array_equal(x[1:], y[:-1])
    assert (x >= 0).all() and (x < vocab).all()


@given(seeds, st.sampled_from([8, 16, 32]), st.sampled_from([4, 8, 32, 128]),
       st.sampled_from([0.0, 0.3, 0.8]))
def test_recall_test_targets_are_values_of_keys_presented_before(seed, vocab, seq_len, frac):
    noise_vocab = 4 if frac else 0
    x, y = in_context_recall(np.random.default_rng(seed), vocab, seq_len, is_training=False,
                             multi_query=True, noise_vocab_size=noise_vocab, frac_noise=frac)
    assert x.shape == y.shape == (seq_len - 1,)
    z = full_sequence(x, y)
    n_plain = vocab - noise_vocab
    n_keys = n_plain // 2
    assert y[-1] != IGNORE  # the final probe always counts
    seen: dict[int, int] = {}
    for p in range(seq_len // 2):
        k, v = int(z[2 * p]), int(z[2 * p + 1])
        key_target, value_target = (y[2 * p - 1] if p else IGNORE), int(y[2 * p])
        assert key_target == IGNORE
        if k >= n_plain:  # a noise pair: two noise tokens, nothing to predict
            assert n_plain <= v < n_plain + noise_vocab
            assert value_target == IGNORE
            continue
        assert 0 <= k < n_keys <= v < n_plain
        if k in seen:
            assert v == seen[k]  # one value per key in a sequence
            assert value_target == v
        else:
            assert value_target == IGNORE
            assert p < seq_len // 2 - 1  # the probe's key was presented before
        seen[k] = v


@given(seeds, st.sampled_from([16, 32]), st.sampled_from([8, 64]))
def test_recall_single_query_uses_copy_prefix(seed, vocab, seq_len):
    x, y = in_context_recall(np.random.default_rng(seed), vocab, seq_len, is_training=False,
                             multi_query=False)
    z = full_sequence(x, y)
    assert len(z) == seq_len + 1
    assert z[-3] == vocab - 1  # copy prefix before the probe pair
    assert (y[:-1] == IGNORE).all() and y[-1] == z[-1]
    assert (z[:-3] < vocab - 1).all()


@given(seeds, st.sampled_from([0.2, 0.6, 0.8]))
def test_noisy_recall_noise_share_and_range(seed, frac):
    rng = np.random.default_rng(seed)
    x, _ = noisy_in_context_recall(rng, vocab_size=48, seq_len=512, noise_vocab_size=16,
                                   frac_noise=frac)
    noise = x >= 32
    assert (x < 48).all()
    # about frac of the 255 pairs are noise (binomial: 6 standard deviations of slack)
    share = noise.sum() / 2 / 255
    assert abs(share - frac) < 6 * np.sqrt(frac * (1 - frac) / 255) + 0.01


def test_recall_all_noise_but_one_slot_still_has_a_probe():
    # frac_noise near 1: only the one guaranteed slot is a real pair
    for seed in range(30):
        x, y = in_context_recall(np.random.default_rng(seed), 12, 8, is_training=False,
                                 noise_vocab_size=4, frac_noise=0.999)
        z = full_sequence(x, y)
        assert y[-1] != IGNORE and z[-2] < 4 and 4 <= z[-1] < 8


@given(seeds, st.sampled_from([16, 32]), st.sampled_from([32, 64, 128]), st.booleans())
def test_fuzzy_recall_probe_repeats_an_earlier_pair(seed, vocab, seq_len, training):
    k_motif, v_motif = 3, 3
    x, y = fuzzy_in_context_recall(np.random.default_rng(seed), vocab, seq_len, k_motif,
                                   v_motif, is_training=training)
    assert x.shape == y.shape == (seq_len,)
    n_plain, pad = vocab - 1, vocab - 1
    n_keys = n_plain // 2
    if training:
        assert np.array_equal(x[1:], y[:-1])
        return
    z = full_sequence(x, y)
    real = np.flatnonzero(z != pad)
    assert (z[:real[0]] == pad).all() and (z[real[0]:] != pad).all()  # left padding only
    assert (y[:real[0]] == IGNORE).all()
    counted = np.flatnonzero(y != IGNORE)
    assert len(counted) and counted[-1] == len(y) - 1
    assert np.array_equal(y[counted], z[counted + 1])  # targets are the values shown
    tail = 0  # the final run of counted targets is the probe's value motif
    while tail < len(y) and y[len(y) - 1 - tail] != IGNORE:
        tail += 1
    assert 1 <= tail <= v_motif
    value = z[len(z) - tail:]
    key = z[len(z) - tail - k_motif:len(z) - tail]  # test keys have k_motif tokens
    assert (key < n_keys).all() and len(set(key.tolist())) == k_motif
    assert ((value >= n_keys) & (value < n_plain)).all()
    pair = np.concatenate([key, value]).tolist()
    body = z[:len(z) - len(pair)].tolist()
    assert any(body[i:i + len(pair)] == pair for i in range(len(body) - len(pair) + 1))


@given(seeds, st.sampled_from([4, 16, 64]), st.sampled_from([(64, 8), (256, 16), (40, 19)]))
def test_selective_copying_targets_are_content_in_order(seed, vocab, shape):
    seq_len, n = shape
    x, y = selective_copying(np.random.default_rng(seed), vocab, seq_len, n)
    assert x.shape == y.shape == (seq_len,)
    blank, copy = vocab - 2, vocab - 1
    assert x[seq_len - n - 1] == copy and (x[seq_len - n:] == blank).all()
    head = x[:seq_len - n - 1]
    content = head[head != blank]
    assert len(content) == n and (content < blank).all()
    assert (head == blank).sum() == seq_len - 2 * n - 1
    assert (y[:seq_len - n] == IGNORE).all()
    assert np.array_equal(y[seq_len - n:], content)
    assert head[-1] != blank  # the public rule: blanks go before content tokens only


def test_selective_copying_leaves_numpy_global_rng_alone():
    np.random.seed(7)
    before = np.random.get_state()[1].copy()
    a = selective_copying(np.random.default_rng(3), 16, 128, 16)
    b = selective_copying(np.random.default_rng(3), 16, 128, 16)
    assert np.array_equal(np.random.get_state()[1], before)
    assert np.array_equal(a[0], b[0])  # same seed, same blanks: reproducible
    c = selective_copying(np.random.default_rng(4), 16, 128, 16)
    assert not np.array_equal(a[0], c[0])


@given(seeds, st.sampled_from([2, 16, 128]), st.sampled_from([2, 32, 256]))
def test_compression_reconstructs_the_sequence(seed, vocab, seq_len):
    x, y = compression(np.random.default_rng(seed), vocab, seq_len)
    assert x.shape == y.shape == (seq_len,)
    assert x[-1] == vocab - 1 and (x[:-1] < vocab - 1).all() and (x >= 0).all()
    assert np.array_equal(x, y)


@given(seeds)
def test_compression_noise_targets_are_ignored(seed):
    x, y = compression(np.random.default_rng(seed), 24, 64, noise_vocab_size=8, frac_noise=0.5)
    noise = x[:-1] >= 15
    assert ((x[:-1] < 23)).all()
    assert (y[:-1][noise] == IGNORE).all()
    assert np.array_equal(y[:-1][~noise], x[:-1][~noise]) and y[-1] == 23


@given(seeds, st.sampled_from([8, 256, 1024]), st.sampled_from([2, 32]))
def test_memorization_targets_follow_the_fixed_map(seed, vocab, seq_len):
    kv = memorization_map(vocab, seed=12345)
    n_keys = (vocab - 1) // 2
    assert sorted(kv) == list(range(n_keys))
    assert len(set(kv.values())) == n_keys
    assert all(n_keys <= v < vocab - 1 for v in kv.values())
    x, y = memorization(np.random.default_rng(seed), vocab, seq_len, kv_map=kv)
    assert x.shape == y.shape == (seq_len,)
    assert (x[1::2] == vocab - 1).all() and (y[0::2] == IGNORE).all()
    assert [kv[int(k)] for k in x[0::2]] == y[1::2].tolist()


def test_memorization_map_depends_on_seed_only():
    assert memorization_map(64, 1) == memorization_map(64, 1)
    assert memorization_map(64, 1) != memorization_map(64, 2)
    x, y = memorization(np.random.default_rng(0), 64, 8, seed=1)
    assert [memorization_map(64, 1)[int(k)] for k in x[0::2]] == y[1::2].tolist()


@pytest.mark.parametrize("call, match", [
    (lambda r: in_context_recall(r, 16, 7), "seq_len must be even"),
    (lambda r: in_context_recall(r, 16, 8, frac_noise=1.0), "frac_noise"),
    (lambda r: in_context_recall(r, 16, 8, frac_noise=0.2), "noise_vocab_size"),
    (lambda r: in_context_recall(r, 1, 8), "no keys or values"),
    (lambda r: fuzzy_in_context_recall(r, 6, 128), "too few key/value tokens"),
    (lambda r: fuzzy_in_context_recall(r, 16, 10), "seq_len"),
    (lambda r: fuzzy_in_context_recall(r, 16, 64, k_motif_size=0), "k_motif_size"),
    (lambda r: selective_copying(r, 16, 33, 16), "seq_len must be >"),
    (lambda r: selective_copying(r, 2, 64, 8), "vocab_size"),
    (lambda r: compression(r, 16, 1), "seq_len"),
    (lambda r: compression(r, 16, 8, frac_noise=0.1), "noise_vocab_size"),
    (lambda r: memorization(r, 64, 7), "seq_len must be even"),
    (lambda r: memorization(r, 3, 8), "vocab_size"),
])
def test_bad_inputs_name_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call(np.random.default_rng(0))
