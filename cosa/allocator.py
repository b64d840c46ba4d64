"""glibc malloc settings for a process that allocates large, short-lived tensors.

PyTorch's CPU allocator is the C library's `malloc`. glibc serves blocks above a dynamic
threshold (128 KiB to 32 MiB) with `mmap` and gives them back to the kernel with `munmap` as
soon as they are freed; the next step allocates them again and the kernel zero-fills every page
on first touch. A CoSA training step frees and re-allocates hundreds of megabytes of
temporaries (the teacher's scales, the CRF energy's neighbourhoods), so on the CPU about a third
of its time went to page faults and system calls (issue #17: 20.8 s of system time in 106 s,
6.7 million minor faults in under a minute). Keeping freed memory in the process's heap removes
that churn; the price is that the resident size stays at its peak instead of shrinking between
steps, which a training or inference process reaches again at the next step anyway.

`keep_freed_memory()` applies this with `mallopt` at run time (the `MALLOC_*_` environment
variables are read only at start-up, too late for a Python program). It is a no-op where it does
not apply (not glibc, or `mallopt` refused) and when the user has set any of glibc's own
`MALLOC_*_` variables or `COSA_MALLOC=system`: their choice wins.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# mallopt parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_MAX = -4

# Return heap memory to the kernel only above 1 GiB of free space at its top, and grow it in
# steps of 256 MiB: a step's temporaries come from the heap again without a system call.
TRIM_THRESHOLD_BYTES = 1 << 30
TOP_PAD_BYTES = 256 << 20

USER_SETTINGS = (
    "MALLOC_MMAP_MAX_",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "GLIBC_TUNABLES",
)
OPT_OUT = "COSA_MALLOC"  # "system": keep the C library's defaults

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Make glibc keep freed blocks in the heap instead of returning them to the kernel.

    Safe to call more than once (the first call decides) and on any platform.

    Returns:
        True when the settings are in force in this process, False where they do not apply or
        the user opted out.
    """
    global _applied
    if _applied is None:
        _applied = _apply()
    return _applied


def _apply() -> bool:
    if os.environ.get(OPT_OUT, "").strip().lower() == "system":
        return False
    if any(name in os.environ for name in USER_SETTINGS):
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return False  # musl and others: mallopt differs or does nothing
    mallopt = libc.mallopt
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success, 0 on error. No mmap for large blocks: they come from the heap
    # (or, for a thread's arena that cannot hold one, the main heap).
    return all(
        mallopt(parameter, value) == 1
        for parameter, value in (
            (M_MMAP_MAX, 0),
            (M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES),
            (M_TOP_PAD, TOP_PAD_BYTES),
        )
    )
