"""MAD settings (the 66 benchmark settings as data), data sets from one seeded stream, the
leakage check, and the macro accuracy / MAD score against hand-computed values."""

import collections
import dataclasses

import numpy as np
import pytest
import torch

from aa_compile.mad.data import leakage_fraction, make_data
from aa_compile.mad.metrics import ClassCounts, macro_accuracy, mad_scores
from aa_compile.mad.settings import Setting, baseline, quick_settings, settings
from aa_compile.mad.tasks import GENERATORS, IGNORE, TASKS


def test_sixty_six_settings_with_the_published_counts():
    all_settings = settings()
    assert len(all_settings) == 66
    counts = collections.Counter(s.task for s in all_settings)
    assert counts == {"in-context-recall": 11, "fuzzy-in-context-recall": 11, "compression": 11,
                      "noisy-in-context-recall": 14, "selective-copying": 13,
                      "memorization": 6}
    assert len({s.name for s in all_settings}) == 66
    assert all(s.num_test_examples == 1280 and s.seed == 12345 for s in all_settings)


def test_changes_vary_one_variable_from_the_baseline():
    for task in TASKS:
        base, *changes = settings(task)
        assert base.change == "baseline"
        for s in changes:
            differ = [f.name for f in dataclasses.fields(Setting)
                      if f.name != "change" and getattr(s, f.name) != getattr(base, f.name)]
            assert differ == [s.change], (s, differ)


def test_settings_match_the_task_configs():
    assert baseline("noisy-in-context-recall") == Setting(
        "noisy-in-context-recall", vocab_size=32, noise_vocab_size=16, seq_len=128,
        frac_noise=0.2)
    assert baseline("selective-copying").num_tokens_to_copy == 16
    assert baseline("fuzzy-in-context-recall").k_motif_size == 3
    assert baseline("memorization") == Setting("memorization", vocab_size=256, seq_len=32,
                                               num_train_examples=256)
    by_change = collections.defaultdict(list)
    for s in settings():
        by_change[s.task, s.change].append(s)
    assert [s.vocab_size for s in by_change["noisy-in-context-recall", "vocab_size"]] == \
        [48, 80, 144]
    assert [s.frac_noise for s in by_change["noisy-in-context-recall", "frac_noise"]] == \
        [0.4, 0.6, 0.8]
    assert [s.num_tokens_to_copy for s in by_change["selective-copying",
                                                     "num_tokens_to_copy"]] == [32, 64, 96]
    assert [s.seq_len for s in by_change["selective-copying", "seq_len"]] == [512, 1024]
    assert [s.seq_len for s in by_change["compression", "seq_len"]] == [64, 128, 256]
    assert [s.vocab_size for s in by_change["memorization", "vocab_size"]] == \
        [512, 1024, 2048, 4096, 8192]
    assert [s.num_train_examples for s in by_change["in-context-recall",
                                                     "num_train_examples"]] == \
        [6400, 3200, 1600, 800]


def test_quick_grid_covers_every_task():
    assert {s.task for s in quick_settings()} == set(TASKS)


def test_train_then_test_from_one_stream():
    s = Setting("in-context-recall", vocab_size=16, seq_len=16, num_train_examples=5,
                num_test_examples=3, seed=9)
    data = make_data(s)
    rng = np.random.default_rng(9)
    train = [GENERATORS[s.task](rng, 16, 16, True) for _ in range(5)]
    test = [GENERATORS[s.task](rng, 16, 16, False) for _ in range(3)]
    assert np.array_equal(data.train_inputs, np.stack([t[0] for t in train]))
    assert np.array_equal(data.test_targets, np.stack([t[1] for t in test]))
    again = make_data(s)
    assert np.array_equal(again.test_inputs, data.test_inputs)


def test_every_quick_setting_generates_with_fixed_lengths():
    for s in quick_settings():
        small = dataclasses.replace(s, num_train_examples=4, num_test_examples=4)
        d = make_data(small)
        assert d.train_inputs.shape == d.train_targets.shape
        assert d.train_inputs.shape[1] in (s.seq_len - 1, s.seq_len)
        assert d.test_inputs.dtype == np.int64
        assert (d.test_targets != IGNORE).any(axis=1).all()  # every test example counts
        assert d.train_inputs.max() < s.vocab_size and d.test_inputs.min() >= 0


def test_leakage_fraction_hand_computed():
    train = np.array([[1, 2], [3, 4]])
    test = np.array([[1, 2], [5, 6], [1, 2], [7, 8]])  # distinct: 3, one of them in train
    assert leakage_fraction(train, test) == pytest.approx(1 / 3)
    assert leakage_fraction(train, test[:0]) == 0.0


def test_leakage_warning_fires_on_a_degenerate_task():
    s = Setting("compression", vocab_size=2, seq_len=4, num_train_examples=3,
                num_test_examples=2)  # one plain token: every sequence is the same
    with pytest.warns(UserWarning, match="also occur in the training set"):
        d = make_data(s)
    assert d.leakage == 1.0


def test_bad_settings():
    with pytest.raises(ValueError, match="task must be one of"):
        Setting("copying")
    with pytest.raises(ValueError, match="seq_len"):
        Setting("compression", seq_len=0)
    with pytest.raises(ValueError, match="unknown MAD task"):
        settings("recall")
    with pytest.raises(TypeError, match="expects a Setting"):
        make_data("in-context-recall")


# macro accuracy: torchmetrics MulticlassAccuracy(average="macro", ignore_index=-100)

def test_macro_accuracy_torchmetrics_docstring_example():
    # targets [2,1,0,0], preds [2,1,0,1]: recalls class0 1/2, class1 1/1, class2 1/1
    acc = macro_accuracy(torch.tensor([2, 1, 0, 1]), torch.tensor([2, 1, 0, 0]), 3)
    assert acc == pytest.approx((0.5 + 1 + 1) / 3)


def test_macro_accuracy_counts_a_predicted_only_class_as_zero():
    # class 2 is predicted but never a target: it still enters the mean with recall 0
    acc = macro_accuracy(torch.tensor([0, 0, 2]), torch.tensor([0, 0, 1]), 4)
    assert acc == pytest.approx((1 + 0 + 0) / 3)
    counts = ClassCounts(4)
    counts.update(torch.tensor([0, 0, 2]), torch.tensor([0, 0, 1]))
    assert counts.micro_accuracy() == pytest.approx(2 / 3)


def test_macro_accuracy_skips_ignored_targets_and_accumulates():
    logits = torch.tensor([[[5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0]]])  # preds 0, 1, 2
    targets = torch.tensor([[0, IGNORE, 1]])
    assert macro_accuracy(logits, targets, 3) == pytest.approx((1 + 0 + 0) / 3)
    counts = ClassCounts(3)
    counts.update(torch.tensor([0, 1]), torch.tensor([0, 0]))
    counts.update(torch.tensor([1, 1]), torch.tensor([1, 0]))
    # class0: 1 hit of 3; class1: 1 hit of 1
    assert counts.macro_accuracy() == pytest.approx((1 / 3 + 1) / 2)


def test_macro_accuracy_bad_inputs():
    with pytest.raises(ValueError, match="num_classes"):
        ClassCounts(0)
    with pytest.raises(ValueError, match="same shape"):
        macro_accuracy(torch.tensor([0, 1]), torch.tensor([0]), 2)
    with pytest.raises(ValueError, match="targets must lie"):
        macro_accuracy(torch.tensor([0]), torch.tensor([5]), 2)
    with pytest.raises(ValueError, match="do not match"):
        macro_accuracy(torch.zeros(1, 3), torch.tensor([0]), 2)


def test_mad_score_is_mean_over_settings_of_best_over_grid():
    rows = [
        {"model": "m", "task": "a", "setting": "a1", "test_acc": 0.2},
        {"model": "m", "task": "a", "setting": "a1", "test_acc": 0.6},  # best of a1
        {"model": "m", "task": "a", "setting": "a2", "test_acc": 1.0},
        {"model": "m", "task": "b", "setting": "b1", "test_acc": 0.4},
    ]
    scores = mad_scores(rows)
    assert scores["m"]["a"] == pytest.approx(0.8)
    assert scores["m"]["b"] == pytest.approx(0.4)
    assert scores["m"]["mad"] == pytest.approx(0.6)
    with pytest.raises(ValueError, match="lacks"):
        mad_scores([{"model": "m"}])
