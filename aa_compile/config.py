"""`Config`: the validated form of ``torch.compile(..., backend="aa", options={...})``.

Every option the backend understands is a field here, so an unknown key or a bad value is
caught before any graph is touched, with a message that lists what is valid.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

INNER_COMPILERS = ("inductor", "eager", "aot_eager", "tensorrt")
MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclasses.dataclass(frozen=True)
class Config:
    """Options of the ``aa`` backend.

    Attributes:
        inner_compiler: what compiles the graph after the passes ran. ``"inductor"`` (default)
            generates fused code; ``"eager"`` runs the rewritten graph as is (fast to compile,
            for tests and debugging); ``"aot_eager"`` traces forward and backward with
            aot_autograd but does not generate code; ``"tensorrt"`` needs ``torch-tensorrt``.
        passes: names of the passes to run, in pipeline order. ``None`` runs every pass that is
            enabled by default (see ``aa_compile.passes.PIPELINE``).
        disable: names of passes to leave out (applied after ``passes``).
        strict: raise when a pass fails instead of logging the error and skipping the pass.
        mode: the inductor mode (as in ``torch.compile(mode=...)``).
        inductor_options: extra inductor config patches (``torch._inductor.config`` keys).
    """

    inner_compiler: str = "inductor"
    passes: tuple[str, ...] | None = None
    disable: tuple[str, ...] = ()
    strict: bool = False
    mode: str | None = None
    inductor_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        from aa_compile.passes import PASSES

        if self.inner_compiler not in INNER_COMPILERS:
            raise ValueError(
                f"aa: inner_compiler={self.inner_compiler!r} is not valid; "
                f"choose one of {list(INNER_COMPILERS)}"
            )
        if self.mode not in MODES:
            raise ValueError(f"aa: mode={self.mode!r} is not valid; choose one of {list(MODES)}")
        for key in ("passes", "disable"):
            value = getattr(self, key)
            if value is None:
                continue
            if isinstance(value, str) or not all(isinstance(v, str) for v in value):
                raise ValueError(
                    f"aa: {key} must be a list of pass names, got {value!r}; "
                    f"valid names: {sorted(PASSES)}"
                )
            unknown = [v for v in value if v not in PASSES]
            if unknown:
                raise ValueError(
                    f"aa: unknown pass name(s) {unknown} in {key}; valid names: {sorted(PASSES)}"
                )
            object.__setattr__(self, key, tuple(value))
        if not isinstance(self.strict, bool):
            raise ValueError(f"aa: strict must be True or False, got {self.strict!r}")
        if not isinstance(self.inductor_options, Mapping):
            raise ValueError(
                f"aa: inductor_options must be a dict of torch._inductor.config keys, "
                f"got {type(self.inductor_options).__name__}"
            )
        object.__setattr__(self, "inductor_options", dict(self.inductor_options))

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | Config | None) -> Config:
        """Build a `Config` from the ``options`` dict that ``torch.compile`` passes along."""
        if options is None:
            return cls()
        if isinstance(options, Config):
            return options
        if not isinstance(options, Mapping):
            raise ValueError(
                f"aa: options must be a dict or aa_compile.Config, got {type(options).__name__}"
            )
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ValueError(f"aa: unknown option(s) {unknown}; valid options: {valid}")
        return cls(**options)

    def enabled_passes(self) -> list[str]:
        """Pass names that will run, in pipeline order."""
        from aa_compile.passes import PIPELINE

        if self.passes is None:
            chosen = [p.name for p in PIPELINE if p.default_enabled]
        else:
            order = {p.name: i for i, p in enumerate(PIPELINE)}
            chosen = sorted(dict.fromkeys(self.passes), key=order.__getitem__)
        return [name for name in chosen if name not in self.disable]

    def key(self) -> str:
        """A stable string of the options that change what the passes produce (for uuids)."""
        return repr(
            (self.enabled_passes(), self.strict, sorted(self.inductor_options.items()))
        )
