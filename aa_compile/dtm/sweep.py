"""Per-component sensitivity sweep: FDT for every (component, compression level), with only that
component compressed.

**Activation reuse.** Compressing a component of layer ``l`` leaves the input of layer ``l``
unchanged, so the base teacher-forced run caches every layer's input hidden states (and, on the
reference transformer, the residual stream after the attention half of each block) and each
measurement resumes there: components in layer ``l`` cost ``(L - l) / L`` of a pass, MLP
components half a layer less. Resuming replays exactly the ops of ``Transformer.forward``, so the
FDTs are bit-identical to recomputing from scratch (``reuse=False``, what any other model gets).

During the sweep int8 is simulated with the dequantised weight in the float layer (the values
`aa::int8_linear` multiplies by); the planner re-measures its final plan with real `Int8Linear`
modules.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from aa_compile.distributed.work import check_group, check_same, is_writer, merge_owned, owned
from aa_compile.progress import progress as progress_bar

from .components import (
    Component,
    compressed_weight,
    find_components,
    parse,
    set_weight_oi,
    weight_oi,
)
from .metrics import check_prompts, divergence, generate, logits_of, summarize

DEFAULT_LEVELS = ("prune:0.25", "prune:0.5", "prune:0.75", "prune:0.9", "2:4", "int8")


def supports_reuse(model: nn.Module) -> bool:
    """The reference transformer (or anything shaped like it): embed, layers, norm, lm_head."""
    from aa_compile.models.transformer import Transformer

    return isinstance(model, Transformer)


class _Resumable:
    """Layer-by-layer replay of `Transformer.forward` (no cache) with cached states."""

    def __init__(self, model: nn.Module) -> None:
        self.m = model

    def _rope(self, s: int):
        return self.m.rope_cos[:s], self.m.rope_sin[:s]

    def states(self, ids: Tensor) -> list[tuple[Tensor, Tensor]]:
        cos, sin = self._rope(ids.shape[1])
        x = self.m.embed(ids)
        out = []
        for i, blk in enumerate(self.m.layers):
            mid = x + blk.attn(blk.attn_norm(x), cos, sin, None, i)
            out.append((x, mid))
            x = mid + blk.mlp(blk.mlp_norm(mid))
        return out

    def resume(self, states: list[tuple[Tensor, Tensor]], layer: int, part: str) -> Tensor:
        x_in, mid = states[layer]
        cos, sin = self._rope(x_in.shape[1])
        if part == "mlp":
            blk = self.m.layers[layer]
            x = mid + blk.mlp(blk.mlp_norm(mid))
            start = layer + 1
        else:
            x, start = x_in, layer
        for i in range(start, len(self.m.layers)):
            x = self.m.layers[i](x, cos, sin, None, i)
        return self.m.lm_head(self.m.norm(x))


def _preds_nll(logits: Tensor, ref: Tensor, p: int) -> tuple[Tensor, Tensor]:
    lg = logits[:, p - 1:].float()
    nll = torch.nn.functional.cross_entropy(lg.transpose(1, 2), ref[:, p:], reduction="none")
    return lg.argmax(-1), nll.mean(1)


class Measurer:
    """FDT measurements of ``model`` with its current weights against ``reference``: the
    layer inputs are cached once (reference transformer) and each measurement resumes at the
    changed component's layer; other models recompute the whole pass. Shared by the sweep and
    the fixed-budget planners (`aa_compile.dtm.rounds`, `aa_compile.dtm.refine`)."""

    def __init__(self, model: nn.Module, reference: Tensor, prompt_len: int, n_tokens: int,
                 batch_size: int, reuse: bool = True) -> None:
        self.model, self.p, self.n = model, prompt_len, n_tokens
        self.chunks = list(reference.split(batch_size))
        self.reference = reference
        self.runner = _Resumable(model) if reuse and supports_reuse(model) else None
        self.states = ([self.runner.states(c[:, :-1]) for c in self.chunks]
                       if self.runner is not None else None)

    def run(self, comp: Component | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``(fdt, sdt, nll per sequence)``, resumed at ``comp``'s layer (``None``: the whole
        pass)."""
        preds, nlls = [], []
        for k, chunk in enumerate(self.chunks):
            if self.runner is not None:
                layer, part = (0, "attn") if comp is None else (comp.layer, comp.part)
                logits = self.runner.resume(self.states[k], layer, part)
            else:
                logits = logits_of(self.model, chunk[:, :-1])
            pr, nl = _preds_nll(logits, chunk, self.p)
            preds.append(pr)
            nlls.append(nl)
        fdt, sdt = divergence(self.reference[:, self.p:], torch.cat(preds))
        return fdt, sdt, torch.cat(nlls)

    def measure(self, comp: Component | None = None) -> dict:
        """`summarize` of `run` plus the mean ``nll`` of the base continuation."""
        fdt, sdt, nll = self.run(comp)
        out = summarize(fdt, sdt, self.n)
        out["nll"] = nll.mean().item()
        return out


@torch.no_grad()
def sweep(model: nn.Module, prompts: Tensor, n_tokens: int, levels=DEFAULT_LEVELS,
          components: list[str] | None = None, reuse: bool = True, batch_size: int = 64,
          progress: bool = True, tau: float | None = None,
          reference: Tensor | None = None, group=None) -> dict:
    """Sweep every component × level; returns a JSON-able dict (see ``docs/dtm.md``).

    ``reuse`` resumes from cached layer states (reference transformer only; other models
    recompute from scratch). ``reference``: the base ``generate`` output, if already known.
    ``group``: a ``torch.distributed`` process group whose ranks each sweep every
    ``world``-th component and gather the rest (every rank returns the whole result, equal to
    one process's; every rank must pass the same model, prompts and settings). None: one process.
    """
    check_group(group)
    check_prompts(prompts, n_tokens)
    comps = find_components(model)
    if components is not None:
        missing = [c for c in components if c not in comps]
        if missing:
            raise ValueError(f"unknown components {missing[:5]}; see find_components(model)")
        comps = {c: comps[c] for c in components}
    parsed = [parse(lv) for lv in levels]
    if not parsed:
        raise ValueError("levels must name at least one compression")
    model.eval()
    p = prompts.shape[1]
    if reference is None:
        reference = generate(model, prompts, n_tokens, batch_size)
    # the greedy continuations differ when the models or prompts do
    check_same("sweep settings, prompts or models", ([c.spec for c in parsed], list(comps),
               reuse, batch_size, tau, reference), group)
    ctx = Measurer(model, reference, p, n_tokens, batch_size, reuse)
    reuse = ctx.runner is not None
    base_nll = torch.cat([_preds_nll(logits_of(model, c[:, :-1]), c, p)[1] for c in ctx.chunks])

    elt = next(model.parameters()).element_size()
    results: dict[str, dict] = {}
    names = list(comps)
    mine = {names[i] for i in owned(len(names), group)}
    total = len(mine) * len(parsed)
    bar = (progress_bar(total=total, desc="fdtm sweep", unit="run")
           if progress and is_writer(group) else None)
    for name, comp in comps.items():
        if name not in mine:
            continue
        mod = model.get_submodule(name)
        original = weight_oi(mod).detach().clone()
        results[name] = {}
        try:
            for c in parsed:
                set_weight_oi(mod, compressed_weight(original, c))
                fdt, sdt, nlls = ctx.run(comp)
                entry = summarize(fdt, sdt, n_tokens, tau)
                entry["fdt"] = fdt.tolist()
                entry["nll_delta"] = (nlls - base_nll).mean().item()
                entry["bytes_saved"] = c.bytes_saved(comp, elt)
                results[name][c.spec] = entry
                if bar is not None:
                    bar.update()
        finally:
            set_weight_oi(mod, original)
    if bar is not None:
        bar.close()
    if group is not None:
        parts = merge_owned({names.index(n): r for n, r in results.items()}, len(names), group)
        results = dict(zip(names, parts))
    return {
        "n_tokens": n_tokens, "prompt_len": p, "n_prompts": int(prompts.shape[0]),
        "levels": [c.spec for c in parsed], "reuse": reuse, "element_size": elt,
        "base_nll": base_nll.mean().item(),
        "components": {n: {"layer": c.layer, "type": c.type, "out": c.out_features,
                           "in": c.in_features} for n, c in comps.items()},
        "results": results,
    }


def heatmap(result: dict, path, statistic: str = "fdt_median") -> None:
    """PNG: one panel per level, layers (rows) × component type (columns), colour = statistic."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    comps = result["components"]
    layers = sorted({c["layer"] for c in comps.values()})
    types = list(dict.fromkeys(c["type"] for c in comps.values()))
    levels = result["levels"]
    fig, axes = plt.subplots(1, len(levels), figsize=(2.2 + 1.9 * len(levels), 1 + 0.45 *
                             len(layers) + 0.2 * max(len(t) for t in types)), squeeze=False)
    vmax = result["n_tokens"]
    im = None
    for ax, lv in zip(axes[0], levels):
        grid = torch.full((len(layers), len(types)), float("nan"))
        for name, c in comps.items():
            grid[layers.index(c["layer"]), types.index(c["type"])] = \
                result["results"][name][lv][statistic]
        im = ax.imshow(grid.numpy(), vmin=0, vmax=vmax, cmap="viridis", aspect="auto")
        ax.set_title(lv, fontsize=9)
        ax.set_xticks(range(len(types)), [t.split(".")[-1] for t in types], rotation=90,
                      fontsize=7)
        ax.set_yticks(range(len(layers)), [str(v) for v in layers], fontsize=7)
    axes[0][0].set_ylabel("layer")
    fig.colorbar(im, ax=axes[0].tolist(), label=f"{statistic} (N={vmax})", shrink=0.8)
    fig.suptitle("FDT per component with only that component compressed", fontsize=10)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
