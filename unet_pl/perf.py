"""Process-wide settings that make CPU training fast. Nothing here changes a result.

``keep_freed_memory()``: glibc's ``malloc`` hands every block over 128 KiB (up to 32 MiB, as its
threshold adapts) back to the kernel with ``munmap`` when it is freed. A training step allocates
and frees the same activation-sized blocks (8 MiB each for the first level's activations at
batch 16) dozens of times, so every step page-faults and zero-fills them again: on the project's
2-core EPYC that was a quarter of the step (fp32 98 -> 73 ms, bf16 62 -> 54 ms per batch of 16,
``scripts/benchmark.py``). TensorFlow keeps its own allocator pool and never pays this.
With ``mallopt`` this process keeps freed blocks in its heap instead (as TensorFlow's pool does);
resident memory then stays near the peak between steps, which it reaches every step anyway.

The setting is process-wide and stays: memory freed later is kept too. ``release_freed_memory()``
(``malloc_trim``) hands what is free back to the system; ``LitUNet.teardown`` and the prediction
functions call it when they finish, so a notebook or a service does not keep a run's peak.
``LitUNet`` turns it on for CPU runs only (a GPU step allocates no host activations).

Off with the environment variable ``UNET_PL_KEEP_FREED_MEMORY=0``. No effect (and ``False``) on
platforms without glibc, or with jemalloc/tcmalloc preloaded (they pool freed memory already).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
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
    if any(name in os.environ.get("LD_PRELOAD", "") for name in ("jemalloc", "tcmalloc", "mimalloc")):
        _done = False  # glibc's mallopt would answer 1 and change nothing
        return _done
    libc = _glibc()
    if libc is None:
        _done = False
        return _done
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    answers = [
        mallopt(param, value)
        for param, value in (
            (_M_MMAP_MAX, 0),  # large blocks come from the heap, so they can be reused...
            (_M_TRIM_THRESHOLD, 2**31 - 1),  # ...and the heap is not trimmed back after each step
            (_M_TOP_PAD, 64 << 20),  # grow the heap in 64 MiB steps
        )
    ]
    _done = all(a == 1 for a in answers)
    log.debug("glibc mallopt (keep freed memory): %s", "on" if _done else f"refused ({answers})")
    return _done


def release_freed_memory() -> None:
    """Give free heap memory back to the system (glibc ``malloc_trim``); nothing if never kept."""
    if _done:
        libc = _glibc()
        if libc is not None:
            libc.malloc_trim(0)


@functools.cache
def _glibc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 - both must exist: glibc
    except (OSError, AttributeError):  # musl, macOS, Windows: their allocators differ
        return None
    return libc
