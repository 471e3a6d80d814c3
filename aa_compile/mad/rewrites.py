"""The rewrites the capability guard applies: compiling with the ``aa`` backend (plain or with
FP8 linears), and weight plans from `aa_compile.dtm` (uniform pruning, an FDTM pruning plan, an
int8 weight-only plan at a budget).

A rewrite is a callable ``(model, data) -> model``. `rewrite_from_spec` builds the common ones
from a short spec. The compiling ones are `CompileRewrite` objects; the plan ones are
`PlanRewrite` objects, which keep the last plan they applied (``plan``). The guard reads both
to say what a rewrite did.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from aa_compile import dtm

from .data import TaskData

Rewrite = Callable[[nn.Module, TaskData], nn.Module]

#: the FP8 modes of the ``fp8_linear`` pass: ``static`` fits unit-scaled (u-μP) linears only,
#: ``tensorwise`` / ``rowwise`` scale any linear from its amax
FP8_MODES = ("static", "tensorwise", "rowwise")
#: linears kept out of FP8, as u-μP keeps them: the attention out-projection, the FFN
#: down-projection and the LM head, by their names in the MAD stacks (``out``, ``down``,
#: ``head``) and in the reference models (``o_proj``, ``down_proj``, ``lm_head``)
FP8_KEEP = ("out", "down", "head", "o_proj", "down_proj", "lm_head")


class AutogradForward(nn.Module):
    """Runs ``inner`` with autograd on and detaches its output, so that a compiled forward is
    traced as in training even inside ``torch.no_grad`` (see `fp8_backend`)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs):
        with torch.enable_grad():
            return self.inner(*args, **kwargs).detach()


@dataclasses.dataclass(frozen=True)
class CompileRewrite:
    """``torch.compile(model, backend="aa", dynamic=False, options=options)``; the guard
    reports the passes that fired (`aa_compile.last_report`). ``autograd``: run the compiled
    model through `AutogradForward`."""

    name: str
    options: dict
    autograd: bool = False

    def __call__(self, model: nn.Module, data: TaskData) -> nn.Module:
        compiled = torch.compile(model, backend="aa", dynamic=False, options=dict(self.options))
        return AutogradForward(compiled) if self.autograd else compiled


def aa_backend(inner_compiler: str = "eager") -> CompileRewrite:
    """The ``aa`` backend with that inner compiler (static shapes)."""
    return CompileRewrite(f"aa:{inner_compiler}", {"inner_compiler": inner_compiler})


def fp8_backend(mode: str = "tensorwise", inner_compiler: str = "eager",
                keep: Sequence[str] = FP8_KEEP) -> CompileRewrite:
    """The ``aa`` backend with its ``fp8_linear`` pass on: linears run as `aa::fp8_linear`
    (E4M3 operands), except those named in ``keep``. ``"tensorwise"`` suits the plain MAD
    stacks; ``"static"`` (scale 1) rewrites only the unit-scaled linears of the ``umup``
    adapter and nothing in a plain model. The pass finds those linears by u-μP's ``scaled()``
    autograd functions, which dynamo inlines under ``torch.no_grad``, so the static rewrite
    runs its forward with autograd on (`AutogradForward`), as in training."""
    if mode not in FP8_MODES:
        raise ValueError(f"fp8 mode must be one of {FP8_MODES}, got {mode!r}")
    if isinstance(keep, str):
        raise ValueError(f"keep must be a list of module names, got the string {keep!r}")
    return CompileRewrite(f"fp8:{mode}", {"inner_compiler": inner_compiler, "fp8": mode,
                                          "fp8_keep": tuple(keep)},
                          autograd=mode == "static")


def total_bytes(model: nn.Module) -> int:
    """Bytes of the component weights (`aa_compile.dtm.find_components`) of ``model``."""
    comps = dtm.find_components(model)
    if not comps:
        raise ValueError(f"{type(model).__name__} has no linear layer inside a block to rewrite")
    return sum(c.numel for c in comps.values()) * next(model.parameters()).element_size()


def uniform_share(model: nn.Module, sparsity: float) -> float:
    """Share of the component weight bytes that pruning every component at ``sparsity`` saves."""
    comps = dtm.find_components(model)
    level = dtm.parse(f"prune:{sparsity}")
    elt = next(model.parameters()).element_size()
    return sum(level.bytes_saved(c, elt) for c in comps.values()) / total_bytes(model)


#: tokens each DTM prompt continues (fewer on inputs shorter than twice this)
DTM_TOKENS = 8


def dtm_tokens(data: TaskData, n_tokens: int | None) -> int:
    """``n_tokens``, or `DTM_TOKENS` capped at half the test inputs' length when None."""
    return min(DTM_TOKENS, data.test_inputs.shape[1] // 2) if n_tokens is None else n_tokens


def task_prompts(data: TaskData, n_prompts: int, n_tokens: int) -> Tensor:
    """The first ``n_prompts`` test inputs cut ``n_tokens`` before their end: DTM prompts made
    of the task's own tokens."""
    length = data.test_inputs.shape[1] - n_tokens
    if length < 1:
        raise ValueError(f"n_tokens={n_tokens} leaves no prompt of the "
                         f"{data.test_inputs.shape[1]}-token test inputs")
    return torch.from_numpy(data.test_inputs[:n_prompts, :length])


@torch.no_grad()
def int8_budget_plan(model: nn.Module, prompts: Tensor, n_tokens: int, share: float
                     ) -> dict[str, str]:
    """Int8 weight-only plan saving at least ``share`` of the component weight bytes: a DTM
    sweep measures each component in int8 alone, and the components go to int8 in order of
    least harm (highest mean FDT, then the smallest rise in cross-entropy) until the budget is
    met. Raises ``ValueError`` when even every component in int8 saves less."""
    comps = dtm.find_components(model)
    elt = next(model.parameters()).element_size()
    total = total_bytes(model)
    level = dtm.parse("int8")
    most = sum(level.bytes_saved(c, elt) for c in comps.values()) / total
    if share > most:
        raise ValueError(f"int8 share={share:.1%} is more than int8 of every component saves "
                         f"({most:.1%})")
    swept = dtm.sweep(model.eval(), prompts, n_tokens, levels=("int8",), progress=False)
    results = swept["results"]
    order = sorted(comps, key=lambda n: (-results[n]["int8"]["fdt_mean"],
                                         results[n]["int8"]["nll_delta"]))
    plan = {name: "none" for name in comps}
    saved = 0.0
    for name in order:
        if saved >= share * total:
            break
        plan[name] = "int8"
        saved += level.bytes_saved(comps[name], elt)
    return plan


@dataclasses.dataclass
class PlanRewrite:
    """A rewrite that plans per-component compressions (``planner(model, data) -> plan``) and
    applies them with `aa_compile.dtm.apply` to a copy; ``plan`` is the last plan applied."""

    name: str
    planner: Callable[[nn.Module, TaskData], dict[str, str]]
    plan: dict[str, str] | None = None

    def __call__(self, model: nn.Module, data: TaskData) -> nn.Module:
        self.plan = self.planner(model, data)
        return dtm.apply(model, self.plan)


def uniform_prune(sparsity: float) -> PlanRewrite:
    """Magnitude-prune every component (linear layer inside a block) at ``sparsity``."""
    def planner(model: nn.Module, data: TaskData) -> dict[str, str]:
        return {c: f"prune:{sparsity}" for c in dtm.find_components(model)}
    return PlanRewrite(f"prune:{sparsity}", planner)


def fdtm_prune(sparsity: float, n_prompts: int = 64, n_tokens: int | None = None
               ) -> PlanRewrite:
    """An FDTM budget plan (`aa_compile.dtm.budget_plan`) saving as many weight bytes as
    uniform pruning at ``sparsity``; its prompts are the first ``n_prompts`` test inputs cut
    ``n_tokens`` (default `dtm_tokens`) before their end, so the divergence is measured on the
    task's own tokens."""
    def planner(model: nn.Module, data: TaskData) -> dict[str, str]:
        n = dtm_tokens(data, n_tokens)
        share = uniform_share(model, sparsity)
        return dtm.budget_plan(model.eval(), task_prompts(data, n_prompts, n), n, share)["plan"]
    return PlanRewrite(f"fdtm:{sparsity}", planner)


def int8_plan(share: float, n_prompts: int = 64, n_tokens: int | None = None) -> PlanRewrite:
    """Int8 weight-only components (`aa_compile.dtm.Int8Linear`) saving ``share`` of the
    component weight bytes, chosen by `int8_budget_plan` on the task's own test prompts (as
    `fdtm_prune` builds them)."""
    def planner(model: nn.Module, data: TaskData) -> dict[str, str]:
        n = dtm_tokens(data, n_tokens)
        return int8_budget_plan(model, task_prompts(data, n_prompts, n), n, share)
    return PlanRewrite(f"int8:{share}", planner)


def share_of(spec: str, arg: str, what: str) -> float:
    try:
        value = float(arg)
    except ValueError:
        raise ValueError(f"rewrite {spec!r} needs a {what}, e.g. '{spec.partition(':')[0]}:0.5'"
                         ) from None
    if not 0 < value < 1:
        raise ValueError(f"{what} must be in (0, 1), got {value} in {spec!r}")
    return value


def rewrite_from_spec(spec: str) -> Rewrite:
    """A rewrite from its spec:

    - ``"aa"`` / ``"aa:<inner compiler>"``: the ``aa`` backend;
    - ``"fp8"`` / ``"fp8:<mode>"``: the ``aa`` backend with FP8 linears (mode ``tensorwise``
      by default, or ``static`` / ``rowwise``), u-μP's keep list (`FP8_KEEP`);
    - ``"prune:S"``: uniform magnitude pruning at sparsity S;
    - ``"fdtm:S"``: an FDTM pruning plan saving the bytes ``prune:S`` saves;
    - ``"int8:S"``: int8 weight-only components saving the share S of the weight bytes.
    """
    if not isinstance(spec, str):
        raise TypeError(f"a rewrite spec is a string, got {type(spec).__name__}")
    kind, _, arg = spec.partition(":")
    if kind == "aa":
        return aa_backend(arg or "eager")
    if kind == "fp8":
        return fp8_backend(arg or "tensorwise")
    if kind in ("prune", "fdtm"):
        sparsity = share_of(spec, arg, "sparsity")
        return uniform_prune(sparsity) if kind == "prune" else fdtm_prune(sparsity)
    if kind == "int8":
        return int8_plan(share_of(spec, arg, "share of the weight bytes"))
    raise ValueError(f"unknown rewrite {spec!r}: use 'aa', 'aa:<inner compiler>', 'fp8', "
                     f"'fp8:<{'|'.join(FP8_MODES)}>', 'prune:S', 'fdtm:S' or 'int8:S'")

