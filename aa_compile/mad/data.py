"""Train and test sets of one `Setting`, drawn from one seeded stream, with a leakage check.

As in ``mad-lab``: one ``numpy.random.default_rng(setting.seed)`` draws the training examples
first and the test examples after them, so both sets are reproducible and never share draws;
the check warns when more than 0.1% of the distinct test inputs also occur in training.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np

from .settings import Setting
from .tasks import GENERATORS, memorization_map

LEAKAGE_LIMIT = 0.001


@dataclasses.dataclass(frozen=True)
class TaskData:
    """Stacked examples ``[n, length]`` (int64); ``IGNORE`` marks targets to skip."""

    setting: Setting
    train_inputs: np.ndarray
    train_targets: np.ndarray
    test_inputs: np.ndarray
    test_targets: np.ndarray
    leakage: float


def leakage_fraction(train_inputs: np.ndarray, test_inputs: np.ndarray) -> float:
    """Share of the distinct test input rows that also occur as a training input row."""
    if len(test_inputs) == 0:
        return 0.0
    train = {row.tobytes() for row in np.ascontiguousarray(train_inputs)}
    test = {row.tobytes() for row in np.ascontiguousarray(test_inputs)}
    return len(test & train) / len(test)


def draw(setting: Setting, n: int, rng: np.random.Generator, is_training: bool,
         extra: dict) -> tuple[np.ndarray, np.ndarray]:
    """``n`` examples of ``setting`` from ``rng``, stacked."""
    generator = GENERATORS[setting.task]
    kwargs = {**setting.generator_kwargs(), **extra, "is_training": is_training}
    pairs = [generator(rng, **kwargs) for _ in range(n)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def make_data(setting: Setting, warn: bool = True) -> TaskData:
    """Generate the training then the test set of ``setting`` from one seeded stream."""
    if not isinstance(setting, Setting):
        raise TypeError(f"make_data expects a Setting, got {type(setting).__name__}")
    rng = np.random.default_rng(setting.seed)
    extra = {}
    if setting.task == "memorization":  # the fixed map, built once for the whole data set
        extra = {"kv_map": memorization_map(setting.vocab_size, setting.seed)}
    train_x, train_y = draw(setting, setting.num_train_examples, rng, True, extra)
    test_x, test_y = draw(setting, setting.num_test_examples, rng, False, extra)
    leak = leakage_fraction(train_x, test_x)
    if warn and leak > LEAKAGE_LIMIT:
        warnings.warn(f"MAD {setting.name}: {leak:.2%} of the distinct test inputs also occur "
                      f"in the training set (limit {LEAKAGE_LIMIT:.1%})", stacklevel=2)
    return TaskData(setting, train_x, train_y, test_x, test_y, leak)
