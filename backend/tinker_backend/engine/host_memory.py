"""Keep freed host memory in the process, so that a training step does not page-fault.

torch's CPU tensors come from glibc's ``malloc``. By default glibc serves a large block with its
own ``mmap`` (from 128 KB, a threshold that moves with what the program frees) and hands memory
at the top of its heap back to the kernel once more than twice that threshold is free. Both
release memory that the next step allocates again, page by page: measured on the tiny model, a
small-batch step took 13,000 page faults and 38 ms of kernel time, 81 ms in all, and 46 ms with
the memory kept (docs/benchmarks.md, issue 12). The settings below keep blocks up to 32 MB
(glibc's largest ``mmap`` threshold) in the heap and return free heap only above 1 GB, so that
steady-state steps reuse their memory; larger blocks are still mapped and unmapped.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["keep_freed_memory"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 1 << 30
DISABLE_ENV = "TINKER_KEEP_FREED_MEMORY"  # "0": leave glibc's defaults

_done = False


def keep_freed_memory() -> bool:
    """Set glibc's ``malloc`` thresholds for this process (once); False where not done: not
    Linux with glibc, turned off with ``TINKER_KEEP_FREED_MEMORY=0``, or ``MALLOC_*`` tuned
    by the user."""
    global _done
    if _done:
        return True
    if sys.platform != "linux" or os.environ.get(DISABLE_ENV) == "0":
        return False
    if any(name in os.environ for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018  # glibc only: musl has no tunable thresholds
    except (OSError, AttributeError):
        return False
    _done = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _done
