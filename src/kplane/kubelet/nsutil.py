"""Linux namespaces from Python through ctypes (Python 3.11 has no ``os.setns``/``os.unshare``).

Kept apart from :mod:`kplane.kubelet.podnet` on purpose: the node's container shim imports only this, so it stays
a small interpreter (no asyncio, no netlink)."""

from __future__ import annotations

import ctypes
import os

CLONE_NEWNET = 0x40000000

_libc: ctypes.CDLL | None = None


def _lib() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def setns(fd: int, nstype: int = CLONE_NEWNET) -> None:
    if _lib().setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def unshare(flags: int = CLONE_NEWNET) -> None:
    if _lib().unshare(flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare: {os.strerror(err)}")


def enter_netns(path: str) -> None:
    """Move the calling thread (the whole process when it has one thread) into a network namespace."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        setns(fd)
    finally:
        os.close(fd)
