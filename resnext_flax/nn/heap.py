"""Freed large blocks kept in glibc's heap for the next call, as an inference runtime's arena
keeps them.

XLA:CPU allocates a program's buffers anew on every call. glibc serves blocks above its mmap
threshold (at most 32 MiB) with fresh ``mmap`` pages and unmaps them when they are freed, so each
call of a large program pays a page fault, and the kernel's zeroing, per 4 KiB page of its
activations, on whichever thread first writes them. With glibc's mmap and trimming turned off
(``mallopt``), freed blocks stay in the heap and the next call reuses them. The cost: the
process keeps its peak heap instead of returning freed memory to the OS.

:func:`keep_freed_memory` applies it once per process (``optimize_for_inference`` calls it on
the CPU); ``RESNEXT_FLAX_MALLOC_DEFAULTS=1`` leaves glibc's settings alone. Other C libraries
and operating systems are left as they are.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import sys

logger = logging.getLogger(__name__)

#: Set to 1 to leave glibc's malloc settings as they are.
DEFAULTS_ENV = "RESNEXT_FLAX_MALLOC_DEFAULTS"

# mallopt(3) parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
#: No block served by mmap; trim the heap only above this (never, in practice).
SETTINGS = {_M_MMAP_MAX: 0, _M_TRIM_THRESHOLD: 2**31 - 1}


def _opted_out() -> bool:
    return os.environ.get(DEFAULTS_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - raises where the C library is not glibc
        return libc
    except (OSError, AttributeError):
        return None


@functools.cache
def keep_freed_memory() -> bool:
    """Turns glibc's mmap and heap trimming off, once per process; whether they are off."""
    if _opted_out():
        return False
    libc = _glibc()
    if libc is None:
        return False
    for option, value in SETTINGS.items():
        if libc.mallopt(ctypes.c_int(option), ctypes.c_int(value)) != 1:
            logger.info("mallopt(%d, %d) failed; glibc's malloc settings may be partly "
                        "changed", option, value)
            return False
    logger.info("glibc's mmap and heap trimming turned off: freed buffers are reused by the "
                "next call (%s=1 leaves them on)", DEFAULTS_ENV)
    return True
