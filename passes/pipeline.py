"""The order the ``aa`` backend runs its FX passes in (`PIPELINE`) and their names (`PASSES`).

The passes ship as ``aa_compile.passes``, one rewrite per file. ``passes/`` has no
``__init__.py`` on purpose: from the repository root a top-level ``passes`` must never shadow an
installed package of that name. Add a pass by writing ``passes/<name>.py`` with a `GraphPass`
subclass and listing it in `PIPELINE`; related passes with shared machinery may form a regular
package instead (``passes/hat/``: one module per pass).
"""

from __future__ import annotations

import time
import traceback

import torch.fx as fx

from aa_compile.logger import log

from .base import GraphPass, PassContext, PassResult
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

__all__ = ["PIPELINE", "PASSES", "run_passes"]


def run_passes(gm: fx.GraphModule, example_inputs: list, config) -> list[PassResult]:
    """Run the passes ``config`` (an `aa_compile.Config`) enables on ``gm``, in pipeline order;
    return their results. Shared by the ``aa`` backend and `aa_compile.export`."""
    results = []
    for name in config.enabled_passes():
        result = PassResult(name)
        start = time.perf_counter()
        try:
            PASSES[name].run(gm, PassContext(result, example_inputs, config))
            gm.graph.lint()
        except Exception as e:
            if config.strict:
                raise
            result.error = f"{type(e).__name__}: {e}"
            log.warning("aa pass %s failed and was skipped: %s", name, result.error)
            log.debug("%s", traceback.format_exc())
        result.seconds = time.perf_counter() - start
        log.debug(
            "pass %s: %d rewrite(s), %d skipped", name, result.rewrites, len(result.skipped)
        )
        for skip in result.skipped:
            log.debug("  %s left %s: %s", name, skip.node, skip.reason)
        results.append(result)
    return results
