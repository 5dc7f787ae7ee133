"""Keep freed memory in the process instead of handing it back to the kernel (glibc ``mallopt``).

A training step allocates and frees the same large tensors (activations, logits, gradients) over and over.
glibc serves large requests with ``mmap`` and returns freed memory at the top of the heap to the kernel, so
every step faults the same pages in again; on the 2-core development VM a page fault costs ~8 us, and the
quickstart spent 45 s of CPU time in the kernel (7.8 M minor faults). With ``M_MMAP_MAX = 0`` (no ``mmap``
for large blocks: they come from the heap) and a trim threshold of 2 GiB (mallopt's largest; the heap is not
shrunk by less), freed blocks are reused: 1.1 M faults and 19 s (BENCHMARKS.md). Peak resident memory is
unchanged (the peak is reached either way); memory freed after the peak stays with the process until it exits.

Applied by :func:`postrl.run.lifecycle.run_job` on Linux with glibc; ``POSTRL_MALLOC=default`` leaves the
allocator as it is. Other platforms (macOS, musl) are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_MAX = -4
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int

_applied = False


def keep_freed_memory() -> bool:
    """Tune glibc's allocator as the module docstring says; True when applied (once per process)."""
    global _applied
    if _applied:
        return True
    if os.environ.get("POSTRL_MALLOC", "").lower() == "default" or platform.system() != "Linux":
        return False
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1  # 1: success
    _applied = ok
    return ok
