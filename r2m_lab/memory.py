"""Process-wide allocator settings for streaming merges over large checkpoints.

A merge streams hundreds of keys and builds, for each, float64 temporaries of N × (up to 4M) entries. glibc serves
every block above its mmap threshold (adaptive, 128 KiB–32 MiB) with a fresh ``mmap`` and returns it on ``free``,
so each temporary is page-faulted in again, one 4 KiB page at a time: measured here, 14× slower than reusing memory
for the (3, 4M) float64 task-vector stack of a ViT-L MLP weight (0.32 s → 0.023 s), and 2× on a whole ViT-L/14
merge. Raising the mmap and trim thresholds lets freed blocks be reused from the heap instead.

The cost is that memory freed by the merge is kept by the process for reuse rather than handed back at once; peak RSS
stays within the merge benchmark's targets (``make bench-merge`` measures it). ``python -m r2m_lab`` and the
benchmark call this once at start-up; a library user merging ViT-L-sized models may call it too.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3
DEFAULT_THRESHOLD = 1 << 30  # 1 GiB: above the largest single temporary of a ViT-L/14 merge with N ≤ 8


def reuse_freed_memory(threshold: int = DEFAULT_THRESHOLD) -> bool:
    """Serve blocks below ``threshold`` bytes from the heap and keep up to ``threshold`` of free heap for reuse.

    Returns True when glibc accepted both settings; False (and logs why) on a C library without ``mallopt``
    (macOS, musl): merges are then slower, never wrong.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        log.info("No glibc mallopt on this system (%s): large merges run with the default allocator", name)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    accepted = bool(mallopt(_M_MMAP_THRESHOLD, threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, threshold))
    if not accepted:
        log.info("glibc refused mallopt thresholds of %d bytes: large merges run with the default allocator", threshold)
    return accepted
