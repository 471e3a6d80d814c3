"""Shared hypothesis strategies for the op tests.

`relayout` puts a tensor in another memory layout: the same values (or, for ``expanded``, the
values of one slice broadcast along a dimension) behind non-unit, zero or permuted strides and
a storage offset; `layouts` draws one. `op_calls` draws one of an `OpEntry`'s
sample calls with every tensor argument in a drawn layout, and `check_layout_invariance`
compares a call with the same call on contiguous copies (``tests/test_ops.py`` runs it over
every registered op; the Triton kernel tests over their kernels).
"""

from __future__ import annotations

from typing import Any

import torch
from hypothesis import strategies as st
from torch import Tensor

#: "contiguous" first: hypothesis shrinks towards it, so a failure names the layouts it needs
LAYOUTS = ("contiguous", "transposed", "stepped", "permuted", "expanded")


def _fill_value(dtype: torch.dtype):
    """What a kernel that ignores strides reads between the elements: loud for floats."""
    return float("nan") if dtype.is_floating_point else 0


def relayout(t: Tensor, layout: str, dim: int = -1, other: int = -2, step: int = 2,
             start: int = 1, perm: list[int] | None = None) -> Tensor:
    """``t`` in ``layout`` (one of `LAYOUTS`): a view of a fresh base tensor (a leaf that
    requires grad when ``t`` does, so gradients reach the view).

    - ``transposed``: dims ``dim`` and ``other`` swapped in memory (transposed, made
      contiguous, transposed back): ``stride(dim) != 1``;
    - ``stepped``: every ``step``-th element along ``dim`` of a larger buffer from ``start``
      (the gaps hold NaN for floats);
    - ``permuted``: stored in the dimension order ``perm`` and permuted back;
    - ``expanded``: slice 0 along ``dim`` broadcast over that dim (stride 0; values change:
      compare against ``.contiguous()`` of the result).
    """
    x = t.detach()
    n = x.dim()
    if layout == "contiguous" or n == 0 or (layout == "expanded" and x.shape[dim] == 0):
        base, view_of = x.clone(), lambda b: b
    elif layout == "transposed":
        base, view_of = x.transpose(dim, other).contiguous(), lambda b: b.transpose(dim, other)
    elif layout == "permuted":
        perm = list(range(n))[::-1] if perm is None else list(perm)
        inverse = sorted(range(n), key=perm.__getitem__)
        base, view_of = x.permute(perm).contiguous(), lambda b: b.permute(inverse)
    elif layout == "stepped":
        d = dim % n
        shape = list(x.shape)
        shape[d] = shape[d] * step + start
        index = (slice(None),) * d + (slice(start, None, step),)
        base = torch.full(shape, _fill_value(x.dtype), dtype=x.dtype, device=x.device)
        base[index] = x
        view_of = lambda b: b[index]  # noqa: E731
    elif layout == "expanded":
        d = dim % n
        base = x.narrow(d, 0, 1).clone()
        stride = list(base.stride())
        stride[d] = 0
        view_of = lambda b: b.as_strided(x.shape, stride)  # noqa: E731
    else:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    return view_of(base.requires_grad_(t.requires_grad))


class Layout:
    """A drawn `relayout` (a plain class: hypothesis prints a failing example by its repr)."""

    def __init__(self, name: str, dim: int = -1, other: int = -2, step: int = 2,
                 start: int = 1, perm: tuple[int, ...] | None = None) -> None:
        self.name, self.dim, self.other, self.perm = name, dim, other, perm
        self.step, self.start = step, start

    def __call__(self, t: Tensor) -> Tensor:
        return relayout(t, self.name, self.dim, self.other, self.step, self.start,
                        None if self.perm is None else list(self.perm))

    def __repr__(self) -> str:
        if self.name == "contiguous":
            return "contiguous"
        detail = {"transposed": f"{self.dim}<->{self.other}", "permuted": f"{self.perm}",
                  "stepped": f"dim={self.dim}, step={self.step}, start={self.start}",
                  "expanded": f"dim={self.dim}"}[self.name]
        return f"{self.name}({detail})"


@st.composite
def layouts(draw, n_dims: int, names=LAYOUTS) -> Layout:
    """A `Layout` for a tensor with ``n_dims`` dimensions (contiguous for a 0-d one)."""
    if n_dims == 0:
        return Layout("contiguous")
    allowed = [x for x in names if n_dims >= 2 or x not in ("transposed", "permuted")]
    name = draw(st.sampled_from(allowed))
    dim = draw(st.integers(0, n_dims - 1))
    if name == "transposed":
        other = draw(st.integers(0, n_dims - 1).filter(lambda o: o != dim))
        return Layout(name, dim, other)
    if name == "permuted":
        perm = draw(st.permutations(list(range(n_dims))).filter(lambda p: p != sorted(p)))
        return Layout(name, perm=tuple(perm))
    if name == "stepped":
        return Layout(name, dim, step=draw(st.integers(2, 3)), start=draw(st.integers(0, 1)))
    if name == "expanded":
        return Layout(name, dim)
    return Layout(name)


def contiguous_twin(a: Any) -> Any:
    """``a`` with the same values, contiguous (a fresh leaf when ``a`` requires grad)."""
    if not isinstance(a, Tensor):
        return a
    return a.detach().contiguous().clone().requires_grad_(a.requires_grad)


class Call:
    """A sample call with its tensor arguments relaid (`op_calls`); the repr names the sample
    and the layouts, not the tensors."""

    def __init__(self, sample: int, layouts: dict, args: tuple, kwargs: dict) -> None:
        self.sample, self.layouts, self.args, self.kwargs = sample, layouts, args, kwargs

    def __repr__(self) -> str:
        drawn = ", ".join(f"{k}: {v!r}" for k, v in self.layouts.items())
        return f"Call(sample={self.sample}, layouts={{{drawn}}})"

    def contiguous(self) -> tuple[tuple, dict]:
        """The same call with every tensor contiguous (same values)."""
        return (tuple(map(contiguous_twin, self.args)),
                {k: contiguous_twin(a) for k, a in self.kwargs.items()})


@st.composite
def op_calls(draw, samples: list, keep_values=()) -> Call:
    """One of ``samples`` (``(args, kwargs)`` as an `OpEntry` yields them) with every tensor
    argument in a drawn layout. ``keep_values``: argument positions / keywords never
    ``expanded`` (for kernels that trust their callers with offsets and would read garbage)."""
    i = draw(st.integers(0, len(samples) - 1))
    args, kwargs = samples[i]
    drawn = {}
    for key, a in [*enumerate(args), *kwargs.items()]:
        if isinstance(a, Tensor):
            names = [x for x in LAYOUTS if key not in keep_values or x != "expanded"]
            drawn[key] = draw(layouts(a.dim(), names))
    new_args = tuple(drawn[j](a) if j in drawn else a for j, a in enumerate(args))
    new_kwargs = {k: drawn[k](a) if k in drawn else a for k, a in kwargs.items()}
    return Call(i, drawn, new_args, new_kwargs)


def run(fn, args: tuple, kwargs: dict):
    """``(outputs, gradients, None)`` or ``(None, None, the ValueError / RuntimeError)``: the
    gradients of the differentiable outputs (a fixed upstream gradient) w.r.t. the inputs
    that require grad."""
    try:
        out = fn(*args, **kwargs)
    except (ValueError, RuntimeError) as e:
        return None, None, e
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    inputs = [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor) and a.requires_grad]
    diff = [o for o in outs if isinstance(o, Tensor) and o.requires_grad]
    grads = []
    if inputs and diff:
        g = torch.Generator().manual_seed(0)
        ups = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o) for o in diff]
        grads = torch.autograd.grad(diff, inputs, ups, allow_unused=True)
    return [o.detach() if isinstance(o, Tensor) else o for o in outs], grads, None


def assert_same(got, want, what: str) -> None:
    """Equal up to rounding (a reduction may sum in another order for another layout):
    integers exactly, floats within a small fraction of the output's largest magnitude."""
    if not isinstance(want, Tensor) or not want.is_floating_point():
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=lambda m: f"{what}: {m}")
        return
    tol = {torch.float64: 1e-10, torch.float32: 1e-4}.get(want.dtype, 2 ** -6)
    finite = want[want.isfinite()]
    scale = float(finite.abs().max()) if finite.numel() else 0.0
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * max(scale, 1.0), equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


def check_layout_invariance(fn, call: Call, name: str) -> None:
    """``fn`` on ``call``'s relaid tensors gives what it gives on contiguous copies: the same
    outputs and gradients (`assert_same`), or the same error."""
    want, want_grads, want_err = run(fn, *call.contiguous())
    got, got_grads, got_err = run(fn, call.args, call.kwargs)
    if want_err is not None or got_err is not None:
        assert type(got_err) is type(want_err) and str(got_err) == str(want_err), (
            f"{name}: relaid inputs raised {got_err!r}, contiguous ones {want_err!r}")
        return
    assert len(got) == len(want) and len(got_grads) == len(want_grads)
    for i, (a, b) in enumerate(zip(got, want)):
        assert_same(a, b, f"{name} output {i}")
    for i, (a, b) in enumerate(zip(got_grads, want_grads)):
        assert (a is None) == (b is None), f"{name}: gradient {i} missing on one side"
        if a is not None:
            assert_same(a, b, f"{name} gradient {i}")
