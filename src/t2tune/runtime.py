"""Process-wide settings that make CPU training fast; applied by the CLI (library users call them).

glibc serves every allocation above a (dynamic, at most 32 MiB) threshold with a fresh
``mmap`` and unmaps it on free, so each training step page-faults and zero-fills its large
activations and gradients again. On the 2-core CPU this was measured at a quarter of the
step time: SmolLM2-135M, 8 × 256 tokens, all-token loss, 8.7 → 6.8 s per step
(``docs/performance.md``). Keeping freed memory in the heap removes the faults; peak RSS is
unchanged, because the same blocks are reused step after step.

That holds while the run is small beside the machine. When the model fills most of memory
(GPT-J 6B in bf16 on 24 GiB), the kept blocks of each layer's widened weights and recomputed
activations stay in the heap at their largest (7.6 GiB of anonymous memory against 4.2 returned,
at ~1.45x the step time);
:func:`return_freed_memory` undoes the setting for such a run (``docs/scaling.md``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_KEEP = 2**31 - 1  # bytes; the largest value mallopt accepts
_GLIBC_DEFAULT = 128 * 1024  # both thresholds' starting values in glibc
_applied = False


@functools.cache  # looked up once: find_library runs ldconfig, and the loop trims every 50 steps
def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018  (musl and other libcs have neither)
    except (OSError, AttributeError):
        return None
    return libc


def keep_freed_memory() -> bool:
    """Tell glibc malloc to keep freed memory for reuse (no per-step page faults).

    Idempotent; a no-op (False) off glibc, or when ``T2TUNE_MALLOC=default`` asks to leave the
    allocator alone.
    """
    global _applied
    if _applied:
        return True
    libc = None if os.environ.get("T2TUNE_MALLOC") == "default" else _libc()
    if libc is None:
        return False
    _applied = bool(libc.mallopt(_M_MMAP_THRESHOLD, _KEEP)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _KEEP))
    return _applied


def return_freed_memory() -> bool:
    """Undo :func:`keep_freed_memory`: large blocks are unmapped when freed again and the heap's
    free top goes back to the kernel, starting with what is kept now. True when it was in force."""
    global _applied
    libc = _libc() if _applied else None
    if libc is None:
        return False
    libc.mallopt(_M_MMAP_THRESHOLD, _GLIBC_DEFAULT)
    libc.mallopt(_M_TRIM_THRESHOLD, _GLIBC_DEFAULT)
    libc.malloc_trim(0)
    _applied = False
    return True


def trim_freed_memory() -> bool:
    """With :func:`keep_freed_memory` in force, hand the freed pages glibc holds back to the
    kernel once (``malloc_trim``), leaving the setting on. A long run calls it now and then: the
    heap's free holes otherwise stay resident and the RSS creeps up step after step. True when
    the setting was in force (else there is nothing kept to trim)."""
    libc = _libc() if _applied else None
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True
