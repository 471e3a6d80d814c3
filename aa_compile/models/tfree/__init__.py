"""T-FREE (tokenizer-free sparse trigram representations): the reference tokenizer.

`wordsplit` (text <-> words), `hashing` (byte trigrams, ``fast`` and ``reference`` hash modes)
`tokenizer` (`TrigramTokenizer`, batched CSR encode / decode), `modules` (the reference
layers `TFreeEmbedding`, `TFreeHead`, `TFreeDictionary`) and `lm` (`TFreeLM`, `TFreeLMConfig`).
"""

from .hashing import HASH_MODES, TRIGRAM_COUNT, fast_slots, reference_slots, trigramify
from .lm import TFreeLM, TFreeLMConfig
from .modules import (
    TFreeDictionary,
    TFreeEmbedding,
    TFreeHead,
    multi_hot,
    trigram_slot_matrix,
    word_of_trigram,
)
from .tokenizer import WHOLE_WORD_BASE, TrigramBatch, TrigramTokenizer
from .wordsplit import CONTROL_WORDS, text_to_words, words_to_text

__all__ = [
    "CONTROL_WORDS",
    "HASH_MODES",
    "TRIGRAM_COUNT",
    "WHOLE_WORD_BASE",
    "TFreeDictionary",
    "TFreeEmbedding",
    "TFreeHead",
    "TFreeLM",
    "TFreeLMConfig",
    "TrigramBatch",
    "TrigramTokenizer",
    "fast_slots",
    "multi_hot",
    "reference_slots",
    "text_to_words",
    "trigram_slot_matrix",
    "trigramify",
    "word_of_trigram",
    "words_to_text",
]
