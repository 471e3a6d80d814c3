"""Divergent Token Metrics (arXiv 2311.01544): FDT/SDT metrics, per-component sensitivity sweep
with activation reuse, a planner that picks pruning / int8 per component, and `apply`.

    from aa_compile import dtm
    ref = dtm.generate(model, prompts, n_tokens=64)
    result = dtm.dtm(model, compressed, prompts, 64, reference=ref)   # .fdt, .sdt, .summary()
    s = dtm.sweep(model, prompts, 64)                                 # per component × level
    p = dtm.plan(model, s, prompts, tau=32)                          # greedy plan + baselines
    b = dtm.budget_plan(model, prompts, 64, share=0.5)               # FDTM rounds, fixed budget
    r = dtm.refine_plan(model, prompts, 64, share=0.5)               # exchanges from uniform
    small = dtm.apply(model, p["plan"])                               # Int8Linear + pruned weights
    dtm.save_applied(small, p["plan"], "runs/small")                  # a saved model directory
    small = dtm.load_applied("runs/small")                            # ... and back

Definitions: ``docs/dtm.md`` and `aa_compile.dtm.metrics`.
"""

from .apply import Int8Linear, apply, check_plan, load_applied, save_applied
from .components import Component, Compression, find_components, parse
from .data import byte_prompts
from .metrics import DTMResult, divergence, dtm, generate, summarize, teacher_forced
from .planner import greedy_plan, plan, uniform_baselines
from .refine import refine_plan
from .rounds import budget_plan, equal_reduction
from .sweep import DEFAULT_LEVELS, heatmap, sweep

__all__ = [
    "DEFAULT_LEVELS",
    "Component",
    "Compression",
    "DTMResult",
    "Int8Linear",
    "apply",
    "budget_plan",
    "byte_prompts",
    "check_plan",
    "divergence",
    "dtm",
    "equal_reduction",
    "find_components",
    "generate",
    "greedy_plan",
    "heatmap",
    "load_applied",
    "parse",
    "plan",
    "refine_plan",
    "save_applied",
    "summarize",
    "sweep",
    "teacher_forced",
    "uniform_baselines",
]
