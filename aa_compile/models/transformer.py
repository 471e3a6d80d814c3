"""A lean Llama-style decoder: the reference model AtMan, FDTM and the benchmarks work on.

RMSNorm, rotary position embeddings (RoPE), SwiGLU feed-forward, grouped-query attention through
``F.scaled_dot_product_attention``, an optional KV cache and greedy ``generate``. Written
plainly: it is the numerics spec, so it calls no ``aa::`` kernel; the backend's passes put those
in (the RMSNorm below is hand-written on purpose, the way Llama checkpoints define it).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Shape of the model. ``d_ff`` defaults to the Llama rule (8/3·d rounded up to a multiple of 256)."""

    vocab_size: int = 32000
    d_model: int = 512
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: int | None = None
    d_ff: int | None = None
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"TransformerConfig.{name} must be a positive int, got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"TransformerConfig: d_model={self.d_model} must be divisible by "
                f"n_heads={self.n_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"TransformerConfig: head_dim={self.head_dim} must be even for RoPE")
        kv = self.kv_heads
        if kv <= 0 or self.n_heads % kv:
            raise ValueError(
                f"TransformerConfig: n_heads={self.n_heads} must be a multiple of "
                f"n_kv_heads={kv}"
            )
        if self.norm_eps <= 0:
            raise ValueError(f"TransformerConfig.norm_eps must be > 0, got {self.norm_eps}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def ffn_dim(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        return 256 * math.ceil(int(8 * self.d_model / 3) / 256)


class RMSNorm(nn.Module):
    """``weight * x / rms(x)``, normalized in float32 and cast back (the Llama definition)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos and sin tables ``[max_seq_len, head_dim / 2]`` in float32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (first half, second half) of the head dimension. ``x``: ``[B, H, S, D]``."""
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = cos[None, None], sin[None, None]
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)


class KVCache:
    """Per-layer keys and values of the tokens seen so far, preallocated to ``max_len``."""

    def __init__(self, n_layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        shape = (batch, kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.length = 0
        self.max_len = max_len

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append ``k, v`` (``[B, H, S, D]``) at the current length; return all keys/values."""
        start, end = self.length, self.length + k.shape[2]
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.n_heads, self.kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None = None,
                layer: int = 0, queries: int = 0) -> Tensor:
        """``queries = n > 0``: outputs of the last n positions only (their queries against
        the keys/values of all positions, which still enter the cache)."""
        b, s, _ = x.shape
        n = queries if 0 < queries < s else s
        xq, cq, sq = (x, cos, sin) if n == s else (x[:, s - n:], cos[s - n:], sin[s - n:])
        q = self.q_proj(xq).view(b, n, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cq, sq), apply_rope(k, cos, sin)
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.update(layer, k, v)
        if self.kv_heads != self.n_heads:
            repeat = self.n_heads // self.kv_heads
            k = k.repeat_interleave(repeat, dim=1)
            v = v.repeat_interleave(repeat, dim=1)
        if past == 0 and n == s:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # queries sit at positions past+s-n..past+s-1 and see every earlier key
            keep = torch.ones(n, past + s, dtype=torch.bool, device=x.device).tril(past + s - n)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1))


class SwiGLU(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None = None,
                layer: int = 0, queries: int = 0) -> Tensor:
        """``queries = n > 0``: the outputs of the last n positions only (see Attention)."""
        h = self.attn(self.attn_norm(x), cos, sin, cache, layer, queries)
        if h.shape[1] != x.shape[1]:
            x = x[:, -h.shape[1]:]
        x = x + h
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    """Decoder-only language model. ``forward(input_ids) -> logits [B, S, vocab]``."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        if not isinstance(cfg, TransformerConfig):
            raise TypeError(f"Transformer expects a TransformerConfig, got {type(cfg).__name__}")
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        """Normal(0, std) weights, output projections scaled down by sqrt(2·layers)."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, std=std / math.sqrt(2 * self.config.n_layers))
            else:
                nn.init.normal_(p, std=std)

    def _check_ids(self, input_ids: Tensor, past: int) -> None:
        if not isinstance(input_ids, Tensor) or input_ids.dtype not in (torch.int32, torch.int64):
            raise TypeError("input_ids must be an int64 (or int32) tensor of token ids")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        if past + input_ids.shape[1] > self.config.max_seq_len:
            raise ValueError(
                f"sequence length {past + input_ids.shape[1]} exceeds "
                f"max_seq_len={self.config.max_seq_len}"
            )

    def forward(self, input_ids: Tensor, cache: KVCache | None = None,
                logits_to_keep: int = 0) -> Tensor:
        """Logits ``[B, S, vocab]``; with ``logits_to_keep = n > 0`` only those of the last n
        positions (``[B, n, vocab]``), skipping the head for the others (as HF models do) and
        the last layer's queries, attention outputs and MLP for them (its keys/values are
        still computed for every position)."""
        if logits_to_keep < 0:
            raise ValueError(f"logits_to_keep must be >= 0, got {logits_to_keep}")
        past = cache.length if cache is not None else 0
        self._check_ids(input_ids, past)
        s = input_ids.shape[1]
        cos, sin = self.rope_cos[past:past + s], self.rope_sin[past:past + s]
        x = self.embed(input_ids)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache, i, logits_to_keep if i == last else 0)
        if cache is not None:
            cache.length += s
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        return self.lm_head(self.norm(x))

    def loss(self, input_ids: Tensor) -> Tensor:
        """Next-token cross-entropy over the sequence."""
        logits = self(input_ids[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1).float(), input_ids[:, 1:].flatten())

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        p = self.embed.weight
        return KVCache(self.config.n_layers, batch, self.config.kv_heads,
                       max_len or self.config.max_seq_len, self.config.head_dim, p.dtype, p.device)

    @torch.no_grad()
    def generate(self, input_ids: Tensor, max_new_tokens: int, use_cache: bool = True) -> Tensor:
        """Greedy decoding; returns ``[B, S + max_new_tokens]`` (prompt included)."""
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        self._check_ids(input_ids, max_new_tokens)
        tokens = input_ids
        if not use_cache:
            for _ in range(max_new_tokens):
                nxt = self(tokens)[:, -1].argmax(-1, keepdim=True)
                tokens = torch.cat([tokens, nxt], dim=1)
            return tokens
        cache = self.new_cache(input_ids.shape[0], input_ids.shape[1] + max_new_tokens)
        step = input_ids
        for _ in range(max_new_tokens):
            nxt = self(step, cache)[:, -1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, nxt], dim=1)
            step = nxt
        return tokens
