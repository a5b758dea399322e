"""Process-wide settings that make CPU training fast; applied by the CLI and the ``Trainer``.

glibc serves every allocation above a (dynamic, at most 32 MiB) threshold with a fresh
``mmap`` and unmaps it on free, so each training step page-faults and zero-fills its large
activations and gradients again. On the 2-core CPU this was measured at a quarter of the
step time: SmolLM2-135M, 8 × 256 tokens, all-token loss, 8.7 → 6.8 s per step
(``docs/performance.md``). Keeping freed memory in the heap removes the faults; peak RSS is
unchanged, because the same blocks are reused step after step.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_KEEP = 2**31 - 1  # bytes; the largest value mallopt accepts
_applied = False


def keep_freed_memory() -> bool:
    """Tell glibc malloc to keep freed memory for reuse (no per-step page faults).

    Idempotent; a no-op (False) off glibc, or when ``T2TUNE_MALLOC=default`` asks to leave the
    allocator alone.
    """
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux") or os.environ.get("T2TUNE_MALLOC") == "default":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    _applied = bool(mallopt(_M_MMAP_THRESHOLD, _KEEP)) and bool(mallopt(_M_TRIM_THRESHOLD, _KEEP))
    return _applied
