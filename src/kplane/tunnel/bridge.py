"""Turn any byte stream (an SSH channel, a TLS connection to a proxy, a tunnelled connection) into a plain socket.

The apiserver's dialers all return a *connected, non-blocking socket* so that callers can wrap it the same way
whatever the egress (``asyncio.open_connection(sock=s, ssl=ctx, server_hostname=...)`` for the kubelet, plain for
the HTTP proxy). When the bytes do not arrive on a kernel socket of their own, :func:`socket_for_stream` makes a
``socketpair``: one end is returned, the other is pumped to and from the stream by two copy loops.

Flow control: each loop writes, then awaits the destination's ``drain()`` before it reads again, so a slow reader
on either side stops the copy, which stops reading the source, which (for SSH) stops extending the channel window.
Nothing is buffered without bound. Half-close is passed through both ways (EOF becomes ``write_eof``). When one
direction fails, or both reach EOF, both ends are closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import Protocol

log = logging.getLogger(__name__)

CHUNK = 64 * 1024

# Bridges run as background tasks; keep a reference so they are not garbage collected mid-flight.
_TASKS: set[asyncio.Task[None]] = set()


class ByteReader(Protocol):
    async def read(self, n: int = -1) -> bytes: ...


class ByteWriter(Protocol):
    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...

    def write_eof(self) -> None: ...

    def close(self) -> None: ...


async def _copy(src: ByteReader, dst: ByteWriter, what: str) -> None:
    while True:
        data = await src.read(CHUNK)
        if not data:
            break
        dst.write(data)
        await dst.drain()
    try:
        dst.write_eof()
    except (OSError, RuntimeError, NotImplementedError) as exc:  # the peer is gone already
        log.debug("%s: cannot pass EOF on: %s", what, exc)


async def _bridge(local_r: asyncio.StreamReader, local_w: asyncio.StreamWriter,
                  remote_r: ByteReader, remote_w: ByteWriter, name: str) -> None:
    up = asyncio.ensure_future(_copy(local_r, remote_w, f"{name} (to remote)"))
    down = asyncio.ensure_future(_copy(remote_r, local_w, f"{name} (to local)"))
    try:
        pending = {up, down}
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            failed = [t for t in done if not t.cancelled() and t.exception() is not None]
            if failed:
                log.debug("%s: closing: %s", name, failed[0].exception())
                break
    except asyncio.CancelledError:
        pass
    finally:
        for t in (up, down):
            t.cancel()
        for t in (up, down):
            with contextlib.suppress(BaseException):
                await t
        with contextlib.suppress(Exception):
            remote_w.close()
        with contextlib.suppress(Exception):
            local_w.close()


async def socket_for_stream(reader: ByteReader, writer: ByteWriter, *, name: str = "stream") -> socket.socket:
    """Return a connected, non-blocking socket whose peer is ``reader``/``writer``.

    The caller owns the returned socket; closing it ends the bridge (and closes ``writer``)."""
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        mine.setblocking(False)
        theirs.setblocking(False)
        local_r, local_w = await asyncio.open_connection(sock=theirs, limit=CHUNK)
    except BaseException:
        mine.close()
        theirs.close()
        writer.close()
        raise
    task = asyncio.ensure_future(_bridge(local_r, local_w, reader, writer, name))
    _TASKS.add(task)
    task.add_done_callback(_TASKS.discard)
    return mine


async def close_all_bridges() -> None:
    """Stop every running bridge (tests and shutdown)."""
    tasks = list(_TASKS)
    for t in tasks:
        t.cancel()
    for t in tasks:
        with contextlib.suppress(BaseException):
            await t
