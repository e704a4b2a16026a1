"""Process-wide settings that make CPU training fast, and a faster ``bincount``. Nothing here changes a result.

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

import numpy as np

log = logging.getLogger(__name__)

# mallopt parameter numbers from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

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
            (_M_TRIM_THRESHOLD, -1),  # ...and the heap is never trimmed back (-1: off; 2**31 - 1, the largest
            # positive value, let a 2 GiB free top be handed back and faulted in again on the next image)
            (_M_TOP_PAD, 64 << 20),  # grow the heap in 64 MiB steps
            # one heap for every thread: the blocks of the training step's micro-batch threads are
            # kept too (a thread's own heap is at most 64 MiB and is unmapped when it empties; a
            # 2048 x 2048 forward pass on a second thread ran at half speed without this)
            (_M_ARENA_MAX, 1),
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


class ThreadChooser:
    """Picks the number of threads for CPU training from the measured step times, so that a run
    keeps its speed when another process takes a core.

    torch's OpenMP threads meet at a barrier after every operation: with all cores in use, one
    core taken by another program (a browser, a second run, ``yes > /dev/null``) makes every
    barrier wait for the thread that lost its core, and a 2-core step fell to 36% of its quiet
    speed where one thread kept 70% (issue 17). Nothing in the step can know this in advance, so
    the chooser measures: it compares the median of ``window`` step times on all threads (``full``)
    with the same on ``fewer`` (default half, at least one), keeps the faster by a clear margin
    (``gain``), and probes again after ``period`` steps (doubling up to ``max_period`` each time
    the choice holds) or at once when steps become ``slowdown`` times slower than the best seen
    with the current count. On a quiet machine the probes cost well under 1% of a long run.

    ``step(seconds)`` after every training step; ``set_threads`` is ``torch.set_num_threads``.
    """

    def __init__(self, full: int, fewer: int | None = None, *, window: int = 6, settle: int = 1, first_probe: int = 16,
                 max_period: int = 1024, slowdown: float = 1.3, gain: float = 0.9, set_threads=None) -> None:
        import torch

        self.full = full
        self.fewer = max(1, full // 2) if fewer is None else fewer
        self.window, self.settle, self.first_probe, self.max_period = window, settle, first_probe, max_period
        self.slowdown, self.gain = slowdown, gain
        self.set_threads = set_threads or torch.set_num_threads
        self.current = full
        self.period = first_probe
        self.since_probe = 0
        self.skip = settle
        self.times: list[float] = []
        self.best: dict[int, float] = {}
        self.probe_from: tuple[int, float] | None = None  # (count left, its median) while probing
        self.changes: list[tuple[int, int, float, float]] = []  # (step, threads, median before, median after)
        self.steps = 0

    def _use(self, n: int) -> None:
        self.current = n
        self.set_threads(n)
        self.skip, self.times = self.settle, []

    def step(self, seconds: float) -> None:
        """Record one training step's duration; may change the thread count for the next steps."""
        self.steps += 1
        self.since_probe += 1
        if self.skip:
            self.skip -= 1  # the first steps after a change rebuild the thread team
            return
        self.times.append(seconds)
        if len(self.times) < self.window:
            return
        median = float(np.median(self.times))
        self.times = []
        if self.probe_from is not None:
            left, before = self.probe_from
            self.probe_from = None
            if median < self.gain * before:  # the other count is clearly faster: stay
                self.changes.append((self.steps, self.current, before, median))
                log.info("training on %d thread%s instead of %d: %.0f ms per step instead of %.0f (another program is "
                         "using the CPU, or has stopped)", self.current, "" if self.current == 1 else "s", left,
                         1000 * median, 1000 * before)
                self.period = self.first_probe
            else:
                self._use(left)
                self.period = min(2 * self.period, self.max_period)
            self.best[self.current] = min(self.best.get(self.current, median), median)
            self.since_probe = 0
            return
        best = self.best.get(self.current, median)
        self.best[self.current] = min(best, median)
        if self.since_probe >= self.period or median > self.slowdown * best:
            self.probe_from = (self.current, median)
            self._use(self.fewer if self.current == self.full else self.full)


def is_compiled(module) -> bool:
    """Whether ``module`` or a submodule is ``torch.compile``'d in place (``nn.Module.compile``):
    compiled code is not run from several threads at once."""
    return any(getattr(m, "_compiled_call_impl", None) is not None for m in module.modules())


_parts_pool = None


def run_parts(fn, items: list) -> list:
    """``[fn(item) for item in items]``, all at once: the first on this thread, the others on
    worker threads running as many torch threads as this one. Waits for every part before it
    returns or raises (the first error, in order). The training step's micro-batches
    (``LitUNet.micro_batches``) run this way: parts that share no barrier keep the CPU they get
    when another program takes a core, where one operation's threads wait for the slowest."""
    from concurrent.futures import ThreadPoolExecutor, wait

    import torch

    global _parts_pool
    if len(items) <= 1:
        return [fn(item) for item in items]
    if _parts_pool is None or _parts_pool._max_workers < len(items) - 1:
        _parts_pool = ThreadPoolExecutor(len(items) - 1, thread_name_prefix="unet_pl-part")
    threads = torch.get_num_threads()

    def run(item):
        if torch.get_num_threads() != threads:  # OpenMP's count is per thread; a pool thread keeps its own
            torch.set_num_threads(threads)
        return fn(item)

    futures = [_parts_pool.submit(run, item) for item in items[1:]]
    try:
        first = fn(items[0])
    finally:
        wait(futures)
    return [first] + [f.result() for f in futures]


#: Values per ``bincount`` chunk: each chunk's int64 copy (2 MiB) stays in the cache.
COUNT_CHUNK = 1 << 18


def bincount(values: np.ndarray, minlength: int = 0) -> np.ndarray:
    """``np.bincount(values.ravel(), minlength=minlength)`` of non-negative integers, the same counts,
    twice as fast on a large image: numpy copies the values to int64 before counting, and here it
    does so chunk by chunk (``COUNT_CHUNK``), in the cache, instead of in one image-sized copy."""
    flat = np.asarray(values).ravel()
    if len(flat) <= COUNT_CHUNK:
        return np.bincount(flat, minlength=minlength)
    top = int(flat.max())
    if top >= COUNT_CHUNK // 4:  # every chunk adds an array of top + 1 counts: at this size, one pass is cheaper
        return np.bincount(flat, minlength=minlength)
    counts = np.zeros(max(top + 1, minlength), np.int64)
    for i in range(0, len(flat), COUNT_CHUNK):
        counts += np.bincount(flat[i:i + COUNT_CHUNK], minlength=len(counts))
    return counts
