"""Take over an aiohttp server connection after a ``101 Switching Protocols`` and use it as a raw byte stream.

After the ``101``, :func:`take_over` gives the connection a protocol of our own (``transport.set_protocol``), a
``BufferedProtocol``, so asyncio's TLS layer decrypts straight into one reused buffer and the bytes are pushed to a
:class:`ByteSink` as they come: no bytes object per TLS record, no join, no reader, no task wake-up. Bytes aiohttp
already holds (sent with the request) are handed over first through ``set_parser``, the hook its own WebSocket
support uses. aiohttp's protocol still hears about write flow control and the connection's end, so the handler and
the writer back to the client (:class:`RawWriter`, which respects the transport's flow control) work as before.
:func:`hijack_into` (the apiserver's byte pipe to a kubelet or proxied backend) and :func:`hijack_push` (the
kubelet's SPDY sessions) are built on it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping
from typing import Protocol

from aiohttp import web

READ_LIMIT = 1 << 20
FORWARD_HIGH_WATER = 1 << 20
TAKEOVER_BUFFER = 256 * 1024  # as much as asyncio's TLS layer hands over at once
UPGRADE_RESPONSE: web.RequestKey[web.StreamResponse] = web.RequestKey("kplane.upgrade_response", web.StreamResponse)


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


class ByteSink(Protocol):
    """Where :func:`take_over` pushes a connection's bytes. ``data`` gets a view of a buffer that is reused as soon
    as it returns: it must use or copy the bytes before returning."""

    def data(self, view: memoryview) -> None: ...

    def eof(self) -> None: ...


class _Capture:
    """aiohttp parser that keeps what it is handed (bytes that came in with the upgrade request)."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.eof = False

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        if data:
            self.chunks.append(bytes(data))
        return False, b""

    def feed_eof(self) -> None:
        self.eof = True


class _TakenOver(asyncio.BufferedProtocol):
    def __init__(self, original: asyncio.BaseProtocol, sink: ByteSink, size: int) -> None:
        self.original = original
        self.sink = sink
        self.view = memoryview(bytearray(size))
        self.ended = False

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.view

    def buffer_updated(self, nbytes: int) -> None:
        self.sink.data(self.view[:nbytes])

    def eof_received(self) -> bool | None:
        self._end()
        return None  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._end()
        self.original.connection_lost(exc)  # aiohttp ends the request and its handler as for any lost client

    def _end(self) -> None:
        if not self.ended:
            self.ended = True
            self.sink.eof()

    def pause_writing(self) -> None:
        self.original.pause_writing()

    def resume_writing(self) -> None:
        self.original.resume_writing()


def take_over(request: web.Request, sink: ByteSink, *, size: int = TAKEOVER_BUFFER) -> asyncio.Transport:
    """Give the upgraded connection of ``request`` to ``sink`` (call it once the ``101`` is sent). Bytes that came
    with the request are pushed first. Returns the transport, for ``pause_reading``/``resume_reading``."""
    transport = request.transport
    if transport is None or transport.is_closing():
        raise ConnectionResetError("the client is gone")
    capture = _Capture()
    request.protocol.set_parser(capture)  # type: ignore[arg-type]  # aiohttp hands over what it holds
    taken = _TakenOver(request.protocol, sink, size)
    transport.set_protocol(taken)
    for chunk in capture.chunks:
        sink.data(memoryview(chunk))
    if capture.eof:
        taken._end()
    return transport


class BoundedWriter:
    """Writes to ``dst`` as bytes come. While ``dst`` holds more than ``high_water`` unsent bytes, ``pause`` is called,
    and ``resume`` once it has drained: whoever feeds this stops reading meanwhile, so nothing piles up."""

    def __init__(self, dst: asyncio.StreamWriter, high_water: int, pause: Callable[[], None],
                 resume: Callable[[], None]) -> None:
        self.dst, self.high_water = dst, high_water
        self._pause, self._resume = pause, resume
        self._draining: asyncio.Task[None] | None = None

    def write(self, data: bytes) -> None:
        if not data or self.dst.is_closing():
            return
        self.dst.write(data)
        if self._draining is None and self.dst.transport.get_write_buffer_size() > self.high_water:
            self._pause()
            self._draining = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            await self.dst.drain()
        self._draining = None
        self._resume()

    def write_eof(self) -> None:
        with contextlib.suppress(OSError, RuntimeError):
            if not self.dst.is_closing() and self.dst.can_write_eof():
                self.dst.write_eof()

    def cancel(self) -> None:
        if self._draining is not None:
            self._draining.cancel()


class _Pipe:
    """The sink of :func:`hijack_into`: each chunk is written to ``dst`` at once; the client's connection stops
    being read while ``dst`` holds more than ``FORWARD_HIGH_WATER`` unsent bytes."""

    def __init__(self, dst: asyncio.StreamWriter, done: asyncio.Future[None]) -> None:
        self.src: asyncio.Transport | None = None
        self.out = BoundedWriter(dst, FORWARD_HIGH_WATER, self._pause_src, self._resume_src)
        self.done = done

    def _pause_src(self) -> None:
        if self.src is not None:
            self.src.pause_reading()

    def _resume_src(self) -> None:
        if self.src is not None and not self.src.is_closing():
            self.src.resume_reading()

    def data(self, view: memoryview) -> None:
        self.out.write(bytes(view))

    def eof(self) -> None:
        self.out.write_eof()
        if not self.done.done():
            self.done.set_result(None)


async def _send_101(request: web.Request, headers: Mapping[str, str], reason: str) -> web.StreamResponse:
    resp = web.StreamResponse(status=101, reason=reason)
    for k, v in headers.items():
        resp.headers[k] = v
    resp.force_close()
    await resp.prepare(request)
    request[UPGRADE_RESPONSE] = resp
    return resp


async def hijack_into(request: web.Request, headers: Mapping[str, str], dst: asyncio.StreamWriter, *,
                      reason: str = "Switching Protocols") -> tuple[web.StreamResponse, asyncio.Future[None],
                                                                   RawWriter]:
    """Send ``101`` with ``headers``; from then on the client's bytes go straight to ``dst`` as they are received
    (:func:`take_over`). Returns (response to return from the handler, a future done at the client's EOF, which is
    passed on to ``dst`` when it can take one, and a writer back to the client)."""
    resp = await _send_101(request, headers, reason)
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    pipe_sink = _Pipe(dst, done)
    writer = RawWriter(request)
    pipe_sink.src = take_over(request, pipe_sink)
    return resp, done, writer


class PushSource:
    """A taken-over connection's bytes for one consumer that :meth:`attach` es callbacks. Until it is attached at
    most ``limit`` bytes wait here before the connection stops being read."""

    def __init__(self, limit: int = READ_LIMIT) -> None:
        self.transport: asyncio.Transport | None = None
        self.limit = limit
        self._pending: list[bytes] = []
        self._size = 0
        self._eof = False
        self._on_data: Callable[[memoryview], None] | None = None
        self._on_eof: Callable[[], None] | None = None

    # ByteSink
    def data(self, view: memoryview) -> None:
        if self._on_data is not None:
            self._on_data(view)
            return
        self._pending.append(bytes(view))
        self._size += len(view)
        if self._size > self.limit:
            self.pause()

    def eof(self) -> None:
        if self._eof:
            return
        self._eof = True
        if self._on_eof is not None:
            self._on_eof()

    # the consumer
    def pause(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def attach(self, on_data: Callable[[memoryview], None], on_eof: Callable[[], None]) -> None:
        """From now on every chunk goes to ``on_data`` as it arrives (what waited here first), the end to
        ``on_eof``."""
        pending, self._pending, self._size = self._pending, [], 0
        self._on_data, self._on_eof = on_data, on_eof
        for chunk in pending:
            on_data(memoryview(chunk))
        self.resume()
        if self._eof:
            on_eof()


async def hijack_push(request: web.Request, headers: Mapping[str, str], *, reason: str = "Switching Protocols",
                      limit: int = READ_LIMIT) -> tuple[web.StreamResponse, PushSource, RawWriter]:
    """Send ``101`` with ``headers`` and :func:`take_over` the connection into a :class:`PushSource`. The handler
    must return the response (also kept as ``request[UPGRADE_RESPONSE]``) once it is done with the connection."""
    resp = await _send_101(request, headers, reason)
    source = PushSource(limit)
    writer = RawWriter(request)
    source.transport = take_over(request, source)
    return resp, source, writer


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
