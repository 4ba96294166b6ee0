"""Take over an aiohttp server connection after a ``101 Switching Protocols`` and use it as a raw byte stream.

aiohttp delivers the bytes that follow an upgrade request to whatever parser ``set_parser`` installs (that is how
its own WebSocket support works). :func:`hijack` installs a pass-through parser feeding an ``asyncio.StreamReader``
and returns that reader with a writer that respects the transport's flow control. Used by the kubelet (SPDY
streams) and by the apiserver (the byte pipe to a kubelet after its 101).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping

from aiohttp import web

READ_LIMIT = 1 << 20
FORWARD_HIGH_WATER = 1 << 20
UPGRADE_RESPONSE: web.RequestKey[web.StreamResponse] = web.RequestKey("kplane.upgrade_response", web.StreamResponse)


class _PassThrough:
    def __init__(self, reader: asyncio.StreamReader) -> None:
        self.reader = reader

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        self.reader.feed_data(data)
        return False, b""

    def feed_eof(self) -> None:
        self.reader.feed_eof()


class RawWriter:
    def __init__(self, request: web.Request) -> None:
        transport = request.transport
        assert transport is not None
        self.transport = transport
        self.protocol = request.protocol

    def write(self, data: bytes) -> None:
        if not self.transport.is_closing():
            self.transport.write(data)

    async def drain(self) -> None:
        if self.transport.is_closing():
            raise ConnectionResetError("connection closed")
        helper = getattr(self.protocol, "_drain_helper", None)
        if helper is not None:
            await helper()

    def close(self) -> None:
        self.transport.close()

    def is_closing(self) -> bool:
        return self.transport.is_closing()

    async def wait_closed(self) -> None:
        return None


class _Forward:
    """The parser for :func:`hijack_into`: each chunk aiohttp hands over is written to ``dst`` at once."""

    def __init__(self, src: asyncio.Transport, dst: asyncio.StreamWriter, done: asyncio.Future[None]) -> None:
        self.src, self.dst, self.done = src, dst, done
        self.paused = False
        self._resume_task: asyncio.Task[None] | None = None

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        if data and not self.dst.is_closing():
            self.dst.write(data)
            if not self.paused and self.dst.transport.get_write_buffer_size() > FORWARD_HIGH_WATER:
                self.paused = True
                self.src.pause_reading()
                self._resume_task = asyncio.get_running_loop().create_task(self._resume())
        return False, b""

    async def _resume(self) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            await self.dst.drain()
        self.paused = False
        if not self.src.is_closing():
            self.src.resume_reading()

    def feed_eof(self) -> None:
        with contextlib.suppress(OSError, RuntimeError):
            if self.dst.can_write_eof():
                self.dst.write_eof()
        if not self.done.done():
            self.done.set_result(None)


async def hijack_into(request: web.Request, headers: Mapping[str, str], dst: asyncio.StreamWriter, *,
                      reason: str = "Switching Protocols") -> tuple[web.StreamResponse, asyncio.Future[None],
                                                                   RawWriter]:
    """Like :func:`hijack`, but the client's bytes go straight to ``dst`` as aiohttp hands them over: no reader,
    no copy and no task wake-up per chunk. The client's socket is paused while ``dst`` holds more than
    ``FORWARD_HIGH_WATER`` unsent bytes. Returns (response to return from the handler, a future done at the
    client's EOF, which is passed on to ``dst`` when it can take one, and a writer back to the client)."""
    resp = web.StreamResponse(status=101, reason=reason)
    for k, v in headers.items():
        resp.headers[k] = v
    resp.force_close()
    await resp.prepare(request)
    if request.transport is None:
        raise ConnectionResetError("the client is gone")
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    request.protocol.set_parser(_Forward(request.transport, dst, done))  # type: ignore[arg-type]
    request[UPGRADE_RESPONSE] = resp
    return resp, done, RawWriter(request)


async def hijack(request: web.Request, headers: Mapping[str, str], *, reason: str = "Switching Protocols",
                 limit: int = READ_LIMIT) -> tuple[web.StreamResponse, asyncio.StreamReader, RawWriter]:
    """Send ``101`` with ``headers`` and return (response to return from the handler, reader, writer).

    The handler must return that response (also kept as ``request[UPGRADE_RESPONSE]``) once it is done with the
    connection, so aiohttp writes nothing more on it."""
    resp = web.StreamResponse(status=101, reason=reason)
    for k, v in headers.items():
        resp.headers[k] = v
    resp.force_close()
    await resp.prepare(request)
    reader = asyncio.StreamReader(limit=limit)
    if request.transport is not None:
        reader.set_transport(request.transport)  # the reader pauses the socket when its buffer is full
    request.protocol.set_parser(_PassThrough(reader))  # type: ignore[arg-type]
    request[UPGRADE_RESPONSE] = resp
    return resp, reader, RawWriter(request)


async def pipe(reader: asyncio.StreamReader, write: RawWriter | asyncio.StreamWriter, *, chunk: int = 65536) -> None:
    """Copy until EOF, honouring the destination's flow control."""
    try:
        while True:
            data = await reader.read(chunk)
            if not data:
                break
            write.write(data)
            await write.drain()
    except (ConnectionError, asyncio.IncompleteReadError, OSError):
        pass
    finally:
        if isinstance(write, asyncio.StreamWriter):
            with contextlib.suppress(OSError, RuntimeError):
                if write.can_write_eof():
                    write.write_eof()
