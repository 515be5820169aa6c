"""glibc's heap kept by the process instead of handed back to the system after every batch.

By default glibc serves a block above a moving threshold (128 KB at start, at most 32 MB) with a mapping of
its own, unmapped when the block is freed, and trims the heap's free top back to the system: a process that
allocates and frees a model's activations every batch then takes a page fault on every 4 KB page of them,
every batch (measured: 6,000 faults a batch for MobileNetV3-Large at 64 px, batch 32, 16,000-33,000 at 128
px, where a [32, 64, 64, 64] activation is 32 MB; on a VM each fault costs microseconds). Where the threshold
stands depends on what the process freed before, so the same inference ran at 30 or 22 ms a batch in one
benchmark (RESULTS.md). ``keep_heap()`` turns glibc's own mappings off (``M_MMAP_MAX`` 0: every block comes
from the heap, whatever its size) and keeps up to 1 GB of free heap top, so freed activations are reused
from the heap: what CPU-inference guides get from jemalloc or tcmalloc. Freed memory stays with the process
(its RSS stays at its peak until it exits). Applied by ``config.run`` for a script run from the command
line. A no-op off Linux and where the C library has no working ``mallopt`` (musl).
"""

import ctypes
import sys

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # mallopt parameters (glibc malloc.h)
TRIM_THRESHOLD = 1 << 30  # bytes of free heap top kept before the rest is handed back to the system


def keep_heap():
    """Keep glibc's heap (see the module docstring); True where it applied."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the process runs on
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    applied = [mallopt(M_MMAP_MAX, 0), mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)]
    return all(applied)
