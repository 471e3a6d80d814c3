"""HAT's layers, plainly: masked byte attention, latent-query word pooling, the guide vector.

These are the numerics the fused kernels must match:

- `sliding_window_mask` + `ByteBlock`: dense SDPA with an explicit boolean ``[T, T]`` mask
  (``aa::window_attention``);
- `WordPooling`: one latent query per word over the word's own bytes, padded to
  ``[W, L]`` with a key mask (``aa::word_pool``); with RoPE, the keys are rotated before the
  gather, so the query stays one vector for every word;
- `GuideVector`: ``o_proj(v_proj(kv_norm(pred)))`` gathered to every byte of the word and added
  (``aa::guide_add``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aa_compile.models.transformer import (
    Attention,
    RMSNorm,
    SwiGLU,
    TransformerConfig,
    apply_rope,
)

from .rope import rope_at


def sliding_window_mask(byte_doc: Tensor, byte_pos: Tensor, window: int) -> Tensor:
    """``[T, T]`` bool, True = query i may attend key j: same document and
    ``pos[i] - window < pos[j] <= pos[i]`` (``window`` keys, itself included; flash-attn's
    ``window_size=(window - 1, 0)``). Every row has at least its diagonal."""
    same_doc = byte_doc[:, None] == byte_doc[None, :]
    distance = byte_pos[:, None] - byte_pos[None, :]
    return same_doc & (distance >= 0) & (distance < window)


def document_window_mask(byte_doc_offsets: Tensor, n_bytes: int, window: int) -> Tensor:
    """`sliding_window_mask` of a packed stream given by its ``[D + 1]`` document byte offsets
    (``ByteBatch.byte_doc_offsets``): each byte's document and position are derived here, in
    the forward, so a compiler sees the mask as a function of the offsets alone."""
    t = torch.arange(n_bytes, device=byte_doc_offsets.device)
    byte_doc = torch.searchsorted(byte_doc_offsets[1:], t, right=True)
    return sliding_window_mask(byte_doc, t - byte_doc_offsets[byte_doc], window)


def byte_words(word_offsets: Tensor, n_bytes: int) -> Tensor:
    """``ByteBatch.byte_word`` (``[T]``, the word of each byte) from ``word_offsets``, computed
    in the forward."""
    t = torch.arange(n_bytes, device=word_offsets.device)
    return torch.searchsorted(word_offsets[1:], t, right=True)


def word_grid(word_offsets: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """``ByteBatch.word_bytes`` and ``word_mask`` (``[W, width]``) from ``word_offsets``, computed
    in the forward: word w's byte indices ``word_offsets[w] + arange(width)``, masked to its
    length, padded with 0."""
    cols = torch.arange(width, device=word_offsets.device)
    mask = cols < word_offsets.diff()[:, None]
    return torch.where(mask, word_offsets[:-1, None] + cols, 0), mask


class MaskedAttention(Attention):
    """The reference `Attention` (same projections, GQA, RoPE) with an explicit mask."""

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor) -> Tensor:
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.kv_heads != self.n_heads:
            repeat = self.n_heads // self.kv_heads
            k = k.repeat_interleave(repeat, dim=1)
            v = v.repeat_interleave(repeat, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class ByteBlock(nn.Module):
    """Llama block (pre-norm attention + SwiGLU) over the packed byte stream ``[1, T, d]``."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = MaskedAttention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor) -> Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, mask)
        return x + self.mlp(self.mlp_norm(x))


class ByteEncoder(nn.Module):
    """``Embedding(256, d)`` + byte blocks; no final norm (the outputs feed pooling and the
    decoder directly)."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(ByteBlock(cfg) for _ in range(cfg.n_layers))

    def forward(self, data: Tensor, cos: Tensor, sin: Tensor, mask: Tensor) -> Tensor:
        x = self.embed(data)[None]
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        return x[0]


def rotate_rows(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """`apply_rope` for ``x [n, H, hd]`` with one angle row per ``n`` (``cos/sin [n, hd/2]``):
    rotate-half pairs, computed in float32 (float64 for a float64 ``x``), cast back."""
    x1, x2 = x.to(torch.promote_types(x.dtype, torch.float32)).chunk(2, dim=-1)
    cos, sin = cos[:, None], sin[:, None]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


class WordPooling(nn.Module):
    """Word embedding = multi-head cross-attention of one learned latent query (d_backbone)
    over the word's own byte activations (d_enc), non-causal, then ``o_proj``. No residual, no
    MLP.

    RoPE (``rope_theta`` set; ``HATConfig.pool_rope``): the released models rotate the query
    at the word's position w and each key at its byte's position b, so a score is
    ``q . R(b - w) k`` (rotations compose). We rotate only the keys, by ``b - w`` (``key_pos``,
    given to `forward`), which is the same score with one query for every word: the pooling
    keeps its shape, and ``aa::word_pool`` still applies. Without RoPE a score does not depend
    on where the word sits in the document (our default for models trained here).
    """

    def __init__(self, d_enc: int, d_model: int, n_heads: int, qk_norm: bool,
                 eps: float = 1e-6, rope_theta: float | None = None) -> None:
        super().__init__()
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.rope_theta = rope_theta
        self.latent_query = nn.Parameter(torch.empty(d_model))
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_proj = nn.Linear(d_enc, d_model, bias=False)
        self.v_proj = nn.Linear(d_enc, d_model, bias=False)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)
        self.q_norm = RMSNorm(self.head_dim, eps) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim, eps) if qk_norm else nn.Identity()

    def forward(self, h: Tensor, word_bytes: Tensor, word_mask: Tensor,
                key_pos: Tensor | None = None) -> Tensor:
        """``h [T, d_enc]``, ``word_bytes/word_mask [W, L]`` -> ``[W, d_model]``. With RoPE,
        ``key_pos [T]``: each byte's position minus its word's position (in the document)."""
        if (key_pos is None) != (self.rope_theta is None):
            raise ValueError("WordPooling: key_pos must be given exactly when the pooling has "
                             f"RoPE (rope_theta={self.rope_theta})")
        n_words, n_bytes = word_bytes.shape[0], h.shape[0]
        q = self.q_norm(self.q_proj(self.latent_query).view(self.n_heads, self.head_dim))
        q = q[None, :, None, :].expand(n_words, -1, -1, -1)  # [W, H, 1, hd]
        # project every byte once, then gather the padded [W, L, H, hd] grid (the same rows as
        # projecting h[word_bytes]: the projections and the per-head norm act row by row)
        k = self.k_norm(self.k_proj(h).view(n_bytes, self.n_heads, self.head_dim))
        if self.rope_theta is not None:
            k = rotate_rows(k, *rope_at(key_pos, self.head_dim, self.rope_theta))
        k = k[word_bytes]
        v = self.v_proj(h).view(n_bytes, self.n_heads, self.head_dim)[word_bytes]
        out = F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=word_mask[:, None, None, :])
        return self.o_proj(out.reshape(n_words, -1))


class GuideVector(nn.Module):
    """The decoder's cross-attention from each byte to its word's predictive embedding.

    There is exactly one key per byte, so the softmax is 1 and the query side (q_proj, k_proj,
    query norm of the released model) has no effect: the output is
    ``o_proj(v_proj(kv_norm(pred_w)))`` for every byte of word w. We keep only what matters.
    """

    def __init__(self, d_backbone: int, cfg: TransformerConfig) -> None:
        super().__init__()
        self.n_heads, self.kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.kv_norm = RMSNorm(d_backbone, cfg.norm_eps)
        self.v_proj = nn.Linear(d_backbone, cfg.kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)

    def forward(self, pred: Tensor) -> Tensor:
        """``pred [W, d_backbone]`` -> one guide vector per word ``[W, d_dec]``."""
        v = self.v_proj(self.kv_norm(pred)).view(-1, self.kv_heads, self.head_dim)
        v = v.repeat_interleave(self.n_heads // self.kv_heads, dim=1)  # GQA: head h reads h//r
        return self.o_proj(v.flatten(1))


class ByteDecoder(nn.Module):
    """Guide add (first layer, or every layer) + byte blocks, final RMSNorm, ``Linear(d, 256)``."""

    def __init__(self, d_backbone: int, cfg: TransformerConfig, every_layer: bool) -> None:
        super().__init__()
        n_guides = cfg.n_layers if every_layer else 1
        self.guides = nn.ModuleList(GuideVector(d_backbone, cfg) for _ in range(n_guides))
        self.layers = nn.ModuleList(ByteBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def forward(self, h: Tensor, pred: Tensor, byte_word: Tensor, cos: Tensor, sin: Tensor,
                mask: Tensor) -> Tensor:
        """``h [T, d]`` encoder output, ``pred [W, d_backbone]`` -> logits ``[T, 256]``."""
        x = h[None]
        for i, layer in enumerate(self.layers):
            if i < len(self.guides):
                x = x + self.guides[i](pred)[byte_word]
            x = layer(x, cos, sin, mask)
        return self.lm_head(self.norm(x[0]))
