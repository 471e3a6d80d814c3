"""FMS (Feature Monosemanticity Score), computed the way the G-SAE public code computes it.

For one binary concept and features ``X [N, L]`` (SAE latents, e.g. mean-pooled per prompt):

1. Fit a gini ``DecisionTreeClassifier(max_depth=None)``; truncate it at every depth and take the
   accuracy of the truncated tree (majority class of each node's training samples). ``accs_0`` is
   the accuracy at depth 1 (the root split: the best single latent); ``accs_cum_i`` those at
   depths ``i + 1 = 2 .. depth``. ``FMS_global = 1 - A(n)/n`` with
   ``A(n) = Σ_i (accs_cum_i - accs_0)`` over the ``n = depth - 1`` deeper depths (1 when the root
   split is already the whole tree).
2. Local: fit a depth-3 gini tree, record its root-split accuracy, set the root feature to zero in
   every sample, refit; ``rounds`` (10) times. ``accs_p`` is the root-split accuracy after p cuts
   and ``FMS_local@p = 2 (accs_0 - accs_p)`` (not clipped, as in the public notebook).
3. ``FMS@p = accs_0 · (FMS_local@p + FMS_global) / 2``; several concepts: the mean over concepts.

The public code scores in-sample (training-set accuracies). ``held_out`` fits every tree on a
train set and scores it on a test set instead; ``shuffle_labels`` is the label-shuffle control.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np
from torch import Tensor

if TYPE_CHECKING:  # scikit-learn loads in about a second: only when FMS runs
    from sklearn.tree import DecisionTreeClassifier

LOCAL_ROUNDS = 10
LOCAL_DEPTH = 3


def depth_accuracies(tree: DecisionTreeClassifier, X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``acc[d]``: accuracy on ``(X, y)`` of ``tree`` truncated at depth ``d = 0 .. depth``
    (each sample stops at its node of depth ``min(d, leaf depth)`` and gets that node's majority
    training class)."""
    t = tree.tree_
    X32 = np.asarray(X, dtype=np.float32)  # sklearn compares in float32
    node = np.zeros(len(X32), dtype=np.int64)
    majority = tree.classes_[t.value[:, 0].argmax(axis=1)]
    accs = []
    for _ in range(tree.get_depth() + 1):
        accs.append(float(np.mean(majority[node] == y)) if len(y) else 0.0)
        inner = t.children_left[node] != -1
        feat = t.feature[node[inner]]
        go_left = X32[np.flatnonzero(inner), feat] <= t.threshold[node[inner]]
        node[inner] = np.where(go_left, t.children_left[node[inner]],
                               t.children_right[node[inner]])
    return np.asarray(accs)


@dataclasses.dataclass(frozen=True)
class FMSResult:
    """Every intermediate of one concept's FMS (see the module docstring)."""

    accs_0: float
    accs_cum: tuple[float, ...]       # depths 2 .. tree depth
    accs_local: tuple[float, ...]     # root-split accuracy after 0 .. rounds cuts
    cut_features: tuple[int, ...]     # the root feature removed in each round
    root_feature: int

    @property
    def global_score(self) -> float:
        if not self.accs_cum:
            return 1.0
        return 1.0 - sum(a - self.accs_0 for a in self.accs_cum) / len(self.accs_cum)

    def local_score(self, p: int) -> float:
        if not 0 < p < len(self.accs_local):
            raise ValueError(f"p must be in [1, {len(self.accs_local) - 1}], got {p}")
        return 2.0 * (self.accs_0 - self.accs_local[p])

    def fms(self, p: int) -> float:
        return self.accs_0 * (self.local_score(p) + self.global_score) / 2.0


def _as_numpy(x: Tensor | np.ndarray) -> np.ndarray:
    return x.detach().cpu().double().numpy() if isinstance(x, Tensor) else np.asarray(x)


def _check(X: np.ndarray, y: np.ndarray, what: str) -> None:
    if X.ndim != 2:
        raise ValueError(f"{what}: features must be [samples, latents], got shape {X.shape}")
    if y.ndim != 1 or len(y) != len(X):
        raise ValueError(f"{what}: labels must be [samples={len(X)}], got shape {y.shape}")
    if len(X) == 0:
        raise ValueError(f"{what}: no samples")
    if not np.isfinite(X).all():
        raise ValueError(f"{what}: features contain NaN/inf")


def _fit(X: np.ndarray, y: np.ndarray, max_depth: int | None, seed: int) -> DecisionTreeClassifier:
    from sklearn.tree import DecisionTreeClassifier

    return DecisionTreeClassifier(criterion="gini", max_depth=max_depth,
                                  random_state=seed).fit(X, y)


def concept_fms(X: Tensor | np.ndarray, y: Tensor | np.ndarray, *,
                held_out: tuple[Tensor | np.ndarray, Tensor | np.ndarray] | None = None,
                shuffle_labels: bool = False, rounds: int = LOCAL_ROUNDS, seed: int = 0
                ) -> FMSResult:
    """FMS intermediates of one binary concept; ``held_out=(X_test, y_test)`` scores on them."""
    X, y = _as_numpy(X), _as_numpy(y).astype(np.int64)
    _check(X, y, "FMS")
    if set(np.unique(y).tolist()) - {0, 1}:
        raise ValueError("FMS labels must be binary (0/1)")
    if rounds <= 0:
        raise ValueError(f"rounds must be > 0, got {rounds}")
    if shuffle_labels:
        y = np.random.default_rng(seed).permutation(y)
    if held_out is None:
        X_eval, y_eval = X, y
    else:
        X_eval, y_eval = _as_numpy(held_out[0]), _as_numpy(held_out[1]).astype(np.int64)
        _check(X_eval, y_eval, "FMS held-out")
        if X_eval.shape[1] != X.shape[1]:
            raise ValueError(f"FMS held-out features have {X_eval.shape[1]} latents, the train "
                             f"features {X.shape[1]}")
    full = _fit(X, y, None, seed)
    accs = depth_accuracies(full, X_eval, y_eval)
    accs_0 = float(accs[min(1, len(accs) - 1)])
    accs_cum = tuple(float(a) for a in accs[2:])
    root_feature = int(full.tree_.feature[0])
    X_cut, X_eval_cut = X.copy(), X_eval.copy()
    local, cuts = [], []
    for _ in range(rounds + 1):
        tree = _fit(X_cut, y, LOCAL_DEPTH, seed)
        a = depth_accuracies(tree, X_eval_cut, y_eval)
        local.append(float(a[min(1, len(a) - 1)]))
        feature = int(tree.tree_.feature[0])
        if feature >= 0:
            X_cut[:, feature] = 0.0
            X_eval_cut[:, feature] = 0.0
        cuts.append(feature)
    return FMSResult(accs_0, accs_cum, tuple(local), tuple(cuts[:-1]), root_feature)


def fms_scores(X: Tensor | np.ndarray, Y: Tensor | np.ndarray, *, ps: tuple[int, ...] = (1, 5),
               held_out: tuple[Tensor | np.ndarray, Tensor | np.ndarray] | None = None,
               shuffle_labels: bool = False, seed: int = 0
               ) -> tuple[dict[int, float], list[FMSResult]]:
    """``({p: FMS@p averaged over concepts}, per-concept results)`` for labels ``Y [N, C]``."""
    Y = _as_numpy(Y)
    if Y.ndim == 1:
        Y = Y[:, None]
    Y_test = None
    if held_out is not None:
        Y_test = _as_numpy(held_out[1])
        Y_test = Y_test[:, None] if Y_test.ndim == 1 else Y_test
    results = []
    for c in range(Y.shape[1]):
        ho = None if held_out is None else (held_out[0], Y_test[:, c])
        results.append(concept_fms(X, Y[:, c], held_out=ho, shuffle_labels=shuffle_labels,
                                   seed=seed + c))
    return {p: float(np.mean([r.fms(p) for r in results])) for p in ps}, results


def pooled_latents(latents: Tensor) -> Tensor:
    """Per-prompt features: latents ``[N, S, L]`` mean-pooled over tokens (the public code's)."""
    if latents.dim() != 3:
        raise ValueError(f"latents must be [prompts, tokens, latents], got {tuple(latents.shape)}")
    return latents.mean(1)
