"""T-FREE (tokenizer-free sparse trigram representations): the reference tokenizer.

`wordsplit` (text <-> words), `hashing` (byte trigrams, ``fast`` and ``reference`` hash modes)
and `tokenizer` (`TrigramTokenizer`, batched CSR encode / decode).
"""

from .hashing import HASH_MODES, TRIGRAM_COUNT, fast_slots, reference_slots, trigramify
from .tokenizer import WHOLE_WORD_BASE, TrigramBatch, TrigramTokenizer
from .wordsplit import CONTROL_WORDS, text_to_words, words_to_text

__all__ = [
    "CONTROL_WORDS",
    "HASH_MODES",
    "TRIGRAM_COUNT",
    "WHOLE_WORD_BASE",
    "TrigramBatch",
    "TrigramTokenizer",
    "fast_slots",
    "reference_slots",
    "text_to_words",
    "trigramify",
    "words_to_text",
]
