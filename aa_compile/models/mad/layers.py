"""MAD's layer menu in plain PyTorch: rotary attention (full or sliding-window), SwiGLU, MLP and
a gated linear attention (a non-attention-softmax sequence mixer).

Every layer maps ``[B, S, dim] -> [B, S, dim]`` and is causal, so it fits MAD's pre-norm
residual stacks (`aa_compile.models.mad.model`). Defaults follow ``mad-lab``'s layer configs
(``configs/layers/*.yml``); the attention is written out with ``F.scaled_dot_product_attention``
instead of ``flash_attn`` so it runs on CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def rotary_tables(rotary_dim: int, max_length: int, base: float = 10000.0
                  ) -> tuple[Tensor, Tensor]:
    """cos and sin ``[max_length, rotary_dim // 2]`` of the rotary angles ``t / base^(2i/d)``."""
    inv_freq = base ** (-torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    angles = torch.arange(max_length, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the first ``2 * cos.shape[-1]`` features of ``x [B, H, S, D]`` pairwise (the
    non-interleaved half-split layout); the other features pass through."""
    r = cos.shape[-1]
    x1, x2, rest = x[..., :r], x[..., r:2 * r], x[..., 2 * r:]
    c, s = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * c - x2 * s, x1 * s + x2 * c, rest], dim=-1)


def causal_window_mask(seq_len: int, window: int | None, device: torch.device | None = None
                       ) -> Tensor:
    """Boolean ``[S, S]``: query i sees key j iff ``j <= i`` and ``i - j < window`` (any j <= i
    when ``window`` is None)."""
    i = torch.arange(seq_len, device=device)[:, None]
    j = torch.arange(seq_len, device=device)[None, :]
    mask = j <= i
    if window is not None:
        mask &= (i - j) < window
    return mask


class RotaryAttention(nn.Module):
    """Causal multi-head self-attention with rotary position embeddings on the first
    ``rotary_dim`` features of each head and an optional sliding window (a query sees itself
    and the ``window - 1`` tokens before it)."""

    def __init__(self, dim: int, num_heads: int = 16, rotary_dim: int | None = None,
                 window: int | None = None, max_length: int = 1280, bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        head_dim = dim // num_heads
        rotary_dim = head_dim if rotary_dim is None else rotary_dim
        if rotary_dim % 2 or not 0 <= rotary_dim <= head_dim:
            raise ValueError(f"rotary_dim must be even and in [0, head_dim={head_dim}], "
                             f"got {rotary_dim}")
        if window is not None and window < 1:
            raise ValueError(f"window must be >= 1 or None, got {window}")
        self.num_heads, self.head_dim, self.window = num_heads, head_dim, window
        self.max_length = max_length
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.out = nn.Linear(dim, dim, bias=bias)
        cos, sin = rotary_tables(rotary_dim, max_length)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        b, s, d = x.shape
        if s > self.max_length:
            raise ValueError(f"sequence length {s} exceeds max_length={self.max_length}")
        q, k, v = self.qkv(x).view(b, s, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        cos, sin = self.cos[:s], self.sin[:s]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if self.window is None or self.window >= s:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            mask = causal_window_mask(s, self.window, x.device)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(o.transpose(1, 2).reshape(b, s, d))


def swiglu_hidden(dim: int, multiple_of: int = 16) -> int:
    """``mad-lab``'s SwiGLU width: ``2/3 · 4 · dim`` rounded up to a multiple of 16."""
    hidden = int(2 * 4 * dim / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))`` without biases."""

    def __init__(self, dim: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or swiglu_hidden(dim)
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class MLP(nn.Module):
    """``fc2(gelu_tanh(fc1(x)))`` with a ``4 · dim`` inner width."""

    def __init__(self, dim: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or 4 * dim
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class GatedLinearAttention(nn.Module):
    """Linear attention with a data-dependent decay per head (the scalar-gate form of GLA,
    arXiv 2312.06635): state ``S_t = g_t S_{t-1} + k_tᵀ v_t``, output ``q_t S_t``.

    ``log g_t = logsigmoid(w·x_t) / gate_normalizer`` keeps the decay near 1 at start, as GLA's
    normaliser of 16 does. `forward` uses the parallel form (a ``[S, S]`` decay matrix built
    from differences of cumulative log gates, masked before ``exp`` so nothing overflows);
    `recurrent` is the step-by-step definition the tests compare it with. The output is
    RMS-normalised per head and gated by ``silu(w_o·x)``.
    """

    def __init__(self, dim: int, num_heads: int = 1, gate_normalizer: float = 16.0,
                 eps: float = 1e-6) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.gate_normalizer, self.eps = gate_normalizer, eps
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.decay = nn.Linear(dim, num_heads)
        self.out_gate = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim, bias=False)

    def _project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k = k * self.head_dim ** -0.5
        log_g = F.logsigmoid(self.decay(x)).transpose(1, 2) / self.gate_normalizer  # [B, H, S]
        return q, k, v, log_g

    def _finish(self, x: Tensor, o: Tensor) -> Tensor:
        b, s, d = x.shape
        o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + self.eps)
        o = o.transpose(1, 2).reshape(b, s, d)
        return self.out(F.silu(self.out_gate(x)) * o)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v, log_g = self._project(x)
        s = x.shape[1]
        cum = log_g.cumsum(-1)
        diff = cum[..., :, None] - cum[..., None, :]  # log of prod_{r=j+1..i} g_r
        causal = causal_window_mask(s, None, x.device)
        decay = torch.exp(diff.masked_fill(~causal, float("-inf")))
        o = ((q @ k.transpose(-1, -2)) * decay) @ v
        return self._finish(x, o)

    def recurrent(self, x: Tensor) -> Tensor:
        """The same output computed one step at a time from the state recursion."""
        q, k, v, log_g = self._project(x)
        b, h, s, dh = q.shape
        state = x.new_zeros(b, h, dh, dh)
        outs = []
        for t in range(s):
            decay = log_g[..., t, None, None].exp()
            state = decay * state + k[..., t, :, None] * v[..., t, None, :]
            outs.append((q[..., t, None, :] @ state).squeeze(-2))
        return self._finish(x, torch.stack(outs, dim=2))


def multi_heads(dim: int, wanted: int) -> int:
    """The most heads up to ``wanted`` that split ``dim`` into even head widths (1 if none)."""
    for h in range(min(wanted, dim), 0, -1):
        if dim % h == 0 and (dim // h) % 2 == 0:
            return h
    return 1


def make_layer(name: str, dim: int, max_length: int) -> nn.Module:
    """One layer of the menu by its ``mad-lab`` name, at that layer's default settings."""
    if name not in LAYERS:
        raise ValueError(f"unknown MAD layer {name!r}; choose one of {sorted(LAYERS)}")
    return LAYERS[name](dim, max_length)


LAYERS = {
    "mh-attention": lambda d, n: RotaryAttention(d, num_heads=multi_heads(d, 16), max_length=n),
    "attention": lambda d, n: RotaryAttention(d, num_heads=1, max_length=n),
    # not a mad-lab layer: 4 wider heads (width 16 at dim 64), the in-context recall recipe
    "mh4-attention": lambda d, n: RotaryAttention(d, num_heads=multi_heads(d, 4), max_length=n),
    "mh-sliding-attention": lambda d, n: RotaryAttention(
        d, num_heads=multi_heads(d, 16), window=32, max_length=n),
    "sliding-attention": lambda d, n: RotaryAttention(d, num_heads=1, window=32, max_length=n),
    "swiglu": lambda d, n: SwiGLU(d),
    "mlp": lambda d, n: MLP(d),
    "gated-linear-attention": lambda d, n: GatedLinearAttention(d, num_heads=1),
    "mh-gated-linear-attention": lambda d, n: GatedLinearAttention(
        d, num_heads=multi_heads(d, 8)),
}
