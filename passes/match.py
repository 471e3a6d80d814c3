"""Small helpers for matching torch-level FX graphs as dynamo produces them.

Dynamo records the same math in several spellings: ``torch.rsqrt(t)`` is a ``call_function``,
``t.rsqrt()`` a ``call_method``, ``a * b`` an ``operator.mul``. These helpers let a pass ask
"is this node rsqrt?" once, for every spelling.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.fx as fx


def is_op(node: Any, functions: Iterable[Callable] = (), methods: Iterable[str] = ()) -> bool:
    """True if ``node`` calls one of ``functions`` or one of the Tensor ``methods``."""
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_function":
        return node.target in tuple(functions)
    if node.op == "call_method":
        return node.target in tuple(methods)
    return False


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """The argument at ``index`` or keyword ``name`` (call_method: index counts ``self``)."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def value(node: Any) -> Any:
    """The example (fake) value dynamo recorded for ``node``, or ``None``."""
    if not isinstance(node, fx.Node):
        return None
    meta = node.meta
    return meta.get("example_value", meta.get("val"))


def tensor_value(node: Any) -> torch.Tensor | None:
    v = value(node)
    return v if isinstance(v, torch.Tensor) else None


def other_operand(node: fx.Node, one: fx.Node) -> Any:
    """For a binary op node with ``one`` as an operand, the other operand (or None)."""
    a, b = node.args[0], node.args[1] if len(node.args) > 1 else None
    if a is one:
        return b
    if b is one:
        return a
    return None


MUL_FUNCS = (operator.mul, torch.mul, torch.Tensor.mul)
ADD_FUNCS = (operator.add, torch.add, torch.Tensor.add)
DIV_FUNCS = (operator.truediv, torch.div, torch.true_divide, torch.Tensor.div)


def is_mul(node: Any) -> bool:
    return is_op(node, MUL_FUNCS, ("mul",))


def is_add(node: Any) -> bool:
    return is_op(node, ADD_FUNCS, ("add",))


def is_div(node: Any) -> bool:
    return is_op(node, DIV_FUNCS, ("div", "true_divide"))


def is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def replace_with_call(old: fx.Node, target: Callable, args: tuple, kwargs: dict | None = None
                      ) -> fx.Node:
    """Insert ``target(*args, **kwargs)`` before ``old``, give it ``old``'s metadata (the example
    value later passes and guards read) and send every use of ``old`` to it. ``old`` is left in
    the graph, now unused, for the caller to erase with whatever else the rewrite made dead."""
    with old.graph.inserting_before(old):
        new = old.graph.call_function(target, args, kwargs or {})
    new.meta.update(old.meta)
    old.replace_all_uses_with(new)
    return new


def only_used_by(node: fx.Node, allowed: Iterable[fx.Node]) -> bool:
    """True if every user of ``node`` is in ``allowed`` (so the node may be removed)."""
    allowed = set(allowed)
    return all(user in allowed for user in node.users)
