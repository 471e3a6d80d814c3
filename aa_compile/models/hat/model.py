"""`HATModel`: the Hierarchical Autoregressive Transformer reference (arXiv 2501.10322).

Data flow over a packed `ByteBatch` (T bytes, W words, D documents):

1. encoder: ``Embedding(256, d_enc)`` + byte blocks with causal sliding-window attention over
   each document's byte stream (RoPE at the byte's position in its document) -> ``h [T, d_enc]``;
2. pooling: one latent query per word attends to the word's bytes -> ``words [W, d_bb]``
   (with ``pool_rope``, RoPE as in the released models: query at the word's position, keys at
   the bytes' positions);
3. backbone: reference transformer `Block`s, causal over each document's words (padded to
   ``[D, M, d_bb]``, RoPE at word positions, Llama-3 scaled with ``backbone_rope_scaling``;
   no embedding, norm or head);
4. decoder connector: ``pred[w] = backbone_out[w - 1]`` within a document, ``pred[first word]
   = first_word`` (a learned vector);
5. decoder: ``h`` + guide vector of the byte's word, byte blocks (same mask as the encoder),
   RMSNorm, ``Linear(d_enc, 256)`` -> logits ``[T, 256]``.

Which byte predicts which: the logits at byte t predict byte t + 1 of the same document (the
last byte of a document predicts nothing). Byte t of word w sees bytes <= t (encoder and
decoder are causal) and words < w (through ``pred[w]``), never its own word's pooled vector, so
the last byte of word w predicts the first byte of word w + 1 from backbone(words <= w - 1).

Generation (`HATModel.generate_bytes`) is greedy, byte by byte, with words ended by the
splitter. By default it runs on the three KV caches of `generate.HATCache`; ``use_cache=False``
recomputes this forward for every byte instead (the reference the cached path is tested
against).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aa_compile.models.transformer import Block

from .batch import IGNORE, ByteBatch
from .config import HATConfig
from .generate import HATCache
from .modules import (
    ByteDecoder,
    ByteEncoder,
    WordPooling,
    byte_words,
    document_window_mask,
    rope_at,
    word_grid,
)
from .pretrained import load_hat_pretrained, save_hat_pretrained
from .splitter import HATByteSplitter


class HATModel(nn.Module):
    """Byte encoder -> word pooling -> word backbone -> guide vectors -> byte decoder."""

    def __init__(self, cfg: HATConfig) -> None:
        super().__init__()
        if not isinstance(cfg, HATConfig):
            raise TypeError(f"HATModel expects a HATConfig, got {type(cfg).__name__}")
        self.config = cfg
        self.encoder = ByteEncoder(cfg.encoder)
        self.pooling = WordPooling(cfg.d_enc, cfg.d_backbone, cfg.pool_heads, cfg.pool_qk_norm,
                                   cfg.backbone.norm_eps,
                                   cfg.encoder.rope_theta if cfg.pool_rope else None)
        self.backbone = nn.ModuleList(Block(cfg.backbone) for _ in range(cfg.backbone.n_layers))
        self.first_word = nn.Parameter(torch.empty(cfg.d_backbone))
        self.decoder = ByteDecoder(cfg.d_backbone, cfg.decoder, cfg.guide_every_layer)
        self.splitter = HATByteSplitter(cfg.max_word_bytes, {"<|eot_id|>": cfg.eos_byte})
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        """Normal(0, std); norms at 1; each stack's output projections (``o_proj``,
        ``down_proj`` inside its blocks) scaled down by sqrt(2 · that stack's layers)."""
        layers = {"encoder": self.config.encoder.n_layers,
                  "backbone": self.config.backbone.n_layers,
                  "decoder": self.config.decoder.n_layers}
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(("attn.o_proj.weight", "down_proj.weight")):  # inside blocks
                nn.init.normal_(p, std=std / math.sqrt(2 * layers[name.split(".")[0]]))
            else:
                nn.init.normal_(p, std=std)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | str | None = None,
                        device: torch.device | str = "cpu") -> HATModel:
        """A released Aleph Alpha HAT checkpoint (Hugging Face layout: config.json +
        model.safetensors or a sharded index), strictly mapped, built on the meta device and
        filled from memory-mapped files; see `aa_compile.models.hat.pretrained` and
        docs/checkpoints.md (the model gets ``pool_rope`` and the backbone's RoPE scaling of
        the released forward)."""
        return load_hat_pretrained(cls, path, dtype=dtype, device=device)

    def save_pretrained(self, path: str | Path, max_shard_bytes: int | None = None
                        ) -> list[Path]:
        """Write this model in the released Hugging Face layout (load -> save is bit-exact);
        ``max_shard_bytes`` shards the weights with a ``model.safetensors.index.json``."""
        return save_hat_pretrained(self, path, max_shard_bytes)

    def num_parameters(self) -> dict[str, int]:
        """Parameter counts per part and in total."""
        parts = {name: sum(p.numel() for p in module.parameters())
                 for name, module in (("encoder", self.encoder), ("pooling", self.pooling),
                                      ("backbone", self.backbone), ("decoder", self.decoder))}
        parts["first_word"] = self.first_word.numel()
        parts["total"] = sum(parts.values())
        return parts

    # -- forward ----------------------------------------------------------------------------

    def forward(self, batch: ByteBatch) -> Tensor:
        """Byte logits ``[T, 256]`` of a packed batch."""
        if not isinstance(batch, ByteBatch):
            raise TypeError(f"HATModel takes a ByteBatch (HATByteSplitter.encode), got "
                            f"{type(batch).__name__}")
        if batch.n_bytes == 0:
            raise ValueError("the batch has no bytes: there is nothing to predict from")
        cfg = self.config
        # the mask, the word grid and each byte's word are computed here from the CSR offsets
        # (equal to the batch's byte_doc/byte_pos, word_bytes/word_mask and byte_word), so that
        # a compiled forward shows them as functions of the offsets (the aa passes prove that
        # by evaluation before they hand the offsets to their ops)
        mask = document_window_mask(batch.byte_doc_offsets, batch.n_bytes, cfg.sliding_window)
        cos, sin = rope_at(batch.byte_pos, cfg.encoder.head_dim, cfg.encoder.rope_theta)
        h = self.encoder(batch.bytes, cos, sin, mask)
        byte_word = byte_words(batch.word_offsets, batch.n_bytes)
        # pooling RoPE: each key turns by its byte's position minus its word's (WordPooling)
        key_pos = batch.byte_pos - batch.word_pos[byte_word] if cfg.pool_rope else None
        words = self.pooling(h, *word_grid(batch.word_offsets, batch.word_bytes.shape[1]),
                             key_pos)
        pred = self.predict_words(words, batch)
        cos, sin = rope_at(batch.byte_pos, cfg.decoder.head_dim, cfg.decoder.rope_theta)
        return self.decoder(h, pred, byte_word, cos, sin, mask)

    def predict_words(self, words: Tensor, batch: ByteBatch) -> Tensor:
        """Backbone over each document's words, shifted right by one word: ``[W, d_bb]``.
        Documents are padded at the end to ``[D, M]``; causal attention keeps real words from
        seeing the padding, so its content (word 0's vector) does not matter."""
        x = words[batch.doc_words]
        n_docs, width, d = x.shape
        positions = torch.arange(width, device=x.device)
        cos, sin = rope_at(positions, self.config.backbone.head_dim,
                           self.config.backbone.rope_theta, self.config.backbone_rope_scaling)
        for block in self.backbone:
            x = block(x, cos, sin)
        first = self.first_word.to(x.dtype).expand(n_docs, 1, d)
        shifted = torch.cat([first, x[:, :-1]], dim=1)
        return shifted[batch.word_doc, batch.word_pos]

    def loss(self, batch: ByteBatch) -> Tensor:
        """Mean next-byte cross-entropy over ``batch.targets`` (byte t predicts byte t + 1 of
        the same document); 0 when no byte has a successor."""
        logits = self(batch).float()
        total = F.cross_entropy(logits, batch.targets, ignore_index=IGNORE, reduction="sum")
        return total / (batch.targets != IGNORE).sum().clamp(min=1)

    # -- generation -------------------------------------------------------------------------

    @torch.no_grad()
    def generate_bytes(self, prompt: str, max_bytes: int = 256, max_words: int | None = None,
                       use_cache: bool = True) -> tuple[bytes, list[bytes]]:
        """Greedy generation; returns the new bytes and the final words (prompt included).

        One byte per step, the argmax of the next-byte logits. The new byte is appended with
        the splitter's rule (`HATByteSplitter.append_byte`): when ``last word + byte``
        re-splits into several words, every piece but the last is finished (it is pooled and
        goes through the backbone, whose output becomes the next word's guide vector) and the
        last piece is the word now being written. Stops at ``eos_byte`` (not returned), after
        ``max_bytes`` new bytes, or before the ``max_words + 1``-th new word begins.

        ``use_cache=True`` (default) decodes with the three caches of `HATCache` (byte
        encoder, word backbone and byte decoder KV caches; the prompt is one batched prefill,
        then each byte costs one encoder step, a backbone step when words finish, and a
        decoder step over the bytes whose word is new; see `aa_compile.models.hat.generate`).
        ``use_cache=False`` is the reference: the whole model runs again on the prompt + the
        bytes so far, so each step's logits are exactly those of a teacher-forced `forward`
        on the same words. Both give the same logits up to float rounding.
        """
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        for name, value in (("max_bytes", max_bytes), ("max_words", max_words)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 0):
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if not isinstance(use_cache, bool):
            raise TypeError(f"use_cache must be a bool, got {use_cache!r}")
        words = self.splitter.words(prompt)
        if not words:
            raise ValueError("prompt must contain at least one byte: the first byte of a "
                             "document is never predicted")
        device = self.first_word.device
        cache = HATCache(self, words) if use_cache else None
        out, new_words = bytearray(), 0
        while len(out) < max_bytes:
            if cache is not None:
                logits = cache.logits()
            else:
                logits = self(ByteBatch.from_words([words]).to(device))[-1]
            byte = int(logits.argmax())
            if byte == self.config.eos_byte:
                break
            pieces = self.splitter.append_byte(words[-1], byte)
            if max_words is not None and new_words + len(pieces) - 1 > max_words:
                break
            new_words += len(pieces) - 1
            if cache is not None:
                cache.append_byte(byte, pieces)
            words[-1:] = pieces
            out.append(byte)
        return bytes(out), words

    def generate(self, prompt: str, max_bytes: int = 256, max_words: int | None = None,
                 use_cache: bool = True) -> str:
        """The text greedily generated after ``prompt`` (see `generate_bytes`), decoded with
        `HATByteSplitter.decode` (invalid UTF-8 becomes U+FFFD)."""
        data, _ = self.generate_bytes(prompt, max_bytes, max_words, use_cache)
        return self.splitter.decode(data)
