"""The u-μP transformer: the reference transformer's structure with unit-scaled ops.

Same layout as `aa_compile.models.transformer` (pre-norm blocks, RoPE, grouped-query causal
attention, SwiGLU), with the u-μP changes: N(0,1) weights, non-affine RMSNorm, `UnitScaledLinear`
for every projection, a ``1/fan_in`` readout, τ-weighted residual adds, μP ``mult/d_head``
attention logits and the unit-scaled cross-entropy. `umup_param_groups` gives Adam the
per-parameter learning rates of the u-μP rules.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor, nn

from ..transformer import apply_rope, rope_tables
from .functional import (
    residual_add,
    residual_split,
    residual_taus,
    rms_norm,
    scaled,
    unit_attention,
    unit_cross_entropy,
    unit_embedding,
    unit_linear,
    unit_silu_glu,
)

MULTS = ("attn_mult", "act_mult", "residual_mult", "residual_attn_ratio", "loss_mult")


@dataclasses.dataclass(frozen=True)
class UmupConfig:
    """Shape and the five u-μP ``mult`` hyper-parameters (all 1.0 by default, as in the notes):
    ``attn_mult`` (α_attn-softmax), ``act_mult`` (α_ffn-act), ``residual_mult`` (α_res),
    ``residual_attn_ratio`` (α_res-attn-ratio), ``loss_mult`` (α_loss-softmax).
    ``vocab_size`` defaults to 256: byte-level tokens. ``d_ff`` defaults to the Llama rule."""

    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int | None = None
    d_ff: int | None = None
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    attn_mult: float = 1.0
    act_mult: float = 1.0
    residual_mult: float = 1.0
    residual_attn_ratio: float = 1.0
    loss_mult: float = 1.0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"UmupConfig.{name} must be a positive int, got {value!r}")
        if self.vocab_size < 2:
            raise ValueError(f"UmupConfig.vocab_size must be >= 2 (the loss rule divides by "
                             f"√(V-1)), got {self.vocab_size}")
        if self.d_model % self.n_heads:
            raise ValueError(f"UmupConfig: d_model={self.d_model} must be divisible by "
                             f"n_heads={self.n_heads}")
        if self.head_dim % 2:
            raise ValueError(f"UmupConfig: head_dim={self.head_dim} must be even for RoPE")
        kv = self.kv_heads
        if not isinstance(kv, int) or kv <= 0 or self.n_heads % kv:
            raise ValueError(f"UmupConfig: n_heads={self.n_heads} must be a multiple of "
                             f"n_kv_heads={kv}")
        if self.d_ff is not None and (not isinstance(self.d_ff, int) or self.d_ff <= 0):
            raise ValueError(f"UmupConfig.d_ff must be a positive int or None, got {self.d_ff!r}")
        if not self.norm_eps > 0:
            raise ValueError(f"UmupConfig.norm_eps must be > 0, got {self.norm_eps}")
        for name in MULTS:
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"UmupConfig.{name} must be a finite number > 0, got {value!r}")

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


class UnitScaledLinear(nn.Module):
    """Bias-free linear layer with an N(0,1) weight ``[out, in]`` and the u-μP scales.

    ``readout=False``: the hidden rule (fwd ``in^-1/2``, grad_input ``in^-1/2``, grad_weight
    ``tokens^-1/2``), ``mup_type = "weight"``. ``readout=True``: the output head (fwd ``1/in``,
    grad_input ``out^-1/2``, grad_weight ``tokens^-1/2``), ``mup_type = "output"``.
    See `functional.unit_linear` for the graph pattern (one ``F.linear`` between three
    ``scaled`` autograd Functions; dynamo's ``node.meta["nn_module_stack"]`` names this class).
    """

    def __init__(self, in_features: int, out_features: int, readout: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features, self.readout = in_features, out_features, readout
        self.mup_type = "output" if readout else "weight"
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        return unit_linear(x, self.weight, self.readout)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, readout={self.readout}"


class UnitScaledEmbedding(nn.Module):
    """N(0,1) table ``[vocab, d]``; `functional.unit_embedding`. ``mup_type = "embedding"``."""

    def __init__(self, vocab_size: int, dim: int) -> None:
        super().__init__()
        self.mup_type = "embedding"
        self.weight = nn.Parameter(torch.empty(vocab_size, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight)

    def forward(self, ids: Tensor) -> Tensor:
        return unit_embedding(ids, self.weight)


class UnitRMSNorm(nn.Module):
    """Non-affine RMSNorm (no parameters; `functional.rms_norm`)."""

    def __init__(self, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.eps)


class UmupAttention(nn.Module):
    def __init__(self, cfg: UmupConfig) -> None:
        super().__init__()
        self.n_heads, self.kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.mult = cfg.attn_mult
        self.q_proj = UnitScaledLinear(cfg.d_model, cfg.n_heads * cfg.head_dim)
        self.k_proj = UnitScaledLinear(cfg.d_model, cfg.kv_heads * cfg.head_dim)
        self.v_proj = UnitScaledLinear(cfg.d_model, cfg.kv_heads * cfg.head_dim)
        self.o_proj = UnitScaledLinear(cfg.n_heads * cfg.head_dim, cfg.d_model)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.kv_heads != self.n_heads:
            # GQA: each k/v head feeds `repeat` query heads, so its gradient is a sum of
            # `repeat` terms; the `add` rule's (broadcast factor)^-1/2 keeps it unit.
            repeat = self.n_heads // self.kv_heads
            k = scaled(k, 1.0, repeat ** -0.5).repeat_interleave(repeat, dim=1)
            v = scaled(v, 1.0, repeat ** -0.5).repeat_interleave(repeat, dim=1)
        out = unit_attention(q, k, v, self.mult)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class UmupMLP(nn.Module):
    """SwiGLU: ``down(silu_glu(up(x), gate(x)))`` with the unit-scaled ``silu_glu``."""

    def __init__(self, cfg: UmupConfig) -> None:
        super().__init__()
        self.mult = cfg.act_mult
        self.gate_proj = UnitScaledLinear(cfg.d_model, cfg.ffn_dim)
        self.up_proj = UnitScaledLinear(cfg.d_model, cfg.ffn_dim)
        self.down_proj = UnitScaledLinear(cfg.ffn_dim, cfg.d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(unit_silu_glu(self.up_proj(x), self.gate_proj(x), self.mult))


class UmupBlock(nn.Module):
    """Pre-norm block: two residual branches with their τ (``residual_taus``)."""

    def __init__(self, cfg: UmupConfig, tau_attn: float, tau_mlp: float) -> None:
        super().__init__()
        self.tau_attn, self.tau_mlp = tau_attn, tau_mlp
        self.attn_norm = UnitRMSNorm(cfg.norm_eps)
        self.attn = UmupAttention(cfg)
        self.mlp_norm = UnitRMSNorm(cfg.norm_eps)
        self.mlp = UmupMLP(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        branch, skip = residual_split(x, self.tau_attn)
        x = residual_add(self.attn(self.attn_norm(branch), cos, sin), skip, self.tau_attn)
        branch, skip = residual_split(x, self.tau_mlp)
        return residual_add(self.mlp(self.mlp_norm(branch)), skip, self.tau_mlp)


class UmupTransformer(nn.Module):
    """u-μP decoder-only LM. ``forward(input_ids) -> logits [B, S, vocab]``; `loss`."""

    def __init__(self, cfg: UmupConfig) -> None:
        super().__init__()
        if not isinstance(cfg, UmupConfig):
            raise TypeError(f"UmupTransformer expects a UmupConfig, got {type(cfg).__name__}")
        self.config = cfg
        taus = residual_taus(cfg.n_layers, cfg.residual_mult, cfg.residual_attn_ratio)
        self.embed = UnitScaledEmbedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(UmupBlock(cfg, taus[2 * i], taus[2 * i + 1])
                                    for i in range(cfg.n_layers))
        self.norm = UnitRMSNorm(cfg.norm_eps)
        self.lm_head = UnitScaledLinear(cfg.d_model, cfg.vocab_size, readout=True)
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def reset_parameters(self) -> None:
        """N(0,1) for every weight (u-μP has no σ_init hyper-parameter)."""
        for module in self.modules():
            if isinstance(module, (UnitScaledLinear, UnitScaledEmbedding)):
                module.reset_parameters()

    def _check_ids(self, input_ids: Tensor) -> None:
        if not isinstance(input_ids, Tensor) or input_ids.dtype not in (torch.int32, torch.int64):
            raise TypeError("input_ids must be an int64 (or int32) tensor of token ids")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        if input_ids.shape[1] > self.config.max_seq_len:
            raise ValueError(f"sequence length {input_ids.shape[1]} exceeds "
                             f"max_seq_len={self.config.max_seq_len}")

    def forward(self, input_ids: Tensor) -> Tensor:
        self._check_ids(input_ids)
        s = input_ids.shape[1]
        cos, sin = self.rope_cos[:s], self.rope_sin[:s]
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.norm(x))

    def loss(self, input_ids: Tensor) -> Tensor:
        """Next-token unit-scaled cross-entropy (value: mean nats per token)."""
        logits = self(input_ids[:, :-1])
        return unit_cross_entropy(logits.flatten(0, 1), input_ids[:, 1:].flatten(),
                                  self.config.loss_mult)

    @torch.no_grad()
    def generate(self, input_ids: Tensor, max_new_tokens: int) -> Tensor:
        """Greedy decoding without a cache; returns ``[B, S + max_new_tokens]``."""
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        tokens = input_ids
        for _ in range(max_new_tokens):
            window = tokens[:, -self.config.max_seq_len:]
            tokens = torch.cat([tokens, self(window)[:, -1].argmax(-1, keepdim=True)], dim=1)
        return tokens


def umup_lr_scale(module: nn.Module, param: Tensor, depth: int | None) -> float:
    """The u-μP Adam learning-rate multiplier of one parameter (notes §3.3).

    ``weight`` (hidden linear): ``fan_in^-1/2`` (``fan_in = shape[1]``); ``embedding``: the same
    formula on ``[vocab, d]``, i.e. ``d^-1/2`` (the paper's 1/√fan-out embedding rule);
    ``output`` (readout): 1. Times ``depth^-1/2`` for parameters in the residual blocks
    (``depth`` = number of blocks; ``None`` outside them).
    """
    mup_type = getattr(module, "mup_type", None)
    if mup_type in ("weight", "embedding"):
        scale = param.shape[1] ** -0.5
    elif mup_type == "output":
        scale = 1.0
    else:
        raise ValueError(f"{type(module).__name__} has no u-μP parameter type (mup_type); "
                         "use UnitScaledLinear / UnitScaledEmbedding")
    return scale * (depth ** -0.5 if depth is not None else 1.0)


def umup_param_groups(model: UmupTransformer, lr: float, weight_decay: float = 0.0,
                      independent_weight_decay: bool = True) -> list[dict]:
    """One torch.optim param group per parameter: ``lr = lr · umup_lr_scale(...)``.

    ``lr`` is the global η (u-μP's optimum is O(1)). With ``independent_weight_decay`` the
    group's weight decay is ``weight_decay / group_lr``, so AdamW decays every weight by
    ``weight_decay`` per step (times the schedule), whatever its learning rate. Each group also
    carries ``name``, ``mup_type`` and ``lr_scale`` for inspection.
    """
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    depth = len(model.layers)
    in_blocks = {id(p) for p in model.layers.parameters()}
    groups = []
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            scale = umup_lr_scale(module, p, depth if id(p) in in_blocks else None)
            group_lr = lr * scale
            wd = weight_decay / group_lr if independent_weight_decay else weight_decay
            groups.append({"params": [p], "lr": group_lr, "weight_decay": wd,
                           "name": f"{mod_name}.{p_name}" if mod_name else p_name,
                           "mup_type": module.mup_type, "lr_scale": scale})
    return groups
