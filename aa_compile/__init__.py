"""aa-compile: a torch.compile backend, FX passes and `aa::` kernels for research language models.

    import aa_compile                      # optional: the backend is also an entry point
    model = torch.compile(model, backend="aa", options={"inner_compiler": "inductor"})
    print(aa_compile.report(model, inputs))  # compile afresh, run once, what the passes did
    aa_compile.last_report()                  # the graphs of the model compiled last
    aa_compile.reports()                      # every compile so far (clear_reports() forgets)

See ``docs/architecture.md`` for the layers (passes -> ops -> kernels).
"""

from __future__ import annotations

from importlib import metadata

from aa_compile import ops  # noqa: F401  (defines the aa:: custom ops)
from aa_compile.backend import aa_backend, compile, report
from aa_compile.config import Config
from aa_compile.logger import configure_from_env, log
from aa_compile.report import CompileReport, GraphReport, clear_reports, last_report, reports

__version__ = "0.1.0"
BACKEND_NAME = "aa"

__all__ = [
    "BACKEND_NAME",
    "CompileReport",
    "Config",
    "GraphReport",
    "aa_backend",
    "clear_reports",
    "compile",
    "last_report",
    "log",
    "report",
    "reports",
]


def _register_backend() -> None:
    """Register ``backend="aa"`` unless torch will load it through our entry point.

    When the package is installed, torch finds the ``torch_dynamo_backends`` entry point and
    registers the backend itself on first use; registering here as well would trip its
    duplicate-name check. From a source tree without an install there is no entry point.
    The entry point is looked up first: only without one is ``torch._dynamo`` imported here
    (it imports Triton where Triton is installed; ``import aa_compile`` stays cheap).
    """
    entry_points = metadata.entry_points(group="torch_dynamo_backends")
    if any(ep.name == BACKEND_NAME and ep.value.startswith("aa_compile.") for ep in entry_points):
        return
    from torch._dynamo.backends import registry

    if BACKEND_NAME in registry._COMPILER_FNS:
        return
    registry.register_backend(aa_backend, name=BACKEND_NAME)


configure_from_env()
_register_backend()
