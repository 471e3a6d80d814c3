"""Transparent huge pages for large fresh CPU outputs of the trigram-bag kernels (`cpu`,
`cpu_avx2`): a new allocation of tens of MiB is fresh memory from the OS, and writing it costs a
page fault per 4 KiB page; advised huge pages cost one per 2 MiB (``docs/tfree.md``, "Large
outputs"). Only a hint: contents and results are the same either way.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys

from torch import Tensor

#: Ask the OS for transparent huge pages (``madvise(MADV_HUGEPAGE)``, Linux) for outputs of at
#: least `HUGE_PAGE_MIN_BYTES`. Set ``AA_TRIGRAM_BAG_HUGE_PAGES=0`` (before import) or this
#: attribute to False to turn it off; results are the same bits either way.
HUGE_PAGES: bool = os.environ.get("AA_TRIGRAM_BAG_HUGE_PAGES", "1").strip().lower() not in (
    "0", "false", "no", "off")
HUGE_PAGE_MIN_BYTES: int = 4 << 20
_HUGE_PAGE = 2 << 20  # x86-64 / aarch64 (4 KiB base pages) transparent huge page size
_madvise = None  # libc's madvise via ctypes, loaded on first use; False where unavailable


def _libc_madvise():
    global _madvise
    if _madvise is None:
        _madvise = False
        if sys.platform.startswith("linux") and hasattr(mmap, "MADV_HUGEPAGE"):
            try:
                fn = ctypes.CDLL(None, use_errno=True).madvise
            except (OSError, AttributeError):  # pragma: no cover - no libc symbol
                pass
            else:
                fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
                fn.restype = ctypes.c_int
                _madvise = fn
    return _madvise


def advise_huge_pages(t: Tensor) -> bool:
    """Advise the OS to back ``t``'s memory with transparent huge pages (the whole 2 MiB pages
    inside it; Linux ``madvise(MADV_HUGEPAGE)``). Only a hint: the contents are unchanged, and
    memory already touched keeps its pages. Worth it for a large buffer before it is first
    written: one page fault per 2 MiB instead of per 4 KiB. Returns whether the advice was
    given (False off Linux / CPU, below `HUGE_PAGE_MIN_BYTES`, or with `HUGE_PAGES` off)."""
    nbytes = t.numel() * t.element_size()
    if not HUGE_PAGES or t.device.type != "cpu" or nbytes < HUGE_PAGE_MIN_BYTES:
        return False
    fn = _libc_madvise()
    if not fn:
        return False
    ptr = t.data_ptr()
    lo = (ptr + _HUGE_PAGE - 1) & ~(_HUGE_PAGE - 1)
    hi = (ptr + nbytes) & ~(_HUGE_PAGE - 1)
    return hi > lo and fn(lo, hi - lo, mmap.MADV_HUGEPAGE) == 0
