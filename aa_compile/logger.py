"""The ``aa_compile`` logger. ``AA_COMPILE_LOG=debug`` (or info, warning) turns on its output.

A leaf shared by the layers that log (the backend, the passes, the ops): it imports nothing of
``aa_compile`` (contract ``shared-leaves`` in ``.importlinter``). The kernels import nothing of
``aa_compile`` outside themselves; one that logs uses ``logging.getLogger(__name__)``, a child of
this logger, so ``AA_COMPILE_LOG`` reaches it too.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("aa_compile")

ENV_VAR = "AA_COMPILE_LOG"


def configure_from_env() -> None:
    level_name = os.environ.get(ENV_VAR, "").strip().upper()
    if not level_name:
        return
    level = logging.getLevelName(level_name)
    if not isinstance(level, int):
        raise ValueError(
            f"{ENV_VAR}={os.environ[ENV_VAR]!r} is not a logging level; use debug, info or warning"
        )
    log.setLevel(level)
    if not any(getattr(h, "_aa_compile", False) for h in log.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[aa_compile %(levelname)s] %(message)s"))
        handler._aa_compile = True  # type: ignore[attr-defined]
        log.addHandler(handler)
