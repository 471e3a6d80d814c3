"""AtMan (arXiv 2301.08110): attention-manipulation explanations for any SDPA model.

``explain(model, input_ids, target, ...) -> Explanation``; the attention calls are rewritten
to ``aa::atman_attention`` (see :mod:`.rewrite`), perturbations are batched and share the
unperturbed prefix (see :mod:`.explain`).
"""

from .explain import explain, perturbation_specs
from .explanation import Explanation
from .rewrite import AtmanAttentionMode

__all__ = ["AtmanAttentionMode", "Explanation", "explain", "perturbation_specs"]
