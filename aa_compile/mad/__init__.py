"""MAD (Mechanistic Architecture Design, arXiv 2403.17844): six synthetic token tasks run on CPU
as a capability suite for models built or rewritten by this library.

    from aa_compile import mad
    data = mad.make_data(mad.quick_settings("in-context-recall")[0])     # seeded train/test
    row = mad.run_one(mad.RunConfig("attention-swiglu", data.setting, epochs=2, dim=32))
    rows = mad.run_grid(mad.grid_runs(["attention-swiglu"], mad.quick_settings()), workers=2)
    mad.mad_scores(rows)                                                 # per task and "mad"
    mad.guard(model_fn, "aa", setting)                                   # accuracy before/after

Commands: ``aa-compile mad run | report``; rules, settings and results: ``docs/mad.md``.
"""

from .data import TaskData, leakage_fraction, make_data
from .grid import grid_runs, run_grid
from .guard import aa_backend, fdtm_prune, guard, rewrite_from_spec, uniform_prune, uniform_share
from .metrics import ClassCounts, macro_accuracy, mad_scores
from .settings import (
    LEARNING_RATES,
    QUICK_CONFIGS,
    TASK_CONFIGS,
    WEIGHT_DECAYS,
    Setting,
    baseline,
    quick_settings,
    settings,
)
from .tasks import GENERATORS, IGNORE, TASKS
from .train import RunConfig, evaluate, run_one, train_model
from .zoo import MODELS, ModelSpec, model_spec

__all__ = [
    "GENERATORS",
    "IGNORE",
    "LEARNING_RATES",
    "MODELS",
    "QUICK_CONFIGS",
    "TASKS",
    "TASK_CONFIGS",
    "WEIGHT_DECAYS",
    "ClassCounts",
    "ModelSpec",
    "RunConfig",
    "Setting",
    "TaskData",
    "aa_backend",
    "baseline",
    "evaluate",
    "fdtm_prune",
    "grid_runs",
    "guard",
    "leakage_fraction",
    "macro_accuracy",
    "mad_scores",
    "make_data",
    "model_spec",
    "quick_settings",
    "rewrite_from_spec",
    "run_grid",
    "run_one",
    "settings",
    "train_model",
    "uniform_prune",
    "uniform_share",
]
