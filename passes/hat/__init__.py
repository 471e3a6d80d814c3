"""The HAT passes: the reference's masked byte attention -> ``aa::window_attention``, its padded
word pooling -> ``aa::word_pool``, its decoder guide add -> ``aa::guide_add_rms_norm`` or
``aa::guide_add``; each rewrite only after its mask or index is proven by evaluation.

One module per pass (guard beside rewrite), plus the shared proof engine (`proof`), size helpers
(`shapes`) and rewrite support (`rewrite`). How the proofs work: ``docs/hat.md``.
"""

from aa_compile.passes.hat.guide_add import GuideAddPass, prove_byte_words
from aa_compile.passes.hat.window_attention import (WindowAttentionPass, prove_window_mask,
                                                    window_definition)
from aa_compile.passes.hat.word_pool import WordPoolPass, prove_word_grid

__all__ = ["GuideAddPass", "WindowAttentionPass", "WordPoolPass", "prove_byte_words",
           "prove_window_mask", "prove_word_grid", "window_definition"]
