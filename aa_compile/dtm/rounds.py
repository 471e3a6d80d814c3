"""FDTM-guided pruning in rounds at a fixed parameter budget (the paper's procedure, without
healing): every round measures, **on the model as compressed so far**, each component moved one
sparsity step further (alone), ranks those moves by the resulting FDT statistic, and takes the
least harmful share of them; rounds repeat until the requested share of the component weight
bytes is pruned.

Measuring in the current context (rather than once from the base model, as the sweep does)
is what lets the plan account for how compressions add up: a plan ranked only by the base
sweep piles high sparsity onto the components that look robust alone and ends up worse than
uniform pruning. Even so, on the small trained reference model uniform pruning keeps the
higher median FDT at 25% and 50% sparsity; the rounds win at 75% (``docs/dtm.md``).

Each round caches the current model's layer inputs once and resumes every measurement at the
moved component's layer (`aa_compile.dtm.sweep`'s reuse; the reference transformer only, any
other model recomputes the whole pass).
"""

from __future__ import annotations

import copy
import itertools
import math

import torch
from torch import Tensor, nn

from aa_compile.progress import progress as progress_bar

from .apply import apply
from .components import find_components, magnitude_prune, parse, set_weight_oi, weight_oi
from .metrics import RANK_STATISTICS, check_fraction, check_prompts, dtm, generate
from .planner import plan_report
from .refine import refine_plan
from .sweep import Measurer

DEFAULT_STEPS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


def _check_steps(steps) -> tuple[float, ...]:
    steps = tuple(steps)
    if not steps or any(isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 < s < 1
                        for s in steps):
        raise ValueError(f"steps must be sparsities in (0, 1), got {steps!r}")
    if any(b <= a for a, b in itertools.pairwise(steps)):
        raise ValueError(f"steps must increase, got {steps!r}")
    return steps


@torch.no_grad()
def budget_plan(model: nn.Module, prompts: Tensor, n_tokens: int, share: float,
                steps=DEFAULT_STEPS, statistic: str = "fdt_mean", fraction: float = 0.2,
                rank: str = "result", reference: Tensor | None = None,
                batch_size: int = 64, progress: bool = False) -> dict:
    """Per-component pruning levels saving at least ``share`` of the component weight bytes.

    ``steps``: the sparsity ladder each component climbs one step at a time. Each round moves
    the ``fraction`` of still-movable components whose move hurts ``statistic`` least:
    ``rank="result"`` (default) by the statistic after the move (ties: higher mean FDT, lower
    mean cross-entropy of the base continuation), ``rank="per_byte"`` by the drop of
    ``statistic`` per byte the move saves (ties: the rise in cross-entropy per byte; measured
    worse on the trained reference model, see ``docs/dtm.md``). It stops as
    soon as the budget is met. Returns the plan (``{component: "prune:S"}``), bytes and share saved,
    the final model's measured summary (applied for real) and the number of rounds and
    measurements. Raises ``ValueError`` for a share the ladder cannot reach.
    """
    check_prompts(prompts, n_tokens)
    check_fraction("share", share)
    if statistic not in RANK_STATISTICS:
        raise ValueError(f"statistic must be one of {RANK_STATISTICS}, got {statistic!r}")
    check_fraction("fraction", fraction)
    if rank not in ("per_byte", "result"):
        raise ValueError(f"rank must be 'per_byte' or 'result', got {rank!r}")
    steps = _check_steps(steps)
    if share > steps[-1]:
        raise ValueError(f"share={share:.1%} is more than the top step prunes ({steps[-1]:.0%})")
    model.eval()
    comps = find_components(model)
    elt = next(model.parameters()).element_size()
    total = sum(c.numel for c in comps.values()) * elt
    if reference is None:
        reference = generate(model, prompts, n_tokens, batch_size)
    work = copy.deepcopy(model).eval()
    originals = {n: weight_oi(work.get_submodule(n)).detach().clone() for n in comps}
    level = {n: -1 for n in comps}  # index into steps; -1: dense

    def saved_by(name: str, idx: int) -> float:
        return 0.0 if idx < 0 else round(steps[idx] * comps[name].numel) * elt

    def saved() -> float:
        return sum(saved_by(n, i) for n, i in level.items())

    bar = progress_bar(total=round(share * total), desc="fdtm rounds", unit="B",
                       unit_scale=True) if progress else None
    rounds = measurements = 0
    while saved() < share * total:
        ctx = Measurer(work, reference, prompts.shape[1], n_tokens, batch_size)
        now = ctx.measure() if rank == "per_byte" else None
        moves = []
        for name, comp in comps.items():
            if level[name] + 1 >= len(steps):
                continue
            mod = work.get_submodule(name)
            current = weight_oi(mod).detach().clone()
            set_weight_oi(mod, magnitude_prune(originals[name], steps[level[name] + 1]))
            m = ctx.measure(comp)
            set_weight_oi(mod, current)
            measurements += 1
            if rank == "per_byte":
                gain = saved_by(name, level[name] + 1) - saved_by(name, level[name])
                key = ((now[statistic] - m[statistic]) / gain, (m["nll"] - now["nll"]) / gain,
                       name)
            else:
                key = (-m[statistic], -m["fdt_mean"], m["nll"], name)
            moves.append((key, name))
        moves.sort(key=lambda t: t[0])
        take = max(1, math.ceil(fraction * len(moves)))
        before = saved()
        for _, name in moves[:take]:
            level[name] += 1
            set_weight_oi(work.get_submodule(name),
                          magnitude_prune(originals[name], steps[level[name]]))
            if saved() >= share * total:
                break
        rounds += 1
        if bar is not None:
            bar.update(round(min(saved(), share * total) - min(before, share * total)))
    if bar is not None:
        bar.close()
    plan = {n: parse(f"prune:{steps[i]}").spec for n, i in level.items() if i >= 0}
    measured = dtm(model, apply(model, plan), prompts, n_tokens, reference, batch_size).summary()
    return plan_report(model, plan, measured, target_share=share, rounds=rounds,
                       measurements=measurements, statistic=statistic, rank=rank,
                       steps=list(steps), fraction=fraction)


@torch.no_grad()
def equal_reduction(model: nn.Module, prompts: Tensor, n_tokens: int,
                    shares=(0.25, 0.5, 0.75), reference: Tensor | None = None,
                    progress: bool = False, method: str = "rounds",
                    eval_prompts: Tensor | None = None, **plan_kwargs) -> list[dict]:
    """Uniform magnitude pruning at sparsity ``s`` of every component vs an FDTM plan at the
    same share, for each ``s`` in ``shares``: one row each with both models' FDT summaries
    (measured the same way, on the applied models), the shares saved and the plan's levels.

    ``method``: ``"rounds"`` (`budget_plan`, from the dense model) or ``"refine"``
    (`aa_compile.dtm.refine.refine_plan`, exchanges starting from the uniform plan).
    ``eval_prompts``: held-out prompts the plan was not made on; when given, each row also has
    ``uniform_eval`` and ``plan_eval`` summaries on them (the fair comparison)."""
    if method not in ("rounds", "refine"):
        raise ValueError(f"method must be 'rounds' or 'refine', got {method!r}")
    check_prompts(prompts, n_tokens)
    if eval_prompts is not None:
        check_prompts(eval_prompts, n_tokens)
    if reference is None:
        reference = generate(model, prompts, n_tokens)
    eval_reference = None if eval_prompts is None else generate(model, eval_prompts, n_tokens)
    comps = find_components(model)
    elt = next(model.parameters()).element_size()
    total = sum(c.numel for c in comps.values()) * elt
    rows = []
    for s in shares:
        lv = parse(f"prune:{s}")
        uniform_model = apply(model, {c: lv.spec for c in comps})
        uniform = dtm(model, uniform_model, prompts, n_tokens, reference).summary()
        uniform_share = sum(lv.bytes_saved(c, elt) for c in comps.values()) / total
        if method == "rounds":
            planned = budget_plan(model, prompts, n_tokens, uniform_share, reference=reference,
                                  progress=progress, **plan_kwargs)
        else:
            planned = refine_plan(model, prompts, n_tokens, s, reference=reference,
                                  progress=progress, **plan_kwargs)
        plan_model = apply(model, planned["plan"])
        # budget_plan's "measured" is this very dtm summary; refine_plan's is from resumed passes
        plan_summary = planned["measured"] if method == "rounds" else \
            dtm(model, plan_model, prompts, n_tokens, reference).summary()
        row = {"sparsity": s, "method": method, "share_uniform": uniform_share,
               "share_plan": planned["share_saved"], "uniform": uniform, "plan": plan_summary,
               "plan_levels": planned.get("level_counts"), "rounds": planned["rounds"],
               "measurements": planned["measurements"],
               "plan_spec": planned["plan"]}
        if eval_prompts is not None:
            row["uniform_eval"] = dtm(model, uniform_model, eval_prompts, n_tokens,
                                      eval_reference).summary()
            row["plan_eval"] = dtm(model, plan_model, eval_prompts, n_tokens,
                                   eval_reference).summary()
        rows.append(row)
    return rows
