"""The FX passes of the ``aa`` backend (shipped as ``aa_compile.passes``), one rewrite per file.

`PIPELINE` is the order they run in; `PASSES` maps names to instances. Add a pass by writing
``passes/<name>.py`` with a `GraphPass` subclass and listing it in `PIPELINE`.
"""

from __future__ import annotations

from .base import GraphPass, PassContext, PassResult, Skip
from .dictionary_score import DictionaryScorePass
from .embedding_bag import EmbeddingBagPass
from .fp8_linear import FP8LinearPass
from .hat import GuideAddPass, WindowAttentionPass, WordPoolPass
from .rms_norm import RMSNormPass
from .tfree_embedding import TFreeEmbeddingPass

PIPELINE: tuple[GraphPass, ...] = (RMSNormPass(), EmbeddingBagPass(), TFreeEmbeddingPass(),
                                   DictionaryScorePass(), FP8LinearPass(),
                                   WindowAttentionPass(), WordPoolPass(), GuideAddPass())
PASSES: dict[str, GraphPass] = {p.name: p for p in PIPELINE}

__all__ = ["PIPELINE", "PASSES", "GraphPass", "PassContext", "PassResult", "Skip"]
