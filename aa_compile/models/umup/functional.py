"""Unit-scaled functional ops: the u-μP per-op scaling rules (arXiv 2407.17465).

Every op multiplies its forward output by one constant and the gradients of its inputs by
others, chosen so that unit-RMS inputs and output gradients give unit-RMS outputs and input
gradients at initialisation. The rules and the ``mult`` hyper-parameters follow the u-μP notes
(``shared/research/atman_dtm_umup.md`` §3.2); each docstring names its rule.

The building block is `scaled(x, fwd_scale, bwd_scale)`: an autograd Function whose forward is
``x * fwd_scale`` and whose backward is ``grad * bwd_scale`` (not ``grad * fwd_scale``). Where an
op's backward scale on every input equals its forward scale, a plain ``out * scale`` gives that
exactly (the chain rule does it), so those ops (attention, SwiGLU, the residual skip) are plain
torch and leave no autograd Function in the graph.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


class _Scaled(torch.autograd.Function):
    """Forward ``x * fwd_scale``; backward ``grad * bwd_scale``."""

    @staticmethod
    def forward(ctx, x: Tensor, fwd_scale: float, bwd_scale: float) -> Tensor:
        ctx.bwd_scale = bwd_scale
        return x * fwd_scale

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.bwd_scale, None, None


def scaled(x: Tensor, fwd_scale: float = 1.0, bwd_scale: float = 1.0) -> Tensor:
    """``x * fwd_scale`` in the forward pass; the gradient of ``x`` is ``grad * bwd_scale``.

    ``scaled(x, s, 1)`` scales only the forward value, ``scaled(x, 1, s)`` only the gradient.
    Scales are Python floats (shape-derived constants), so dynamo bakes them into the graph.
    """
    return _Scaled.apply(x, float(fwd_scale), float(bwd_scale))


def log_interpolate(alpha: float, lower: float, upper: float) -> float:
    """``lower ** (1 - alpha) * upper ** alpha``: ``lower`` at alpha 0, ``upper`` at alpha 1,
    geometric in between (the notes' ``loginterp``)."""
    return math.exp((1.0 - alpha) * math.log(lower) + alpha * math.log(upper))


# -- linear layers ------------------------------------------------------------------------------


def linear_scales(fan_in: int, fan_out: int, batch: int, readout: bool = False
                  ) -> tuple[float, float, float]:
    """``(fwd, grad_input, grad_weight)`` multipliers of a unit-scaled linear layer.

    Hidden linear (rule ``linear``, constraint ``to_output_scale``): fwd ``fan_in^-1/2``;
    grad_input ``fan_out^-1/2`` before the constraint, which sets it to the fwd scale
    ``fan_in^-1/2``; grad_weight ``batch^-1/2`` (batch = tokens = numel(x) / fan_in).

    Readout (rule ``linear_readout``, no constraint): fwd ``1/fan_in`` (the μP output
    multiplier), grad_input ``fan_out^-1/2``, grad_weight ``batch^-1/2``.
    """
    grad_weight = batch ** -0.5
    if readout:
        return 1.0 / fan_in, fan_out ** -0.5, grad_weight
    return fan_in ** -0.5, fan_in ** -0.5, grad_weight


def unit_linear(x: Tensor, weight: Tensor, readout: bool = False) -> Tensor:
    """Unit-scaled ``F.linear(x, weight)`` (no bias): the scales of `linear_scales`.

    Written as three `scaled` calls around one ``F.linear``::

        x_s = scaled(x, 1, grad_input)
        w_s = scaled(weight, 1, grad_weight)
        out = scaled(F.linear(x_s, w_s), fwd, 1)

    In the graph dynamo hands a backend, each `scaled` is
    ``getitem(torch.ops.higher_order.autograd_function_apply(fwd_body_N, bwd_body_N, t), 0)``,
    its scales the float constants of ``t * c`` in the ``fwd_body_N`` / ``grad * c`` in the
    ``bwd_body_N`` subgraph modules; the matmul is a ``torch._C._nn.linear`` node whose two
    arguments are such getitems and whose one user is the output's ``autograd_function_apply``,
    and its ``node.meta["nn_module_stack"]`` ends in ``UnitScaledLinear``. A pass that swaps
    the ``linear`` node alone (e.g. for an FP8 matmul with static scale 1) keeps the scales.
    """
    fan_out, fan_in = weight.shape
    fwd, grad_input, grad_weight = linear_scales(fan_in, fan_out, x.numel() // fan_in, readout)
    y = F.linear(scaled(x, 1.0, grad_input), scaled(weight, 1.0, grad_weight))
    return scaled(y, fwd, 1.0)


def unit_embedding(ids: Tensor, weight: Tensor) -> Tensor:
    """Rule ``embedding``: no forward scale (the table is N(0,1)); the weight gradient is
    multiplied by ``sqrt(vocab / num_tokens)`` so a row's summed gradient stays unit."""
    vocab = weight.shape[0]
    return F.embedding(ids, scaled(weight, 1.0, math.sqrt(vocab / ids.numel())))


# -- normalisation and residuals --------------------------------------------------------------


def rms_norm(x: Tensor, eps: float = 1e-6) -> Tensor:
    """Rule ``rms_norm``: no activation scaling, and non-affine (no learned weight), as the
    notes' default. Normalised in float32 and cast back, as the reference transformer."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return h.to(x.dtype)


def residual_taus(n_layers: int, residual_mult: float = 1.0, residual_attn_ratio: float = 1.0
                  ) -> list[float]:
    """τ of each of the ``2·n_layers`` residual branches (even: attention, odd: MLP).

    Rule ``transformer_residual_scaling_rule`` (u-μP App. G):
    ``α_mlp = residual_mult·√(2/(1+ratio²))``, ``α_attn = ratio·α_mlp``, and for branch ``i``
    ``τ_i = α_i / √(n_layers + n_attn·α_attn² + n_mlp·α_mlp²)`` with ``n_attn = ⌊(i+1)/2⌋``,
    ``n_mlp = ⌊i/2⌋`` the branches before it. The embedding then carries as much of the final
    residual stream's variance as all attention branches together, and as all MLP branches
    (at the default mults).
    """
    alpha_mlp = residual_mult * math.sqrt(2.0 / (1.0 + residual_attn_ratio ** 2))
    alpha_attn = residual_attn_ratio * alpha_mlp
    taus = []
    for i in range(2 * n_layers):
        n_attn, n_mlp = (i + 1) // 2, i // 2
        alpha = alpha_attn if i % 2 == 0 else alpha_mlp
        taus.append(alpha / math.sqrt(n_layers + n_attn * alpha_attn ** 2
                                      + n_mlp * alpha_mlp ** 2))
    return taus


def residual_scales(tau: float) -> tuple[float, float]:
    """``(branch, skip) = (τ/√(1+τ²), 1/√(1+τ²))``: the two weights of a residual add."""
    norm = math.sqrt(1.0 + tau * tau)
    return tau / norm, 1.0 / norm


def residual_split(x: Tensor, tau: float) -> tuple[Tensor, Tensor]:
    """Rule ``residual_split``: returns ``(branch_input, skip)``, both equal to ``x``.

    The branch's gradient is multiplied by ``τ/√(1+τ²)`` here ("delayed" from the add, so
    gradients inside the branch stay unit). The skip's scale ``1/√(1+τ²)`` is applied by
    `residual_add` as a plain multiply, which scales its forward and gradient alike: the same
    as the notes' bwd-at-split plus fwd-at-add, since nothing sits between the two.
    """
    branch, _ = residual_scales(tau)
    return scaled(x, 1.0, branch), x


def residual_add(branch_out: Tensor, skip: Tensor, tau: float) -> Tensor:
    """Rule ``residual_add``: ``branch·τ/√(1+τ²) + skip/√(1+τ²)`` (forward-only on the branch,
    see `residual_split`). Unit inputs give a unit output: the two weights' squares sum to 1."""
    branch, skip_scale = residual_scales(tau)
    return scaled(branch_out, branch, 1.0) + skip * skip_scale


# -- attention and activations ----------------------------------------------------------------


def attention_output_scale(head_dim: int, seq_len: int, mult: float = 1.0,
                           is_causal: bool = True, dropout_p: float = 0.0) -> float:
    """Rule ``scaled_dot_product_attention``: the one scale ``s`` for the output (fwd) and for
    q, k, v (bwd): ``s = √(1-p) / loginterp(α, lower, 1)`` with ``α = 1/(1 + 4·d_head/mult²)``
    and ``lower = √(log S / S)`` if causal, else ``√(1/S)`` (the RMS of an average over the
    keys a query sees: uniform attention at α 0, one-hot at α 1).

    For ``S = 1`` the notes' causal ``lower`` would be 0 (log 1); the output is then ``v`` itself,
    so we take ``lower = 1``.
    """
    alpha = 1.0 / (1.0 + 4.0 * head_dim / mult ** 2)
    if seq_len <= 1:
        lower = 1.0
    else:
        lower = math.sqrt((math.log(seq_len) if is_causal else 1.0) / seq_len)
    return math.sqrt(1.0 - dropout_p) / log_interpolate(alpha, lower, 1.0)


def unit_attention(q: Tensor, k: Tensor, v: Tensor, mult: float = 1.0) -> Tensor:
    """Causal SDPA with the μP logit scale ``mult/d_head`` (not ``1/√d_head``), times
    `attention_output_scale`. ``q, k, v``: ``[B, H, S, D]``, as many heads each.

    The rule puts ``s`` on the output (fwd) and on q, k, v (bwd); one plain ``* s`` after the
    SDPA gives exactly that, so the pattern is ``F.scaled_dot_product_attention(q, k, v,
    is_causal=True, scale=mult/D) * s``.
    """
    head_dim, seq_len = q.shape[-1], q.shape[-2]
    s = attention_output_scale(head_dim, seq_len, mult, is_causal=True)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=mult / head_dim)
    return out * s


def silu_glu_scale(mult: float = 1.0) -> float:
    """Rule ``silu_glu``: ``loginterp(α = 1/(1+1/mult²), 2, √2)``. ``x·silu(mult·g)/mult`` has
    RMS 1/2 as mult → 0 (``silu(mg)/m → g/2``) and 1/√2 as mult → ∞ (``→ relu(g)``)."""
    return log_interpolate(1.0 / (1.0 + 1.0 / mult ** 2), 2.0, math.sqrt(2.0))


def unit_silu_glu(x: Tensor, gate: Tensor, mult: float = 1.0) -> Tensor:
    """Rule ``silu_glu``: ``x · silu(mult·gate) / mult`` times `silu_glu_scale` (fwd on the
    output, bwd on both inputs: again one plain multiply)."""
    return x * (F.silu(gate * mult) / mult) * silu_glu_scale(mult)


# -- loss ---------------------------------------------------------------------------------------


def unit_cross_entropy(logits: Tensor, targets: Tensor, mult: float = 1.0) -> Tensor:
    """Rule ``cross_entropy``: logits ``[N, V]`` scaled by ``mult`` forward and their gradient by
    ``V/√(V-1)`` (the softmax-minus-one-hot gradient has RMS ≈ 1/√V at init; this makes it
    unit), summed over tokens, then forward-only × ``1/N``. The value is the usual mean
    cross-entropy in nats, but gradients are not divided by the number of tokens."""
    n, vocab = logits.shape
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    z = scaled(logits, mult, vocab / math.sqrt(vocab - 1))
    return scaled(F.cross_entropy(z, targets, reduction="sum"), 1.0 / n, 1.0)
