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
FP8_MODES = (None, "static", "tensorwise", "rowwise")
#: Linears kept out of FP8 by default: u-μP's "critical matmuls" (input scale can grow during
#: training), the attention out-projection and the FFN down-projection, which the paper runs
#: in bf16; and the LM head (the paper's 70%-FP8 count covers the blocks only; in FP8 it cost
#: 3.0% final loss vs 1.3% kept, bench/umup_fp8_parity.py, 300 steps).
FP8_KEEP = ("o_proj", "down_proj", "lm_head")


@dataclasses.dataclass(frozen=True)
class Config:
    """Options of the ``aa`` backend.

    Attributes:
        inner_compiler: what compiles the graph after the passes ran. ``"inductor"`` (default)
            generates fused code; ``"eager"`` runs the rewritten graph as is (fast to compile,
            for tests and debugging); ``"aot_eager"`` traces forward and backward with
            aot_autograd but does not generate code; ``"tensorrt"`` needs ``torch-tensorrt``.
        passes: names of the passes to run, in pipeline order. ``None`` runs every pass that is
            enabled by default (see ``aa_compile.passes.pipeline.PIPELINE``).
        disable: names of passes to leave out (applied after ``passes``).
        strict: raise when a pass fails instead of logging the error and skipping the pass.
        mode: the inductor mode (as in ``torch.compile(mode=...)``).
        inductor_options: extra inductor config patches (``torch._inductor.config`` keys).
        fp8: run linear layers as `aa::fp8_linear` (pass ``fp8_linear``). ``None`` (default):
            off. ``"static"``: the unit-scaled linears of a u-μP model, scale 1 (their u-μP
            scales are kept around the FP8 matmul). ``"tensorwise"`` / ``"rowwise"``: every
            ``nn.Linear`` / ``F.linear``, scaled from the amax per tensor / per row.
        fp8_keep: linears left in their own precision, by module name: a last name component
            (``"o_proj"``) or a dotted suffix of the module path (``"layers.0.mlp.down_proj"``).
            Default: u-μP's attention out- and FFN down-projections, and the LM head.
    """

    inner_compiler: str = "inductor"
    passes: tuple[str, ...] | None = None
    disable: tuple[str, ...] = ()
    strict: bool = False
    mode: str | None = None
    inductor_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    fp8: str | None = None
    fp8_keep: tuple[str, ...] = FP8_KEEP

    def __post_init__(self) -> None:
        from aa_compile.passes.pipeline import PASSES

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
        if self.fp8 not in FP8_MODES:
            raise ValueError(f"aa: fp8={self.fp8!r} is not valid; choose one of {list(FP8_MODES)}")
        keep = self.fp8_keep
        if (isinstance(keep, (str, bytes)) or not isinstance(keep, (list, tuple))
                or not all(isinstance(k, str) and k.strip(". ") for k in keep)):
            raise ValueError(
                f"aa: fp8_keep must be a list of module names (e.g. {list(FP8_KEEP)}; [] to "
                f"keep none), got {keep!r}"
            )
        object.__setattr__(self, "fp8_keep", tuple(keep))

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
        from aa_compile.passes.pipeline import PIPELINE

        if self.passes is None:
            chosen = [p.name for p in PIPELINE if p.default_enabled]
        else:
            order = {p.name: i for i, p in enumerate(PIPELINE)}
            chosen = sorted(dict.fromkeys(self.passes), key=order.__getitem__)
        return [name for name in chosen if name not in self.disable]

    def key(self) -> str:
        """A stable string of the options that change what the passes produce (for uuids)."""
        return repr(
            (self.enabled_passes(), self.strict, sorted(self.inductor_options.items()),
             self.fp8, self.fp8_keep)
        )
