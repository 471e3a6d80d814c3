"""`TFreeLM`: a small T-FREE language model on the reference transformer, word by word.

Each position is a word: `TFreeEmbedding` turns its trigram slots into a vector, the reference
transformer's blocks (RMSNorm, RoPE, GQA, SwiGLU; causal over words) run over the words, and
`TFreeHead` predicts the multi-hot slot pattern of the *next* word. `generate` decodes word by
word: sigmoid of the last position's logits, `TFreeDictionary` picks the best word, the word is
re-encoded into trigram slots and fed as one new position with the KV cache (section 1.5 of
``shared/research/tfree_hat.md``).

Inputs are `TFreeInputs`: the flat ``[n_trigrams, m]`` slot rows of all words of a ``[B, S]``
batch with the flat position ``b * S + s`` of each trigram's word, plus the targets (multi-hot
next-word patterns) and per-position loss weights (0 on padding). `TFreeInputs.from_words`
builds them from word lists (padding shorter ones); `WordStream` cuts training windows from one
pre-encoded corpus.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import Tensor, nn

from ..transformer import Block, KVCache, RMSNorm, rope_tables
from .config import TFreeLMConfig
from .modules import TFreeDictionary, TFreeEmbedding, TFreeHead
from .pretrained import load_tfree_pretrained, save_tfree_pretrained
from .tokenizer import TrigramBatch, TrigramTokenizer

END_OF_TEXT = "<|endoftext|>"


@dataclasses.dataclass(frozen=True)
class TFreeInputs:
    """One ``[batch, seq]`` batch of words for `TFreeLM` (see the module docstring)."""

    trigram_slots: Tensor  # [n_trigrams, m] int64
    word_of_trigram: Tensor  # [n_trigrams] int64, flat position b * seq + s
    batch: int
    seq: int
    targets: Tensor | None = None  # [batch, seq, v] multi-hot of the next word
    loss_weights: Tensor | None = None  # [batch, seq]; 0 where there is no next word

    @staticmethod
    def from_trigrams(enc: TrigramBatch, m: int, rows: list[range], vocab_size: int,
                      targets: bool = True) -> TFreeInputs:
        """Rows of words of ``enc`` (``rows[b]``: word indices of sequence b, in order).

        Inputs are each row's words but the last, targets the patterns of words 1..; shorter
        rows are padded (no trigrams, loss weight 0).
        """
        for r in rows:
            if not isinstance(r, range) or r.step != 1 or (len(r) and not
                                                            0 <= r.start <= r[-1] < enc.n_words):
                raise ValueError(f"rows must be ranges of word indices in [0, {enc.n_words}) "
                                 f"with step 1, got {r!r}")
        batch = len(rows)
        seq = max((len(r) - (1 if targets else 0) for r in rows), default=0)
        if batch == 0 or seq <= 0:
            raise ValueError("need at least one sequence with "
                             f"{2 if targets else 1} or more words")
        n_in = [max(len(r) - (1 if targets else 0), 0) for r in rows]
        first = torch.tensor([r.start if len(r) else 0 for r in rows], dtype=torch.int64)
        counts = torch.tensor(n_in, dtype=torch.int64)
        row_of = torch.repeat_interleave(torch.arange(batch), counts)
        step = torch.arange(int(counts.sum())) - torch.repeat_interleave(
            counts.cumsum(0) - counts, counts)
        word = first[row_of] + step  # input words, in order
        pos = row_of * seq + step  # their flat positions
        trig = _ranges(enc.trigram_offsets, word)
        trigram_slots = enc.indices.view(-1, m)[trig]
        word_of_trigram = torch.repeat_interleave(pos, enc.trigram_offsets.diff()[word])
        tgt = weights = None
        if targets:
            nxt = word + 1
            entries = _ranges(enc.offsets, nxt)
            tgt = torch.zeros(batch * seq, vocab_size)
            tgt[torch.repeat_interleave(pos, enc.offsets.diff()[nxt]), enc.indices[entries]] = 1
            tgt = tgt.view(batch, seq, vocab_size)
            weights = torch.zeros(batch * seq)
            weights[pos] = 1
            weights = weights.view(batch, seq)
        return TFreeInputs(trigram_slots, word_of_trigram, batch, seq, tgt, weights)

    @staticmethod
    def from_words(tokenizer: TrigramTokenizer, sequences: list[list[str]],
                   targets: bool = True) -> TFreeInputs:
        """Encode word lists (one per sequence) into a batch (see `from_trigrams`)."""
        flat = [w for seq in sequences for w in seq]
        enc = tokenizer.encode_words(flat)
        rows, start = [], 0
        for seq in sequences:
            rows.append(range(start, start + len(seq)))
            start += len(seq)
        return TFreeInputs.from_trigrams(enc, tokenizer.m, rows, tokenizer.vocab_size, targets)

    def to(self, device) -> TFreeInputs:
        move = (lambda t: None if t is None else t.to(device))
        return dataclasses.replace(
            self, trigram_slots=move(self.trigram_slots),
            word_of_trigram=move(self.word_of_trigram), targets=move(self.targets),
            loss_weights=move(self.loss_weights))


def _ranges(offsets: Tensor, rows: Tensor) -> Tensor:
    """Concatenated ``arange(offsets[r], offsets[r + 1])`` for each ``r`` in ``rows``."""
    lo, n = offsets[rows], offsets[rows + 1] - offsets[rows]
    start = torch.repeat_interleave(lo - (n.cumsum(0) - n), n)
    return start + torch.arange(int(n.sum()))


class WordStream:
    """A corpus encoded once; `batch` cuts random windows of ``seq + 1`` words from it."""

    def __init__(self, tokenizer: TrigramTokenizer, text: str) -> None:
        self.tokenizer = tokenizer
        self.enc = tokenizer.encode(text)
        if self.enc.n_words < 2:
            raise ValueError("the corpus needs at least 2 words")

    @property
    def n_words(self) -> int:
        return self.enc.n_words

    def batch(self, batch: int, seq: int, generator: torch.Generator | None = None) -> TFreeInputs:
        span = min(seq + 1, self.n_words)
        starts = torch.randint(0, self.n_words - span + 1, (batch,), generator=generator)
        rows = [range(int(a), int(a) + span) for a in starts]
        return TFreeInputs.from_trigrams(self.enc, self.tokenizer.m, rows,
                                         self.tokenizer.vocab_size)


class TFreeLM(nn.Module):
    """T-FREE decoder: `TFreeEmbedding` -> transformer blocks -> RMSNorm -> `TFreeHead`."""

    def __init__(self, cfg: TFreeLMConfig) -> None:
        super().__init__()
        if not isinstance(cfg, TFreeLMConfig):
            raise TypeError(f"TFreeLM expects a TFreeLMConfig, got {type(cfg).__name__}")
        self.config = cfg
        tcfg = cfg.transformer()
        self.tcfg = tcfg
        self.embed = TFreeEmbedding(cfg.vocab_size, cfg.d_model, cfg.aggregation)
        self.layers = nn.ModuleList(Block(tcfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, tcfg.norm_eps)
        self.head = TFreeHead(cfg.d_model, cfg.vocab_size, cfg.pos_weight, cfg.loss_scale)
        cos, sin = rope_tables(tcfg.head_dim, tcfg.max_seq_len, tcfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, trigram_slots: Tensor, word_of_trigram: Tensor, batch: int, seq: int,
                cache: KVCache | None = None) -> Tensor:
        """Head logits ``[batch, seq, v]`` (one row of slot logits per word position)."""
        past = cache.length if cache is not None else 0
        if past + seq > self.tcfg.max_seq_len:
            raise ValueError(f"sequence length {past + seq} exceeds max_seq_len="
                             f"{self.tcfg.max_seq_len}")
        x = self.embed(trigram_slots, word_of_trigram, batch * seq).view(batch, seq, -1)
        cos, sin = self.rope_cos[past:past + seq], self.rope_sin[past:past + seq]
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache, i)
        if cache is not None:
            cache.length += seq
        return self.head(self.norm(x))

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | str | None = None,
                        device: torch.device | str = "cpu") -> TFreeLM:
        """A released T-FREE checkpoint (the public trigrams repository's folder:
        ``transformer/`` + ``tokenizer/``), strictly mapped, built on the meta device and
        filled from memory-mapped files. The model gets ``.tokenizer`` (hash mode
        ``reference``) and ``.released`` (its dictionary ``.words`` and what
        `save_pretrained` needs); see `aa_compile.models.tfree.pretrained` and
        docs/checkpoints.md."""
        return load_tfree_pretrained(cls, path, dtype=dtype, device=device)

    def save_pretrained(self, path: str | Path, tokenizer: TrigramTokenizer | None = None,
                        words: list[str] | None = None) -> list[Path]:
        """Write this model in the released layout (load -> save is bit-exact); a model not
        loaded from one needs its ``reference``-mode ``tokenizer`` (``words``: the decoding
        dictionary to store)."""
        return save_tfree_pretrained(self, path, tokenizer, words)

    def loss(self, inputs: TFreeInputs) -> Tensor:
        """The reference's multi-hot BCE loss of ``inputs`` (which must carry targets)."""
        if inputs.targets is None:
            raise ValueError("inputs have no targets (build them with targets=True)")
        logits = self(inputs.trigram_slots, inputs.word_of_trigram, inputs.batch, inputs.seq)
        return self.head.loss(logits, inputs.targets, inputs.loss_weights)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        p = self.embed.weight
        return KVCache(self.config.n_layers, batch, self.tcfg.kv_heads, max_len,
                       self.tcfg.head_dim, p.dtype, p.device)

    @torch.no_grad()
    def generate(self, tokenizer: TrigramTokenizer, prompt: str, max_words: int,
                 dictionary: TFreeDictionary | None = None, words: list[str] = (),
                 stop: str = END_OF_TEXT) -> list[str]:
        """Greedy word-by-word continuation of ``prompt``: the generated words.

        ``dictionary``: the candidate words (built from ``words`` plus the prompt's words when
        not given: the reference always lets the prompt's words be generated). Stops after
        ``max_words`` or at ``stop``. Text: ``tokenizer.decode(prompt_words + result)``.
        """
        self.config.check_tokenizer(tokenizer)
        if max_words < 0:
            raise ValueError(f"max_words must be >= 0, got {max_words}")
        prompt_words = tokenizer.words(prompt)
        if not prompt_words:
            raise ValueError("the prompt has no words")
        if dictionary is None:
            dictionary = TFreeDictionary(tokenizer, [*words, *prompt_words, stop])
        dev = self.embed.weight.device
        dictionary = dictionary.to(dev)  # its patterns meet the logits on the model's device
        total = len(prompt_words) + max_words
        if total > self.tcfg.max_seq_len:
            raise ValueError(f"prompt ({len(prompt_words)} words) + max_words={max_words} "
                             f"exceeds max_seq_len={self.tcfg.max_seq_len}")
        cache = self.new_cache(1, max(total, 1))
        step = TFreeInputs.from_words(tokenizer, [prompt_words], targets=False).to(dev)
        out: list[str] = []
        for _ in range(max_words):
            logits = self(step.trigram_slots, step.word_of_trigram, 1, step.seq, cache)
            word = dictionary.greedy(logits[0, -1])[0]
            out.append(word)
            if word == stop:
                break
            step = TFreeInputs.from_words(tokenizer, [[word]], targets=False).to(dev)
        return out


__all__ = ["END_OF_TEXT", "TFreeInputs", "TFreeLM", "TFreeLMConfig", "WordStream"]
