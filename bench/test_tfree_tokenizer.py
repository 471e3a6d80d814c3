"""T-FREE tokenizer workload ``tfree_encode``: `TrigramTokenizer.encode` of a batch of English
and German paragraphs into CSR slot indices, reported as words/s (the reporter's throughput column,
tokenizer words over the median round; punctuation, digits and whitespace words count).

Variants are the two hash modes, ``fast`` (SplitMix64, vectorized over the batch's distinct
trigrams on every call) and ``reference`` (md5, cached per trigram), and the peer ``bpe``: a
byte-level BPE of the ``tokenizers`` package (Rust, as GPT-2/Llama-style tokenizers are run),
vocabulary 32000, trained once on the offline corpus (``aa_compile.data``, English + German),
``encode_batch`` of the same paragraphs; its words/s counts the same T-FREE words so the
columns compare (skipped when ``tokenizers`` is not installed). Both run on the CPU
whatever ``--device`` says: the tokenizer has no device path. Caches: the first call of each
variant (timed alone as ``compile_s``, outside the rounds) fills the reference mode's md5 cache
and the per-word trigram cache shared by both modes, so the rounds measure warm caches and
``compile_s`` of ``reference`` is its cold-cache cost. The text is generated from a fixed word
list with a seeded RNG (no downloads): about 2k words with ``--quick``, 50k otherwise.
"""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from aa_compile.models.tfree import TrigramTokenizer
from bench.harness import bench_variant

VARIANTS = ("fast", "reference")
PEERS = ("bpe",)

_ENGLISH = (
    "the of and to in is was for that with as on by at from his her which this were are be had "
    "an not it also or have but their one all new after first two has its who they more been "
    "other time into only during most people language model word words tokenizer embedding "
    "training research compiler kernel memory sparse pattern hidden layer Monday London English "
    "University government history between through without however because although"
).split()
_GERMAN = (
    "der die das und zu in ist war für dass mit als auf von bei aus sein ihre welche diese waren "
    "sind ein nicht es auch oder haben aber über nach während Straße Größe Gemüse Fräulein "
    "Übersetzung Mädchen schön müssen können würde Bundesrepublik Deutschland Sprachmodell "
    "Wörterbuch Zeichenkette Einbettung Forschung Speicher Heidelberg Universität Geschäftsführer"
).split()
_PUNCT = [",", ",", ".", ";", ":", "!", "?", " -", " (see", ")"]


@dataclasses.dataclass(frozen=True)
class EncodeCase:
    words: int  # tokenizer words in the batch, about

    @property
    def id(self) -> str:
        return f"{self.words // 1000}k-words"


def tfree_cases(quick: bool, device: str) -> list[EncodeCase]:
    """Quick: about 2k words. Full: about 50k words. Same on every device (CPU work)."""
    return [EncodeCase(2000 if quick else 50000)]


#: the cases of this workload file, per --quick / --device (see bench/conftest.py)
CASES = tfree_cases


def paragraphs(n_words: int, seed: int = 0) -> list[str]:
    """Paragraphs of mixed English/German sentences holding about ``n_words`` tokenizer words
    (with compounds, numbers, punctuation, brackets, double spaces and newlines)."""
    rng = random.Random(seed)
    splitter = TrigramTokenizer()
    out: list[str] = []
    total = 0
    while total < n_words:
        vocab = _ENGLISH if rng.random() < 0.6 else _GERMAN
        sentences = []
        for _ in range(rng.randint(2, 6)):
            words = [rng.choice(vocab) for _ in range(rng.randint(4, 18))]
            if rng.random() < 0.5:  # a compound, so that words (and trigrams) keep coming
                words.append(rng.choice(vocab).capitalize() + rng.choice(vocab).lower())
            words[0] = words[0].capitalize()
            if rng.random() < 0.3:
                words.insert(rng.randrange(len(words)), str(rng.randint(0, 2100)))
            if rng.random() < 0.4:
                words.insert(rng.randrange(1, len(words)), rng.choice(_PUNCT))
            sentences.append(" ".join(words).replace(" ,", ",") + rng.choice(".!?."))
        text = ("  " if rng.random() < 0.1 else " ").join(sentences)
        text += "\n\n" if rng.random() < 0.5 else "\n"
        out.append(text)
        total += len(splitter.words(text))
    return out


@pytest.fixture(scope="module")
def texts(case):
    batch = paragraphs(case.words)
    n_words = TrigramTokenizer().encode(batch).n_words
    return batch, n_words


def bpe_tokenizer(vocab_size: int = 32000):
    """A byte-level BPE (``tokenizers``) trained on the offline English + German corpus."""
    tokenizers = pytest.importorskip("tokenizers")
    from aa_compile.data import documents

    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size, show_progress=False,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(documents("mixed"), trainer=trainer)
    return tok


@pytest.mark.parametrize("variant", VARIANTS + PEERS)
def test_tfree_encode(benchmark, settings, case, texts, variant, repeat):
    batch, n_words = texts
    bpe = variant == "bpe"

    def encode(tok):  # the timed call: the whole batch
        return (lambda: tok.encode_batch(batch)) if bpe else (lambda: tok.encode(batch))

    # the shape names the exact word count (same for both variants: one seeded text)
    bench_variant(benchmark, settings, case, variant, "tfree_encode", kind="op",
                  shape=f"{n_words} words", dtype=torch.int64, step=encode,
                  build=bpe_tokenizer if bpe else lambda: TrigramTokenizer(hash_mode=variant))
    # the reporter turns these into a words/s column (items / median of the merged repeats)
    benchmark.extra_info.update(items=n_words, item_unit="words")
