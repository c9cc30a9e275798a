"""Keep freed memory inside the process (glibc), so MLX's CPU arrays stop page-faulting.

MLX's CPU allocator calls ``malloc`` and ``free`` for every array it makes. glibc serves blocks
over its mmap threshold (128 KB at first, at most 32 MB) with a fresh ``mmap`` and gives them back
with ``munmap`` when freed, so every large intermediate of a step is faulted in page by page and
zeroed by the kernel again, on each use (an open-book attention's scores for a batch are tens of
MB; ``bench/bench_malloc.py`` measures the cost, docs/performance.md records it).
:func:`retain_freed_memory` turns mmap allocations off and raises the heap's trim threshold, so
freed blocks are reused from the heap. The process keeps its peak heap rather than returning it
to the system, which a training or eval process would reach again at its next step anyway.
Training loops call :func:`release_freed_pages`, which hands freed blocks' pages back when the
machine runs short of memory.
``TRACER_NO_MALLOPT=1`` leaves glibc's defaults (for benchmarks). No mlx import here.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import sys
import time

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # mallopt parameters, from glibc's malloc.h
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: give back a free heap top only beyond 2 GB

_STATE: dict = {"status": None, "libc": None, "next_trim": 0.0}  # libc: the one that took the settings


def retain_freed_memory() -> bool:
    """Set glibc's malloc to serve large blocks from its heap and keep freed ones (idempotent);
    True when set."""
    if _STATE["status"] is None:
        _STATE["status"] = _set()
    return _STATE["status"] == "retained"


def _set() -> str:
    if os.environ.get("TRACER_NO_MALLOPT", "") not in ("", "0"):
        return "disabled by TRACER_NO_MALLOPT"
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return "not glibc: allocator unchanged"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    except (OSError, AttributeError) as e:
        return f"mallopt unavailable: {e}"
    _STATE["libc"] = libc
    return "retained" if ok else "mallopt refused"


def available_memory() -> float:
    """The share of the machine's memory still available (``MemAvailable / MemTotal`` of
    ``/proc/meminfo``); 1.0 where that cannot be read."""
    try:
        info = dict(line.split(":", 1) for line in open("/proc/meminfo", encoding="ascii"))
        return int(info["MemAvailable"].split()[0]) / int(info["MemTotal"].split()[0])
    except (OSError, KeyError, ValueError):
        return 1.0


def release_freed_pages(low: float = 0.25, interval: float = 10.0) -> bool:
    """When less than ``low`` of the machine's memory is available (looked at every ``interval``
    seconds at most): hand the pages of freed heap blocks back to the system (glibc's
    ``malloc_trim``), keeping the heap's address space. A retained heap keeps the blocks a long
    batch freed resident, memory that another process, or this one's next long batch, may need;
    the released pages fault in again when reused. Call it between computations. True when it
    trimmed."""
    if _STATE["status"] != "retained":
        return False
    now = time.monotonic()
    if now < _STATE["next_trim"]:
        return False
    _STATE["next_trim"] = now + interval
    if available_memory() >= low:
        return False
    _STATE["libc"].malloc_trim(0)
    return True


def heap_info() -> str:
    """What :func:`retain_freed_memory` did ("retained", or why not)."""
    return _STATE["status"] or "not attempted"
