"""The MAD benchmark settings as data: each task's baseline and its one-at-a-time changes.

``mad-lab``'s ``configs/tasks/*.yml`` give each task a baseline and lists of values that vary one
variable at a time; this expands them into 66 `Setting` rows (recall, fuzzy recall and
compression 11 each, noisy recall 14, selective copying 13, memorization 6). ``QUICK`` is a
reduced grid (shorter sequences, fewer examples) that trains on two CPU cores in minutes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from .tasks import TASKS

SEED = 12345
NUM_TEST_EXAMPLES = 1280
LEARNING_RATES = (1e-4, 5e-4, 1e-3)
WEIGHT_DECAYS = (0.0, 0.1)


@dataclasses.dataclass(frozen=True)
class Setting:
    """One task instance: the generator's parameters plus the data-set sizes and seed.

    Defaults are ``mad-lab``'s ``MADConfig`` defaults. ``change`` names the variable this
    setting changes from its task's baseline (``"baseline"`` for the baseline itself).
    """

    task: str
    vocab_size: int = 16
    seq_len: int = 128
    num_train_examples: int = 12_800
    num_test_examples: int = NUM_TEST_EXAMPLES
    multi_query: bool = True
    noise_vocab_size: int = 0
    frac_noise: float = 0.0
    k_motif_size: int = 1
    v_motif_size: int = 1
    num_tokens_to_copy: int = 0
    seed: int = SEED
    change: str = "baseline"

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"Setting.task must be one of {TASKS}, got {self.task!r}")
        for name in ("vocab_size", "seq_len", "num_train_examples", "num_test_examples"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Setting.{name} must be a positive int, got {value!r}")

    @property
    def name(self) -> str:
        """Short id: task, then the parameters that define the data."""
        parts = [self.task, f"v{self.vocab_size}", f"s{self.seq_len}",
                 f"n{self.num_train_examples}"]
        if self.frac_noise:
            parts.append(f"noise{self.frac_noise:g}")
        if self.num_tokens_to_copy:
            parts.append(f"copy{self.num_tokens_to_copy}")
        return "-".join(parts)

    def generator_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of this task's generator (only those it takes)."""
        common = {"vocab_size": self.vocab_size, "seq_len": self.seq_len}
        if self.task in ("in-context-recall", "noisy-in-context-recall"):
            return {**common, "multi_query": self.multi_query,
                    "noise_vocab_size": self.noise_vocab_size, "frac_noise": self.frac_noise}
        if self.task == "fuzzy-in-context-recall":
            return {**common, "multi_query": self.multi_query, "k_motif_size": self.k_motif_size,
                    "v_motif_size": self.v_motif_size,
                    "noise_vocab_size": self.noise_vocab_size, "frac_noise": self.frac_noise}
        if self.task == "selective-copying":
            return {**common, "num_tokens_to_copy": self.num_tokens_to_copy}
        if self.task == "compression":
            return {**common, "noise_vocab_size": self.noise_vocab_size,
                    "frac_noise": self.frac_noise}
        return {**common, "seed": self.seed}  # memorization: the map's seed

    def key(self) -> str:
        """Stable hash of the data-defining fields (a cache key for generated data)."""
        fields = dataclasses.asdict(self)
        fields.pop("change")
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


_TRAIN_SIZES = [6400, 3200, 1600, 800]

TASK_CONFIGS: dict[str, dict[str, dict[str, Any]]] = {
    "in-context-recall": {
        "baseline": {"vocab_size": 16, "seq_len": 128, "num_train_examples": 12800,
                     "multi_query": True},
        "changes": {"vocab_size": [32, 64, 128], "seq_len": [256, 512, 1024],
                    "num_train_examples": _TRAIN_SIZES},
    },
    "fuzzy-in-context-recall": {
        "baseline": {"vocab_size": 16, "seq_len": 128, "num_train_examples": 12800,
                     "multi_query": True, "k_motif_size": 3, "v_motif_size": 3},
        "changes": {"vocab_size": [32, 64, 128], "seq_len": [256, 512, 1024],
                    "num_train_examples": _TRAIN_SIZES},
    },
    "noisy-in-context-recall": {
        "baseline": {"vocab_size": 32, "noise_vocab_size": 16, "seq_len": 128,
                     "num_train_examples": 12800, "multi_query": True, "frac_noise": 0.2},
        "changes": {"vocab_size": [48, 80, 144], "seq_len": [256, 512, 1024],
                    "num_train_examples": _TRAIN_SIZES, "frac_noise": [0.4, 0.6, 0.8]},
    },
    "selective-copying": {
        "baseline": {"vocab_size": 16, "seq_len": 256, "num_tokens_to_copy": 16,
                     "num_train_examples": 12800},
        "changes": {"vocab_size": [32, 64, 128], "seq_len": [512, 1024],
                    "num_train_examples": _TRAIN_SIZES, "num_tokens_to_copy": [32, 64, 96]},
    },
    "compression": {
        "baseline": {"vocab_size": 16, "seq_len": 32, "num_train_examples": 12800},
        "changes": {"vocab_size": [32, 64, 128], "seq_len": [64, 128, 256],
                    "num_train_examples": _TRAIN_SIZES},
    },
    "memorization": {
        "baseline": {"vocab_size": 256, "seq_len": 32, "num_train_examples": 256},
        "changes": {"vocab_size": [512, 1024, 2048, 4096, 8192]},
    },
}


def expand(task: str, config: dict[str, dict[str, Any]]) -> list[Setting]:
    """The baseline then one setting per changed value (one variable at a time)."""
    baseline = config["baseline"]
    out = [Setting(task=task, **baseline)]
    for variable, values in config["changes"].items():
        for value in values:
            out.append(Setting(task=task, **{**baseline, variable: value}, change=variable))
    return out


def settings(task: str | None = None) -> list[Setting]:
    """All 66 benchmark settings, or those of one task."""
    if task is not None and task not in TASK_CONFIGS:
        raise ValueError(f"unknown MAD task {task!r}; choose one of {tuple(TASK_CONFIGS)}")
    tasks = [task] if task else list(TASK_CONFIGS)
    return [s for t in tasks for s in expand(t, TASK_CONFIGS[t])]


def baseline(task: str) -> Setting:
    """The baseline setting of ``task``."""
    return settings(task)[0]


# The reduced grid for CI: each task's baseline shrunk (shorter sequences, fewer examples)
# and one harder variant of it. Memorization keeps its baseline (it is small already).
QUICK_CONFIGS: dict[str, dict[str, dict[str, Any]]] = {
    "in-context-recall": {
        "baseline": {"vocab_size": 16, "seq_len": 64, "num_train_examples": 2048,
                     "num_test_examples": 256},
        "changes": {"vocab_size": [32]},
    },
    "fuzzy-in-context-recall": {
        "baseline": {"vocab_size": 16, "seq_len": 64, "num_train_examples": 2048,
                     "num_test_examples": 256, "k_motif_size": 3, "v_motif_size": 3},
        "changes": {"vocab_size": [32]},
    },
    "noisy-in-context-recall": {
        "baseline": {"vocab_size": 32, "noise_vocab_size": 16, "seq_len": 64,
                     "num_train_examples": 2048, "num_test_examples": 256, "frac_noise": 0.2},
        "changes": {"frac_noise": [0.6]},
    },
    "selective-copying": {
        "baseline": {"vocab_size": 16, "seq_len": 64, "num_tokens_to_copy": 8,
                     "num_train_examples": 2048, "num_test_examples": 256},
        "changes": {"vocab_size": [32]},
    },
    "compression": {
        "baseline": {"vocab_size": 16, "seq_len": 16, "num_train_examples": 2048,
                     "num_test_examples": 256},
        "changes": {"vocab_size": [32]},
    },
    "memorization": {
        "baseline": {"vocab_size": 256, "seq_len": 32, "num_train_examples": 256,
                     "num_test_examples": 256},
        "changes": {"vocab_size": [512]},
    },
}


def quick_settings(task: str | None = None) -> list[Setting]:
    """The reduced CI grid (two settings per task), or one task's part of it."""
    if task is not None and task not in QUICK_CONFIGS:
        raise ValueError(f"unknown MAD task {task!r}; choose one of {tuple(QUICK_CONFIGS)}")
    tasks = [task] if task else list(QUICK_CONFIGS)
    return [s for t in tasks for s in expand(t, QUICK_CONFIGS[t])]
