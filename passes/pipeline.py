"""The order the ``aa`` backend runs its FX passes in (`PIPELINE`) and their names (`PASSES`).

The passes ship as ``aa_compile.passes``, one rewrite per file. ``passes/`` has no
``__init__.py`` on purpose: from the repository root a top-level ``passes`` must never shadow an
installed package of that name. Add a pass by writing ``passes/<name>.py`` with a `GraphPass`
subclass and listing it in `PIPELINE`; related passes with shared machinery may form a regular
package instead (``passes/hat/``: one module per pass).
"""

from __future__ import annotations

from .base import GraphPass
from .dictionary_score import DictionaryScorePass
from .embedding_bag import EmbeddingBagPass
from .fp8_linear import FP8LinearPass
from .hat.guide_add import GuideAddPass
from .hat.window_attention import WindowAttentionPass
from .hat.word_pool import WordPoolPass
from .rms_norm import RMSNormPass
from .sae import SAEPass
from .tfree_embedding import TFreeEmbeddingPass

PIPELINE: tuple[GraphPass, ...] = (RMSNormPass(), EmbeddingBagPass(), TFreeEmbeddingPass(),
                                   DictionaryScorePass(), FP8LinearPass(),
                                   WindowAttentionPass(), WordPoolPass(), GuideAddPass(),
                                   SAEPass())
PASSES: dict[str, GraphPass] = {p.name: p for p in PIPELINE}

__all__ = ["PIPELINE", "PASSES"]
