"""Pick a compression per component: maximise the weight bytes saved subject to an FDT
constraint on the whole compressed model (``statistic(FDT) >= tau``, e.g. median FDT ≥ 40).

Greedy from the sweep: the (component, level) pairs whose *single-component* statistic meets
the constraint are ranked (``order="fdt"``: by that statistic, then by bytes saved; ``"nll"``:
by the increase in mean cross-entropy of the base continuation, the perplexity-style ranking
the paper argues against). Each pair, in that order, is tried on the combined model (its weights
compressed in place, int8 simulated by its dequantised weight) and kept if the combined model
still meets the constraint and the pair saves more than the component's current choice.
The final plan is applied for real (`apply`, with `Int8Linear`) and measured again.

Baselines: **uniform** (every component at the same level, for each level) and the same greedy
with ``order="nll"``.

At a fixed parameter budget instead of an FDT constraint: `aa_compile.dtm.rounds`.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from aa_compile.progress import progress as progress_bar

from .apply import apply
from .components import compressed_weight, find_components, parse, set_weight_oi, weight_oi
from .metrics import dtm, generate, summarize

STATISTICS = ("fdt_mean", "fdt_median", "fdt_p10", "fdt_p25", "share_fdt_ge_tau", "fdt_min")


def _measure(model, prompts, n, reference, stat, tau_share) -> dict:
    r = dtm(model, model, prompts, n, reference=reference)
    return summarize(r.fdt, r.sdt, n, tau_share)


@torch.no_grad()
def greedy_plan(model: nn.Module, sweep_result: dict, prompts: Tensor, tau: float,
                statistic: str = "fdt_median", order: str = "fdt",
                reference: Tensor | None = None, progress: bool = False) -> dict:
    """Greedy plan (see module doc). Returns ``{"plan", "bytes_saved", "measured"...}``."""
    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}")
    if order not in ("fdt", "nll"):
        raise ValueError(f"order must be 'fdt' or 'nll', got {order!r}")
    n = sweep_result["n_tokens"]
    comps = find_components(model)
    missing = [c for c in sweep_result["results"] if c not in comps]
    if missing:
        raise ValueError(f"sweep names components the model does not have: {missing[:5]}")
    if reference is None:
        reference = generate(model, prompts, n)
    pairs = []
    for name, by_level in sweep_result["results"].items():
        for lv, e in by_level.items():
            if e[statistic] >= tau and e["bytes_saved"] > 0:
                key = (-e[statistic], -e["bytes_saved"]) if order == "fdt" else \
                    (e["nll_delta"], -e["bytes_saved"])
                pairs.append((key, name, lv, e["bytes_saved"]))
    pairs.sort(key=lambda t: t[0])
    work = copy.deepcopy(model).eval()
    originals = {n_: weight_oi(work.get_submodule(n_)).detach().clone() for n_ in comps}
    plan: dict[str, str] = {}
    saved: dict[str, float] = {}
    trials = 0
    it = progress_bar(pairs, desc=f"plan ({order})", unit="try") if progress else pairs
    for _, name, lv, b in it:
        if b <= saved.get(name, 0.0):
            continue
        mod = work.get_submodule(name)
        before = weight_oi(mod).detach().clone()
        set_weight_oi(mod, compressed_weight(originals[name], lv))
        trials += 1
        if _measure(work, prompts, n, reference, statistic, tau)[statistic] >= tau:
            plan[name], saved[name] = lv, b
        else:
            set_weight_oi(mod, before)
    final = apply(model, plan)
    measured = _measure(final, prompts, n, reference, statistic, tau)
    return plan_report(model, plan, measured, order=order, trials=trials,
                       tau=tau, statistic=statistic)


def plan_report(model: nn.Module, plan: dict, measured: dict, **extra) -> dict:
    """The plan's bytes and share saved, level counts and ``measured`` summary, plus ``extra``."""
    comps = find_components(model)
    elt = next(model.parameters()).element_size()
    total = sum(c.numel for c in comps.values()) * elt
    saved = sum(parse(lv).bytes_saved(comps[n], elt) for n, lv in plan.items())
    counts: dict[str, int] = {}
    for lv in plan.values():
        counts[lv] = counts.get(lv, 0) + 1
    return {"plan": dict(plan), "bytes_saved": saved, "component_bytes": total,
            "share_saved": saved / total if total else 0.0, "level_counts": counts,
            "measured": measured, **extra}


@torch.no_grad()
def uniform_baselines(model: nn.Module, levels, prompts: Tensor, n_tokens: int, tau: float,
                      reference: Tensor | None = None) -> dict:
    """Every component at the same level, measured on the real applied model, per level."""
    comps = find_components(model)
    if reference is None:
        reference = generate(model, prompts, n_tokens)
    out = {}
    for lv in levels:
        plan = {n: parse(lv).spec for n in comps}
        measured = _measure(apply(model, plan), prompts, n_tokens, reference, None, tau)
        out[parse(lv).spec] = plan_report(model, plan, measured)
        del out[parse(lv).spec]["plan"]
    return out


def plan(model: nn.Module, sweep_result: dict, prompts: Tensor, tau: float,
         statistic: str = "fdt_median", baselines: bool = True, progress: bool = False) -> dict:
    """The FDT-ordered greedy plan plus (optionally) the baselines, one JSON-able dict."""
    reference = generate(model, prompts, sweep_result["n_tokens"])
    out = greedy_plan(model, sweep_result, prompts, tau, statistic, "fdt", reference, progress)
    if baselines:
        nll = greedy_plan(model, sweep_result, prompts, tau, statistic, "nll", reference, progress)
        out["baselines"] = {
            "nll_order": {k: v for k, v in nll.items() if k != "plan"},
            "uniform": uniform_baselines(model, sweep_result["levels"], prompts,
                                         sweep_result["n_tokens"], tau, reference),
        }
    return out


def set_compressed(model: nn.Module, name: str, level: str) -> None:
    """Compress one component of ``model`` in place (int8 simulated by its dequantised weight)."""
    mod = model.get_submodule(name)
    set_weight_oi(mod, compressed_weight(weight_oi(mod), level))
