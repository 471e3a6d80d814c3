"""FMS (aa_compile.sae.fms): hand-computed cases, sklearn cross-checks, held-out, shuffle
control."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.tree import DecisionTreeClassifier

from aa_compile.sae.fms import concept_fms, depth_accuracies, fms_scores, pooled_latents


def test_separable_single_latent_scores_one():
    X = np.array([[0.0, 0.3], [0.1, 0.3], [1.0, 0.3], [1.2, 0.3]])
    y = np.array([0, 0, 1, 1])
    r = concept_fms(X, y)
    assert r.accs_0 == 1.0 and r.accs_cum == () and r.global_score == 1.0
    assert r.root_feature == 0
    # after cutting latent 0 nothing separates the classes: the root is a leaf, accuracy 0.5
    assert r.accs_local[1] == 0.5
    assert r.local_score(1) == 1.0
    assert r.fms(1) == 1.0


def test_and_concept_hand_computed():
    # y = x0 AND x1: the root split (either latent) gets 3/4, depth 2 gets 4/4
    X = np.array([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    y = np.array([0, 0, 0, 1])
    r = concept_fms(X, y)
    assert r.accs_0 == 0.75
    assert r.accs_cum == (1.0,)
    assert r.global_score == pytest.approx(0.75)      # 1 - (1.0 - 0.75) / 1
    assert r.accs_local[:3] == (0.75, 0.75, 0.75)     # the other latent, then the majority
    assert r.local_score(1) == 0.0
    assert r.fms(1) == pytest.approx(0.75 * (0.0 + 0.75) / 2)
    assert r.fms(5) == pytest.approx(0.28125)


def test_depth_accuracies_match_depth_limited_sklearn_trees():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 6))
    y = ((X[:, 0] + 0.5 * X[:, 1] ** 2 + 0.3 * rng.normal(size=300)) > 0.4).astype(int)
    full = DecisionTreeClassifier(random_state=0).fit(X, y)
    accs = depth_accuracies(full, X, y)
    assert len(accs) == full.get_depth() + 1 and accs[-1] == 1.0
    for depth in range(1, full.get_depth() + 1):
        limited = DecisionTreeClassifier(max_depth=depth, random_state=0).fit(X, y)
        assert accs[depth] == pytest.approx(limited.score(X, y)), depth
    X_test = rng.normal(size=(100, 6))
    y_test = (X_test[:, 0] > 0).astype(int)
    held = depth_accuracies(full, X_test, y_test)
    assert held[-1] == pytest.approx(full.score(X_test, y_test))


def test_held_out_scores_on_the_test_set():
    X = np.array([[0.0], [0.1], [1.0], [1.1]])
    y = np.array([0, 0, 1, 1])
    r = concept_fms(X, y, held_out=(X, 1 - y))       # the test labels say the opposite
    assert r.accs_0 == 0.0


def test_label_shuffle_control_drops_to_chance_on_held_out_data():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(400, 5))
    y = (X[:, 2] > 0).astype(int)
    X_test = rng.normal(size=(400, 5))
    y_test = (X_test[:, 2] > 0).astype(int)
    real = concept_fms(X, y, held_out=(X_test, y_test))
    shuffled = concept_fms(X, y, held_out=(X_test, y_test), shuffle_labels=True)
    assert real.accs_0 > 0.95 and real.root_feature == 2
    assert abs(shuffled.accs_0 - 0.5) < 0.1
    assert shuffled.fms(1) < real.fms(1) - 0.3


def test_fms_scores_averages_concepts():
    rng = np.random.default_rng(2)
    X = rng.normal(size=(120, 4))
    Y = np.stack([(X[:, 0] > 0), (X[:, 1] + X[:, 3] > 0)], axis=1).astype(int)
    means, results = fms_scores(X, Y, ps=(1, 5))
    assert len(results) == 2
    for p in (1, 5):
        assert means[p] == pytest.approx((results[0].fms(p) + results[1].fms(p)) / 2)
    assert results[0].fms(1) > results[1].fms(1)      # one latent vs a two-latent concept


@pytest.mark.parametrize("X, y, message", [
    (np.zeros((4, 2)), np.array([0, 1, 2, 0]), "binary"),
    (np.zeros((4, 2)), np.array([0, 1, 0]), "labels must be \\[samples=4\\]"),
    (np.zeros(4), np.array([0, 1, 0, 1]), "features must be \\[samples, latents\\]"),
    (np.full((4, 2), np.nan), np.array([0, 1, 0, 1]), "NaN"),
    (np.zeros((0, 2)), np.zeros(0), "no samples"),
])
def test_bad_inputs(X, y, message):
    with pytest.raises(ValueError, match=message):
        concept_fms(X, y)


def test_bad_held_out_and_p():
    X, y = np.eye(4), np.array([0, 1, 0, 1])
    with pytest.raises(ValueError, match="held-out features have 3 latents"):
        concept_fms(X, y, held_out=(np.zeros((2, 3)), np.array([0, 1])))
    with pytest.raises(ValueError, match="p must be in \\[1, 10\\]"):
        concept_fms(X, y).fms(11)


def test_pooled_latents():
    lat = torch.arange(12.0).reshape(1, 3, 4)
    torch.testing.assert_close(pooled_latents(lat), torch.tensor([[4.0, 5.0, 6.0, 7.0]]))
    with pytest.raises(ValueError, match="prompts, tokens, latents"):
        pooled_latents(lat[0])
