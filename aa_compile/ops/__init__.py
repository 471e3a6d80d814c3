"""The `aa::` custom ops: the only contract between passes and kernels.

Importing this package defines every op (schema, fake impl, autograd, device kernels) and fills
`OPS`. Add an op by writing ``aa_compile/ops/<name>.py`` and importing it below.
"""

from . import rms_norm  # noqa: F401  (defines aa::rms_norm, aa::rms_norm_backward)
from . import trigram_bag  # noqa: F401
from . import hashed_trigram_bag  # noqa: F401  (aa::hashed_trigram_bag[_backward])
from . import dictionary_score  # noqa: F401  (aa::dictionary_score, aa::csr_offsets)
from . import fp8_linear  # noqa: F401  (aa::fp8_linear[_backward])
from . import window_attention  # noqa: F401  (aa::window_attention[_backward])
from . import word_pool  # noqa: F401  (aa::word_pool[_backward])
from . import guide_add  # noqa: F401  (aa::guide_add[_rms_norm][_backward])
from . import int8_linear  # noqa: F401  (aa::int8_linear)
from . import atman_attention  # noqa: F401  (aa::atman_attention)
from . import sae_decode  # noqa: F401  (aa::sae_decode[_backward])
from . import sae_encode  # noqa: F401  (aa::sae_encode[_backward])
from .registry import OpEntry, collect, install_inductor_decompositions

OPS = collect()

__all__ = ["OPS", "OpEntry", "install_inductor_decompositions"]
