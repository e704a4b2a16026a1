"""Process-wide settings that make CPU training fast. Nothing here changes a result.

``keep_freed_memory()``: glibc's ``malloc`` hands every block over 128 KiB (up to 32 MiB, as its
threshold adapts) back to the kernel with ``munmap`` when it is freed. A training step allocates
and frees the same activation-sized blocks (8 MiB each for the first level's activations at
batch 16) dozens of times, so every step page-faults and zero-fills them again: on the project's
2-core EPYC that was a quarter of the step (fp32 98 -> 73 ms, bf16 62 -> 54 ms per batch of 16,
``scripts/benchmark.py``). TensorFlow keeps its own allocator pool and never pays this.
With ``mallopt`` this process keeps freed blocks in its heap instead (as TensorFlow's pool does);
resident memory then stays near the peak between steps, which it reaches every step anyway.

Off with the environment variable ``UNET_PL_KEEP_FREED_MEMORY=0``. No effect (and ``False``) on
platforms without glibc.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

# mallopt parameter numbers from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4

_done: bool | None = None


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse (no ``mmap``/``munmap`` per activation). Idempotent.

    Returns True when the settings are in force in this process, False where they cannot be
    (not glibc) or were turned off with ``UNET_PL_KEEP_FREED_MEMORY=0``.
    """
    global _done
    if _done is not None:
        return _done
    if os.environ.get("UNET_PL_KEEP_FREED_MEMORY", "1").strip().lower() in ("0", "false", "no", "off"):
        _done = False
        return _done
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl, macOS, Windows: their allocators differ
        _done = False
        return _done
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = all(
        mallopt(param, value) == 1
        for param, value in (
            (_M_MMAP_MAX, 0),  # large blocks come from the heap, so they can be reused...
            (_M_TRIM_THRESHOLD, 2**31 - 1),  # ...and the heap is not trimmed back after each step
            (_M_TOP_PAD, 64 << 20),  # grow the heap in 64 MiB steps
        )
    )
    log.debug("glibc mallopt (keep freed memory): %s", "on" if ok else "refused")
    _done = ok
    return _done
