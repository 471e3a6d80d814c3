"""Sizes as the HAT passes see them: Python ints in a static graph, dynamo's SymInts in a
dynamic-shape one. Comparisons are decided without adding guards (except `same_or_guard`), and
a size can be evaluated at concrete values of its symbols (the proofs' probe sizes)."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import guarding_hint_or_throw, statically_known_true


def expr(v):
    """The sympy expression of a SymInt, shape-env replacements applied (None for an int)."""
    if isinstance(v, torch.SymInt):
        node = v.node
        return node.shape_env.replace(node.expr)
    return None


def same(a, b) -> bool:
    """``a == b`` for ints or SymInts, decided without adding a guard (False when unknown)."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    try:
        return bool(statically_known_true(a == b))
    except Exception:  # noqa: BLE001  (not comparable: not the same)
        return False


def same_or_guard(a, b) -> bool:
    """``a == b`` when `same`; else, for symbolic sizes equal at dynamo's example inputs,
    installs that equality as a guard of the compiled graph (dynamo re-checks it every call
    and recompiles when it fails) and returns True; else False."""
    if same(a, b):
        return True
    if isinstance(a, int) and isinstance(b, int):
        return False
    try:
        if guarding_hint_or_throw(a) != guarding_hint_or_throw(b):
            return False
        return bool(a == b)
    except Exception:  # noqa: BLE001  (no hint, or the shape env takes no more guards)
        return False


def size_at(v, sizes: dict) -> int:
    """``v`` (an int or a SymInt) at the concrete ``sizes`` (symbol -> value)."""
    if isinstance(v, int):
        return v
    value = expr(v).xreplace(sizes)
    if not value.is_Integer:
        raise ValueError(f"size {v} does not evaluate to an integer at {sizes}")
    return int(value)


def shape_arg(shape) -> tuple | None:
    """``shape`` as reshape arguments: its one symbolic dimension (if any) as -1; None when
    more than one dimension is symbolic."""
    dynamic = [i for i, s in enumerate(shape) if not isinstance(s, int)]
    if len(dynamic) > 1:
        return None
    return tuple(-1 if i in dynamic else s for i, s in enumerate(shape))


def symbols_of(v) -> set:
    """The free symbols of a SymInt, or of every size of a tensor (empty for static sizes)."""
    if isinstance(v, torch.SymInt):
        return set(expr(v).free_symbols)
    if isinstance(v, Tensor):
        return set().union(*(symbols_of(s) for s in v.shape)) if v.dim() else set()
    return set()


def shape_env_of(values):
    """The shape env of the first symbolic size among ``values`` (tensors or sizes), or None."""
    for v in values:
        for s in (v.shape if isinstance(v, Tensor) else (v,)):
            if isinstance(s, torch.SymInt):
                return s.node.shape_env
    return None
