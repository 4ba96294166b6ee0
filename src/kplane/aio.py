"""Small asyncio helpers shared by every long-running component."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import os
from collections.abc import Iterable
from typing import Any


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any] | None]) -> None:
    """Cancel ``tasks`` (all first), then wait for each to end. Their exceptions are not raised again: the tasks
    are being torn down."""
    live = [t for t in tasks if t is not None]
    for t in live:
        t.cancel()
    for t in live:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await t


def freeze_startup_heap() -> None:
    """Call once a server has started: what it allocated so far (modules, classes, its PKI and first caches) lives as
    long as the process, so it is moved out of the cyclic collector's view (``gc.freeze``). A full collection then
    walks only what came after, instead of stalling the event loop for tens of milliseconds (measured: 29-33 ms in
    the apiserver under the API benchmark) to find nothing in the startup heap."""
    gc.freeze()


M_TRIM_THRESHOLD = -1  # glibc's mallopt() parameter numbers
M_MMAP_THRESHOLD = -3


def tune_malloc(mmap_threshold: int = 8 << 20, trim_threshold: int = 32 << 20) -> bool:
    """Call once at process start: let glibc's malloc keep the memory of freed large buffers (``mallopt``).

    Streaming moves bytes in buffers of 64 KiB to 1 MiB (socket reads, gRPC messages, TLS records), allocated and
    freed thousands of times a second, several alive at once. By default glibc serves such sizes with fresh
    ``mmap`` pages or hands freed heap tops back to the kernel, so nearly every buffer is page-faulted and zeroed
    anew (measured: page faults and their zeroing were about 8 % of the main thread's CPU with port-forward through
    Konnectivity). Below ``mmap_threshold`` allocations now come from the heap, and up to ``trim_threshold`` bytes
    of free heap stay with the process. Returns False (and changes nothing) when the C library has no mallopt or
    the environment already tunes malloc (``GLIBC_TUNABLES`` naming glibc.malloc, ``MALLOC_*_``)."""
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "") or any(
            os.environ.get(k) for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(M_TRIM_THRESHOLD, trim_threshold))
