"""Cached HAT decoding: `HATCache` keeps the three KV caches of one document being generated.

`HATModel.forward` recomputes every byte of every word; `HATCache` computes each piece of work
once and keeps what later bytes need:

- **encoder**: a `ByteWindowCache` with each encoder layer's keys/values (after RoPE at the
  byte's position in the document) of the last ``sliding_window - 1`` bytes, which is all a
  new byte's causal sliding-window attention reads. Bytes are only ever appended, so the
  encoder never recomputes anything. The encoder outputs ``h`` are kept from the first byte of
  the last (unfinished) word on: pooling and the decoder read them.
- **backbone**: the reference transformer's `KVCache` over finished words (every word but the
  last). When the splitter finishes words, they are pooled from their bytes' ``h`` (with
  ``pool_rope``, keys turned by byte position minus word position, as in `HATModel.forward`)
  and run through the backbone as one step; the output of the last of them is the predictive vector
  (``pred``) of the word that follows. Finished words never change again (the splitter only
  re-splits the last word), so this cache only grows.
- **decoder**: a `ByteWindowCache` of each decoder layer's keys/values. A byte's decoder input
  is ``h`` plus the guide vector of *its word*, so these entries are valid only while the
  byte's word assignment stands. `HATByteSplitter.append_byte` can move bytes of the last word
  into a new word: an unfinished UTF-8 character at the end of a word (``"日本"``: the first
  bytes of ``本`` sit in the word ``"日..."`` until the character completes and becomes its
  own word), a character that passes ``max_word_bytes``, and in general any re-split of
  ``last word + byte`` into pieces whose first piece is shorter than the old word. The cache is
  then truncated back to the first byte whose word changed, and the decoder runs again from
  there with the new guide vectors. Entries are kept from ``sliding_window - 1`` bytes before
  the last word's start, which is as far back as such a rewind can need.

Work is done lazily: `HATCache.append_byte` only records the byte and the new words;
`HATCache.logits` runs the encoder on the new bytes, the backbone on newly finished words and
the decoder from the first stale byte, and returns the logits of the next byte. The first call
is the prefill: all prompt bytes and words in one batched pass (in chunks of `PREFILL_CHUNK`
bytes, so no ``[T, T]`` mask is built for long prompts).

The numbers equal a teacher-forced `HATModel.forward` on the same words up to float rounding
(different but equivalent attention shapes), not bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from aa_compile.models.transformer import KVCache, apply_rope

from .modules import ByteBlock, MaskedAttention, rope_at, word_grid

#: bytes per batched pass of the prefill (queries ``[C]`` x keys ``[C + window - 1]``)
PREFILL_CHUNK = 2048


class ByteWindowCache:
    """Keys and values (after RoPE; ``kv_heads`` heads, not repeated for GQA) of every layer of
    a byte stack, for the byte positions ``[start, end)`` of one document.

    ``end`` grows by `commit` after each layer wrote its new entries with `write`; `truncate`
    moves ``end`` back (a rewind); `forget_before` moves ``start`` forward (entries no query
    will read again). Storage is one ``[kv_heads, capacity, head_dim]`` buffer per layer and
    tensor; kept entries are moved to the front when the buffer runs full, and the buffer
    doubles when even that is not enough, so appending costs O(1) amortized; `shrink` gives
    the memory of a long prefill back, so memory stays proportional to what is kept.
    """

    def __init__(self, n_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str, capacity: int = 256) -> None:
        shape = (kv_heads, max(1, capacity), head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.start = self.end = 0
        self._base = 0  # the position stored in buffer slot 0
        self._pending = 0  # entries reserved (and being written) past `end`

    @property
    def capacity(self) -> int:
        return self.k[0].shape[1]

    def __len__(self) -> int:
        """The number of kept positions."""
        return self.end - self.start

    def truncate(self, end: int) -> None:
        """Drop the positions ``>= end``; they must not have been forgotten."""
        if not self.start <= end <= self.end:
            raise RuntimeError(f"cannot truncate the byte cache to {end}: it holds positions "
                               f"[{self.start}, {self.end})")
        self.end = end

    def forget_before(self, position: int) -> None:
        """Let the positions ``< position`` go (they stay readable until overwritten)."""
        self.start = min(max(self.start, position), self.end)

    def reserve(self, n: int) -> None:
        """Make room for ``n`` positions after ``end`` (call once before the layers write)."""
        kept = self.end - self.start
        if self.end + n - self._base > self.capacity:
            capacity = self.capacity
            if kept + n > capacity // 2:
                capacity = max(2 * capacity, 2 * (kept + n))
            self._move(capacity)
        self._pending = n

    def shrink(self, minimum: int = 256) -> None:
        """Give back memory after a long prefill: when the buffers are more than four times
        what is kept (and than ``minimum``), move the kept entries into smaller ones."""
        target = max(minimum, 2 * len(self))
        if self.capacity > 2 * target:
            self._move(target)

    def _move(self, capacity: int) -> None:
        """Kept entries to the front of buffers of ``capacity`` positions."""
        kept, lo = self.end - self.start, self.start - self._base
        for buffers in (self.k, self.v):
            for i, buf in enumerate(buffers):
                live = buf[:, lo:lo + kept].clone()
                if capacity != buf.shape[1]:
                    buf = buffers[i] = buf.new_empty(buf.shape[0], capacity, buf.shape[2])
                buf[:, :kept] = live
        self._base = self.start

    def write(self, layer: int, k: Tensor, v: Tensor, lo: int) -> tuple[Tensor, Tensor]:
        """Store ``k, v`` (``[kv_heads, S, head_dim]``, ``S`` <= the reserved count) at positions
        ``[end, end + S)`` of ``layer``; return its keys and values of positions
        ``[lo, end + S)``."""
        s = k.shape[1]
        if s > self._pending:
            raise RuntimeError(f"write of {s} positions, but only {self._pending} reserved")
        if not self.start <= lo <= self.end:
            raise RuntimeError(f"keys from position {lo} were asked for, but the byte cache "
                               f"holds [{self.start}, {self.end})")
        i = self.end - self._base
        self.k[layer][:, i:i + s] = k
        self.v[layer][:, i:i + s] = v
        a = lo - self._base
        return self.k[layer][:, a:i + s], self.v[layer][:, a:i + s]

    def commit(self, n: int) -> None:
        """The ``n`` positions written to every layer are now part of the cache."""
        if n > self._pending:
            raise RuntimeError(f"commit of {n} positions, but only {self._pending} reserved")
        self.end += n
        self._pending = 0


def window_attention_step(attn: MaskedAttention, x: Tensor, cos: Tensor, sin: Tensor,
                          cache: ByteWindowCache, layer: int, window: int) -> Tensor:
    """`MaskedAttention` of the new bytes ``x [1, S, d]`` at positions ``[cache.end,
    cache.end + S)``, over the cached keys of the last ``window - 1`` bytes before them and
    the new ones (causal sliding window, one document). Writes the new keys/values to
    ``cache`` (the caller commits)."""
    b, s, _ = x.shape
    q = attn.q_proj(x).view(b, s, attn.n_heads, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(b, s, attn.kv_heads, attn.head_dim).transpose(1, 2)
    v = attn.v_proj(x).view(b, s, attn.kv_heads, attn.head_dim).transpose(1, 2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    first = cache.end
    lo = max(0, first - window + 1)
    k, v = cache.write(layer, k[0], v[0], lo)
    k, v = k[None], v[None]
    if attn.kv_heads != attn.n_heads:
        repeat = attn.n_heads // attn.kv_heads
        k = k.repeat_interleave(repeat, dim=1)
        v = v.repeat_interleave(repeat, dim=1)
    mask = None
    if s > 1:  # one query sees exactly the keys [lo, first] (all within its window)
        query = torch.arange(first, first + s, device=x.device)
        distance = query[:, None] - torch.arange(lo, first + s, device=x.device)[None, :]
        mask = (distance >= 0) & (distance < window)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return attn.o_proj(out.transpose(1, 2).reshape(b, s, -1))


def byte_block_step(block: ByteBlock, x: Tensor, cos: Tensor, sin: Tensor,
                    cache: ByteWindowCache, layer: int, window: int) -> Tensor:
    """`ByteBlock.forward` of new bytes with the window cache (see `window_attention_step`)."""
    x = x + window_attention_step(block.attn, block.attn_norm(x), cos, sin, cache, layer,
                                  window)
    return x + block.mlp(block.mlp_norm(x))


class HATCache:
    """The state of one document being decoded by ``model`` (a `HATModel`): its bytes and
    words and the three caches (see the module docstring).

    ``words``: the prompt's words (`HATByteSplitter.words`; at least one). Then alternate
    `logits` (next-byte logits ``[256]`` after the current bytes) and `append_byte`. Every
    word is kept as in the uncached generator (``words[-1:] = pieces``), so ``cache.words``
    is what a teacher-forced forward would be given.
    """

    def __init__(self, model, words: list[bytes]) -> None:
        if not words:
            raise ValueError("words must hold at least one word: the first byte of a document "
                             "is never predicted")
        for i, w in enumerate(words):
            if not isinstance(w, (bytes, bytearray)) or not w:
                raise ValueError(f"words[{i}] must be non-empty bytes, got {w!r}")
        self.model = model
        cfg = model.config
        self.window = cfg.sliding_window
        p = model.first_word
        self.device, self.dtype = p.device, p.dtype
        self.words: list[bytes] = [bytes(w) for w in words]
        self.data = bytearray(b"".join(self.words))
        self.encoder = ByteWindowCache(cfg.encoder.n_layers, cfg.encoder.kv_heads,
                                       cfg.encoder.head_dim, self.dtype, self.device)
        self.decoder = ByteWindowCache(cfg.decoder.n_layers, cfg.decoder.kv_heads,
                                       cfg.decoder.head_dim, self.dtype, self.device)
        self.backbone = self._new_backbone_cache(max(16, 2 * len(self.words)))
        #: bytes the decoder recomputed because the splitter moved them into a new word
        self.rewound_bytes = 0
        #: how many times that happened
        self.rewinds = 0
        # what has been computed: bytes [0, _n) went through encoder and decoder, words
        # [0, _finished) through pooling and the backbone; word `_finished` starts at byte
        # `_word_start`, its predictive vector is `_pred`; `_h` holds the encoder outputs of
        # bytes [_word_start, _n); `_logits` the next-byte logits after byte _n - 1
        self._n = 0
        self._finished = 0
        self._word_start = 0
        self._pred = p.detach()
        self._h = torch.empty(0, cfg.d_enc, dtype=self.dtype, device=self.device)
        self._logits: Tensor | None = None

    def _new_backbone_cache(self, max_len: int) -> KVCache:
        bb = self.model.config.backbone
        return KVCache(bb.n_layers, 1, bb.kv_heads, max_len, bb.head_dim, self.dtype,
                       self.device)

    # -- feeding bytes ------------------------------------------------------------------------

    def append_byte(self, byte: int, pieces: list[bytes] | None = None) -> list[bytes]:
        """Add ``byte`` to the document; the last word becomes ``pieces`` (by default
        ``model.splitter.append_byte(words[-1], byte)``, which must join to ``words[-1] +
        byte``). Returns the pieces; nothing is computed until `logits`."""
        if isinstance(byte, bool) or not isinstance(byte, int) or not 0 <= byte < 256:
            raise ValueError(f"byte must be an int 0..255, got {byte!r}")
        last = self.words[-1]
        if pieces is None:
            pieces = self.model.splitter.append_byte(last, byte)
        if not pieces or not all(pieces) or b"".join(pieces) != last + bytes([byte]):
            raise ValueError(f"pieces {pieces!r} must be non-empty words that join to the last "
                             f"word + the byte ({last + bytes([byte])!r})")
        self.words[-1:] = [bytes(p) for p in pieces]
        self.data.append(byte)
        self._logits = None
        return pieces

    # -- computing ----------------------------------------------------------------------------

    @torch.no_grad()
    def logits(self) -> Tensor:
        """Logits ``[256]`` of the byte after the current ones (computes what is pending)."""
        if self._logits is None:
            self._update()
        return self._logits

    def _update(self) -> None:
        model, n_done, done = self.model, self._n, self._finished
        n_new, finished = len(self.data), len(self.words) - 1
        # byte offsets of words done..finished (the words that are new or may have changed)
        starts = [self._word_start]
        for w in self.words[done:]:
            starts.append(starts[-1] + len(w))
        assert starts[-1] == n_new, "the words no longer cover the bytes"

        # 1. encoder: only the new bytes
        if n_new > n_done:
            h_new = self._encode(n_done, n_new)
            self._h = torch.cat([self._h, h_new]) if len(self._h) else h_new

        # 2. pooling + backbone: the words finished since the last update, as one step
        preds = self._pred[None]
        if finished > done:
            offsets = torch.tensor(starts[:finished - done + 1], device=self.device)
            offsets = offsets - self._word_start  # rows of self._h
            width = int(offsets.diff().max())
            pooled = model.pooling(self._h, *word_grid(offsets, width),
                                   self._key_positions(offsets, done))
            preds = torch.cat([preds, self._backbone_step(pooled, done)])

        # 3. decoder: from the first byte whose word changed (or the first new byte)
        dirty = n_done
        if finished > done and starts[1] < n_done:  # bytes of word `done` moved to later words
            dirty = starts[1]
            self.rewinds += 1
            self.rewound_bytes += n_done - dirty
        self.decoder.truncate(dirty)
        positions = torch.arange(dirty, n_new, device=self.device)
        boundaries = torch.tensor(starts[1:-1], device=self.device, dtype=torch.long)
        byte_word = torch.searchsorted(boundaries, positions, right=True)  # rows of preds
        h = self._h[dirty - self._word_start:]
        self._logits = self._decode(h, preds, byte_word, dirty)

        # 4. bookkeeping; keep only what later steps can read
        self._n, self._finished = n_new, finished
        self._pred = preds[-1]
        keep = starts[-2] - self._word_start
        self._h = self._h[keep:]
        self._word_start = starts[-2]
        self.encoder.forget_before(n_new - self.window + 1)
        self.decoder.forget_before(self._word_start - self.window + 1)
        for cache in (self.encoder, self.decoder):
            cache.shrink()

    def _key_positions(self, offsets: Tensor, first_word: int) -> Tensor | None:
        """Pooling RoPE (``pool_rope``): for each row of ``self._h`` (byte position
        ``_word_start + row``), its position minus that of its word, the words starting at
        rows ``offsets`` being ``first_word, first_word + 1, ...`` (rows past the last offset
        belong to the unfinished word and are not pooled); None without pooling RoPE."""
        if not self.model.config.pool_rope:
            return None
        rows = torch.arange(len(self._h), device=self.device)
        word = first_word + torch.searchsorted(offsets[1:], rows, right=True)
        return self._word_start + rows - word

    def _chunks(self, first: int, end: int):
        for a in range(first, end, PREFILL_CHUNK):
            yield a, min(a + PREFILL_CHUNK, end)

    def _encode(self, first: int, end: int) -> Tensor:
        """Encoder outputs ``[end - first, d_enc]`` of bytes ``[first, end)``."""
        enc, cfg = self.model.encoder, self.model.config.encoder
        out = []
        for a, b in self._chunks(first, end):
            ids = torch.tensor(self.data[a:b], dtype=torch.long, device=self.device)
            cos, sin = rope_at(torch.arange(a, b, device=self.device), cfg.head_dim,
                               cfg.rope_theta)
            self.encoder.reserve(b - a)
            x = enc.embed(ids)[None]
            for i, layer in enumerate(enc.layers):
                x = byte_block_step(layer, x, cos, sin, self.encoder, i, self.window)
            self.encoder.commit(b - a)
            out.append(x[0])
        return out[0] if len(out) == 1 else torch.cat(out)

    def _backbone_step(self, words: Tensor, first: int) -> Tensor:
        """Backbone outputs ``[k, d_bb]`` of pooled words ``[k, d_bb]`` at word positions
        ``first..first + k - 1`` (their predecessors are in the backbone cache)."""
        cache, k = self.backbone, words.shape[0]
        assert cache.length == first
        if first + k > cache.max_len:  # grow: a larger cache with the same entries
            grown = self._new_backbone_cache(max(2 * cache.max_len, first + k))
            for layer in range(len(cache.k)):
                grown.k[layer][:, :, :first] = cache.k[layer][:, :, :first]
                grown.v[layer][:, :, :first] = cache.v[layer][:, :, :first]
            grown.length = first
            self.backbone = cache = grown
        cfg = self.model.config.backbone
        cos, sin = rope_at(torch.arange(first, first + k, device=self.device), cfg.head_dim,
                           cfg.rope_theta, self.model.config.backbone_rope_scaling)
        x = words[None]
        for i, block in enumerate(self.model.backbone):
            x = block(x, cos, sin, cache, i)
        cache.length += k
        return x[0]

    def _decode(self, h: Tensor, preds: Tensor, byte_word: Tensor, first: int) -> Tensor:
        """Decoder over bytes ``first..`` (encoder outputs ``h``, guide vectors of
        ``preds[byte_word]``); the next-byte logits ``[256]`` of the last of them."""
        dec, cfg = self.model.decoder, self.model.config.decoder
        guides = [g(preds) for g in dec.guides]  # [words, d_dec] per guided layer
        x = None
        for a, b in self._chunks(first, first + h.shape[0]):
            rows = slice(a - first, b - first)
            cos, sin = rope_at(torch.arange(a, b, device=self.device), cfg.head_dim,
                               cfg.rope_theta)
            self.decoder.reserve(b - a)
            x = h[rows][None]
            for i, layer in enumerate(dec.layers):
                if i < len(guides):
                    x = x + guides[i][byte_word[rows]]
                x = byte_block_step(layer, x, cos, sin, self.decoder, i, self.window)
            self.decoder.commit(b - a)
        return dec.lm_head(dec.norm(x[0, -1]))


def kv_bytes(cache: HATCache) -> int:
    """Bytes of memory the three caches hold now (a diagnostic for tests and benchmarks)."""
    total = 0
    for part in (cache.encoder, cache.decoder, cache.backbone):
        total += sum(t.numel() * t.element_size() for t in (*part.k, *part.v))
    return total + cache._h.numel() * cache._h.element_size()


__all__ = ["PREFILL_CHUNK", "ByteWindowCache", "HATCache", "byte_block_step", "kv_bytes",
           "window_attention_step"]
