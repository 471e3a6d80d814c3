"""The ``aa`` torch.compile backend: run the enabled passes, then hand over to an inner compiler.

    torch.compile(model, backend="aa", options={"inner_compiler": "inductor", ...})
    aa_compile.compile(model, options=...)      # the same, options checked now
    aa_compile.report(fn, *args, options=...)   # compile afresh, run once, CompileReport
    aa_compile.last_report()                    # the graphs of the model compiled last

Dynamo gives us its torch-level FX graph with fake example inputs. Each enabled pass rewrites
that graph in place (into ``aa::`` ops) and records what it did (`aa_compile.report`); the
result goes to the inner compiler. Inductor runs aot_autograd itself, so training graphs get a
backward; the ``aa::`` ops' autograd formulas and decompositions travel with them.

Inductor (and with it dynamo, which imports Triton where installed) is imported on the first
compile, not with this module.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.fx as fx

from aa_compile.config import Config
from aa_compile.logger import log
from aa_compile.ops.registry import install_inductor_decompositions, source_hash
from aa_compile.passes.pipeline import run_passes
from aa_compile.report import (
    CompileReport,
    GraphOrigin,
    GraphReport,
    graph_origin,
    new_compile,
    record,
)


def _inductor(gm: fx.GraphModule, example_inputs: list, config: Config):
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    patches = dict(list_mode_options(config.mode)) if config.mode else {}
    patches.update(config.inductor_options)
    # The aa:: ops' inductor decompositions go into inductor's global table (on the first
    # inductor compile: importing inductor at import time would load dynamo and Triton), out of
    # sight of inductor's FX-graph cache key; a no-op post-grad pass whose uuid hashes the op
    # and kernel sources puts them into the key (unless the user installed a pass there).
    from torch._inductor import config as inductor_config

    install_inductor_decompositions()
    if ("post_grad_custom_post_pass" not in patches
            and inductor_config.post_grad_custom_post_pass is None):
        patches["post_grad_custom_post_pass"] = _ops_version()
    return compile_fx(gm, example_inputs, config_patches=patches)


@functools.cache
def _ops_version():
    """A no-op inductor `CustomGraphPass` that carries `aa_compile.ops.registry.source_hash`
    as its uuid (the class is made on the first inductor compile: its base class lives in
    ``torch._inductor``, which this module does not import at import time)."""
    from torch._inductor.custom_graph_pass import CustomGraphPass

    class OpsVersion(CustomGraphPass):
        def __call__(self, graph) -> None:
            return None

        def uuid(self) -> bytes:
            return source_hash()

    return OpsVersion()


def _inner_compile(gm: fx.GraphModule, example_inputs: list, config: Config):
    name = config.inner_compiler
    if name == "inductor":
        return _inductor(gm, example_inputs, config)
    if name == "eager":
        return gm.forward
    if name == "aot_eager":
        from torch._dynamo.backends.debugging import aot_eager

        return aot_eager(gm, example_inputs)
    if name == "tensorrt":
        # imported on first use: it imports torch-tensorrt (and TensorRT) where installed
        from aa_compile.export.tensorrt import compile_graph

        return compile_graph(gm, example_inputs)
    raise AssertionError(f"unhandled inner compiler {name!r}")  # Config validated it


def aa_backend(
    gm: fx.GraphModule,
    example_inputs: list,
    options: Mapping[str, Any] | Config | None = None,
    mode: str | None = None,
):
    """The ``aa`` backend (registered under that name; see the module docstring)."""
    config = _config(options, mode)
    return _compile_graph(gm, example_inputs, config, origin=graph_origin(gm, example_inputs, config))


def _config(options: Mapping[str, Any] | Config | None, mode: str | None) -> Config:
    config = Config.from_options(options)
    if mode is not None and config.mode is None:
        config = dataclasses.replace(config, mode=mode)
    return config


def _compile_graph(gm: fx.GraphModule, example_inputs: list, config: Config, *,
                   origin: GraphOrigin | None = None, into: CompileReport | None = None):
    """Run the passes on one graph, record its report (under ``into`` or by ``origin``, see
    `aa_compile.report.record`), hand it to the inner compiler."""
    nodes_before = len(gm.graph.nodes)
    results = run_passes(gm, example_inputs, config)
    record(
        GraphReport(
            index=0,  # numbered by record, within its compile
            nodes_before=nodes_before,
            nodes_after=len(gm.graph.nodes),
            inner_compiler=config.inner_compiler,
            passes=results,
        ),
        origin=origin,
        into=into,
    )
    log.info(
        "aa: graph with %d nodes, rewrites %s, inner compiler %s",
        nodes_before,
        {r.name: r.rewrites for r in results},
        config.inner_compiler,
    )
    return _inner_compile(gm, example_inputs, config)


def compile(model, *, options: Mapping[str, Any] | Config | None = None, **compile_kwargs):
    """``torch.compile(model, backend="aa", options=options)``, with the options checked now.

    ``torch.compile`` calls a backend only when the model first runs, so a bad option passed
    through it surfaces then; this checks them immediately.
    """
    if not callable(model):
        raise TypeError(
            f"aa_compile.compile: model must be an nn.Module or callable, got {type(model).__name__}"
        )
    config = Config.from_options(options)
    return torch.compile(model, backend="aa", options=config.__dict__, **compile_kwargs)


def report(
    fn: Callable, *args: Any, options: Mapping[str, Any] | Config | None = None, **kwargs: Any
) -> CompileReport:
    """Compile ``fn`` with the ``aa`` backend afresh, call it once on ``args``, report.

    ``fn`` may be a module or any callable; ``options`` are the backend options (see
    `aa_compile.Config`). The compile is independent of earlier ``torch.compile`` calls of the
    same function, so the report always covers every graph; it is also listed in
    `aa_compile.reports` (and is `aa_compile.last_report` until the next compile).
    """
    if not callable(fn):
        raise TypeError(
            f"aa_compile.report: fn must be a module or callable, got {type(fn).__name__}"
        )
    config = Config.from_options(options)
    collected = new_compile()

    def backend(gm, example_inputs, mode=None):  # a fresh backend forces a fresh dynamo compile
        return _compile_graph(gm, example_inputs, _config(config, mode), into=collected)

    # Each call's fresh backend adds cache entries to fn's code; dynamo counts them against its
    # recompile limits and, past them, would run fn uncompiled (an empty report).
    from torch._dynamo import config as dynamo_config

    with dynamo_config.patch(recompile_limit=_NO_LIMIT, accumulated_recompile_limit=_NO_LIMIT):
        torch.compile(fn, backend=backend)(*args, **kwargs)
    return collected


_NO_LIMIT = 2**31 - 1
