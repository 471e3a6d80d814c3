"""MAD (Mechanistic Architecture Design, arXiv 2403.17844): six synthetic token tasks run on CPU
as a capability suite for models built or rewritten by this library.

    from aa_compile import mad
    data = mad.make_data(mad.quick_settings("in-context-recall")[0])     # seeded train/test
    row = mad.run_one(mad.RunConfig("attention-swiglu", data.setting, epochs=2, dim=32))
    rows = mad.run_grid(mad.grid_runs(["attention-swiglu"], mad.quick_settings()), workers=2)
    mad.mad_scores(rows)                                                 # per task and "mad"
    mad.guard(model_fn, "aa", setting)                                   # accuracy before/after
    mad.guard(model_fn, "int8:0.5", setting)                             # also fp8, prune, fdtm

Commands: ``aa-compile mad run | report``; rules, settings and results: ``docs/mad.md``.
"""

from .data import TaskData, leakage_fraction, make_data
from .grid import grid_runs, run_grid
from .guard import guard
from .metrics import ClassCounts, macro_accuracy, mad_scores
from .rewrites import (
    FP8_KEEP,
    FP8_MODES,
    CompileRewrite,
    PlanRewrite,
    aa_backend,
    fdtm_prune,
    fp8_backend,
    int8_budget_plan,
    int8_plan,
    rewrite_from_spec,
    uniform_prune,
    uniform_share,
)
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
    "FP8_KEEP",
    "FP8_MODES",
    "GENERATORS",
    "IGNORE",
    "LEARNING_RATES",
    "MODELS",
    "QUICK_CONFIGS",
    "TASKS",
    "TASK_CONFIGS",
    "WEIGHT_DECAYS",
    "ClassCounts",
    "CompileRewrite",
    "ModelSpec",
    "PlanRewrite",
    "RunConfig",
    "Setting",
    "TaskData",
    "aa_backend",
    "baseline",
    "evaluate",
    "fdtm_prune",
    "fp8_backend",
    "grid_runs",
    "guard",
    "int8_budget_plan",
    "int8_plan",
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
