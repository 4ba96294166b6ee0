"""asyncio adapters: server-side exec/attach and port-forward sessions.

Theory of operation
===================

The protocol logic lives in the sans-I/O modules (:mod:`.spdy`, :mod:`.channels`); this
module only moves bytes between them and asyncio objects.

Transports
----------
A SPDY session runs over any ``(reader, writer)`` pair that looks like asyncio's streams
(``await reader.read(n)``; ``writer.write(b)``, ``await writer.drain()``, ``writer.close()``,
``await writer.wait_closed()``).  Three sources exist:

* a raw TCP/TLS connection (``asyncio.start_server``), as in the tests;
* an aiohttp request upgraded with :func:`accept_spdy_upgrade` (HTTP ``101`` then raw bytes);
* a WebSocket carrying SPDY as a byte stream (``SPDY/3.1+portforward.k8s.io``):
  :func:`tunnel_spdy_over_websocket`.

:class:`SpdySession` owns one :class:`~.spdy.SpdyConnection`.  A single reader task feeds
socket bytes into it and dispatches events; every sender writes frames synchronously to
the writer, then ``await drain()`` (socket back-pressure).  Each stream's inbound data goes
into its own ``asyncio.StreamReader``, bounded by a fake "transport" (:class:`_Gate`) whose
``pause_reading``/``resume_reading`` the StreamReader calls itself when its buffer crosses
the limit.  SPDY (as spdystream speaks it) has no flow control, so when a stream's buffer
is full the reader task stops reading the socket -- but only for ``stall_timeout`` seconds;
a stream that stays stalled longer is reset (``RST_STREAM CANCEL``) so that it cannot hold
up the other streams.  Nothing is buffered without bound.

exec / attach
-------------
:func:`spdy_remotecommand` and :func:`websocket_remotecommand` both return a
:class:`RemoteCommandSession`: ``stdin`` (StreamReader or None), ``write_stdout``,
``write_stderr``, a ``resize`` queue of ``(width, height)`` and ``finish(exit_code, error)``
which writes the status on the error channel and ends the session as the clients expect
(SPDY: RST stdin/resize, FIN stdout/stderr/error, then wait for the client to hang up;
WebSocket: status on channel 3, close 1000).

port-forward
------------
The transports differ but the per-connection work is the same, so it is behind
:class:`PortForwardHandler` -- ``handle(port, reader_from_client, writer_to_client,
send_error)``.  :class:`DialHandler` is the standard one: dial the pod port and pump both
ways.  :func:`spdy_portforward` pairs ``error``/``data`` streams by ``requestID`` and runs a
handler per pair (many in parallel); :func:`websocket_portforward` runs one handler per
port for ``v4.channel.k8s.io``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from typing import Any, Protocol

from aiohttp import WSMsgType, web

from kplane.httpupgrade import BoundedWriter, PushSource, hijack_push

from . import channels
from .channels import ChannelError, ResizeDecoder, protocol_info, status_payload
from .spdy import (
    RST_CANCEL,
    RST_PROTOCOL_ERROR,
    RST_REFUSED_STREAM,
    Data,
    GoAway,
    Headers,
    RstStream,
    SpdyConnection,
    SpdyLocalError,
    SpdyProtocolError,
    SynReply,
    SynStream,
)

__all__ = [
    "DEFAULT_STREAM_CREATION_TIMEOUT",
    "DialHandler",
    "PortForwardHandler",
    "RemoteCommandSession",
    "SpdySession",
    "SpdyStream",
    "accept_spdy_upgrade",
    "negotiate_spdy",
    "spdy_portforward",
    "spdy_remotecommand",
    "tunnel_spdy_over_websocket",
    "websocket_portforward",
    "websocket_remotecommand",
]

log = logging.getLogger(__name__)

DEFAULT_STREAM_CREATION_TIMEOUT = 30.0
DEFAULT_STREAM_LIMIT = 1 << 20  # bytes buffered per inbound stream before pausing
DEFAULT_STALL_TIMEOUT = 5.0  # how long one full stream may hold up the connection
CHUNK = 32 * 1024


# --------------------------------------------------------------------------- small pieces


class ByteReader(Protocol):
    async def read(self, n: int = -1) -> bytes: ...


class ByteWriter(Protocol):
    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...

    def close(self) -> None: ...

    async def wait_closed(self) -> None: ...


class ClientWriter(Protocol):
    """The writing half handed to port-forward handlers (asyncio.StreamWriter-like)."""

    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...

    def write_eof(self) -> None: ...

    def close(self) -> None: ...

    def is_closing(self) -> bool: ...


class _Gate:
    """Stand-in transport for an ``asyncio.StreamReader`` we feed ourselves.

    The StreamReader calls ``pause_reading`` when its buffer exceeds twice its limit and
    ``resume_reading`` once a read brings it back under the limit; we just record that.
    """

    def __init__(self) -> None:
        self._running = asyncio.Event()
        self._running.set()

    def pause_reading(self) -> None:
        self._running.clear()

    def resume_reading(self) -> None:
        self._running.set()

    @property
    def paused(self) -> bool:
        return not self._running.is_set()

    async def wait(self, limit_s: float | None) -> bool:
        """Wait until not paused; False if still paused after ``limit_s`` seconds."""
        if self._running.is_set():
            return True
        try:
            await asyncio.wait_for(self._running.wait(), limit_s)
        except TimeoutError:
            return False
        return True

    # the rest of the transport surface StreamReader may touch
    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


def _bounded_reader(limit: int) -> tuple[asyncio.StreamReader, _Gate]:
    reader = asyncio.StreamReader(limit=max(1, limit // 2))
    gate = _Gate()
    reader.set_transport(gate)  # type: ignore[arg-type]
    return reader, gate


# --------------------------------------------------------------------------- handshake


def _header_values(headers: Mapping[str, str], name: str) -> list[str]:
    getall = getattr(headers, "getall", None)
    raw = list(getall(name, [])) if getall is not None else (
        [headers[name]] if name in headers else [])
    return [p.strip() for v in raw for p in v.split(",") if p.strip()]


def negotiate_spdy(request_headers: Mapping[str, str],
                   supported: Iterable[str] = channels.REMOTECOMMAND_SPDY_PROTOCOLS,
                   ) -> tuple[str | None, web.Response | None]:
    """Choose the stream protocol for a SPDY upgrade request.

    Returns ``(protocol, None)`` on success or ``(None, response)`` with the error to send:
    400 for missing upgrade headers or no ``X-Stream-Protocol-Version``; 403 (with one
    ``X-Accepted-Stream-Protocol-Versions`` header per supported protocol) when nothing
    matches.  The client's order decides.
    """
    supported = list(supported)
    conn = ",".join(_header_values(request_headers, "Connection")).lower()
    upgrade = ",".join(_header_values(request_headers, "Upgrade")).lower()
    if "upgrade" not in conn or "spdy/3.1" not in upgrade:
        return None, web.Response(status=400, text="unable to upgrade: missing upgrade headers in request")
    offered = _header_values(request_headers, "X-Stream-Protocol-Version")
    if not offered:
        return None, web.Response(
            status=400, text="unable to upgrade: unable to negotiate protocol: client supports no protocols")
    for proto in offered:
        if proto in supported:
            return proto, None
    resp = web.Response(
        status=403,
        text=f"unable to upgrade: unable to negotiate protocol: client supports {offered}, "
             f"server supports {supported}")
    for proto in supported:
        resp.headers.add("X-Accepted-Stream-Protocol-Versions", proto)
    return None, resp


async def accept_spdy_upgrade(request: web.Request, protocol: str, *,
                              limit: int = DEFAULT_STREAM_LIMIT) -> tuple[PushSource, ByteWriter]:
    """Send ``101 Switching Protocols`` for a SPDY upgrade and return the raw byte streams. The reading side is a
    :class:`~kplane.httpupgrade.PushSource`: a :class:`SpdySession` over it parses each chunk as the connection
    delivers it instead of reading it from a buffer.

    The aiohttp handler must keep running (awaiting the session) until the session ends, then return
    ``request[kplane.httpupgrade.UPGRADE_RESPONSE]``.
    """
    _resp, reader, writer = await hijack_push(request, {
        "Connection": "Upgrade", "Upgrade": "SPDY/3.1", "X-Stream-Protocol-Version": protocol},
        limit=max(1, limit // 2))
    return reader, writer


# --------------------------------------------------------------------------- SPDY session


class SpdyStream:
    """One SPDY stream as asyncio objects: ``reader`` (StreamReader) + writer methods."""

    def __init__(self, session: SpdySession, stream_id: int, headers: dict[str, list[str]]) -> None:
        self.session = session
        self.id = stream_id
        self.headers = headers
        self.reader, self._gate = _bounded_reader(session.stream_limit)
        self.reset_by_peer = False
        self._on_reset: list[Callable[[], object]] = []
        local = stream_id % 2 == (0 if session.server else 1)
        # locally created streams wait for the peer's SYN_REPLY
        self._replied: asyncio.Future[None] | None = (
            asyncio.get_running_loop().create_future() if local else None)
        self._finished = False
        self._remote_fin = False  # the peer's FIN came (as a DATA/SYN/HEADERS flag)
        # pipe_to(): inbound DATA goes straight to a writer instead of self.reader
        self._sink: Callable[[bytes], None] | None = None
        self._sink_eof: Callable[[], None] | None = None

    def header(self, name: str) -> str | None:
        v = self.headers.get(name.lower())
        return v[0] if v else None

    def __repr__(self) -> str:
        return f"<SpdyStream {self.id} {self.headers}>"

    # --- writing (asyncio.StreamWriter-like) ---
    def write(self, data: bytes) -> None:
        conn = self.session.conn
        if not conn.can_send(self.id):
            raise ConnectionResetError(f"SPDY stream {self.id} is closed")
        if data:
            conn.data(self.id, data)
            self.session.flush()

    async def drain(self) -> None:
        await self.session.drain()

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        conn = self.session.conn
        if conn.can_send(self.id):
            conn.data(self.id, b"", fin=True)
            self.session.flush()

    def close(self) -> None:
        self.write_eof()

    def is_closing(self) -> bool:
        return not self.session.conn.can_send(self.id)

    async def wait_closed(self) -> None:
        return None

    def reset(self, status: int = RST_CANCEL) -> None:
        """Abort the stream in both directions."""
        if self._finished:
            return
        self._finished = True
        if self.id in self.session.conn.open_streams():
            self.session.conn.rst(self.id, status)
            self.session.flush()
        self.reader.feed_eof()
        self.session.streams.pop(self.id, None)

    def accept(self) -> None:
        """SYN_REPLY (empty headers) to a peer-created stream."""
        self.session.conn.syn_reply(self.id)
        self.session.flush()

    def on_reset(self, cb: Callable[[], object]) -> None:
        self._on_reset.append(cb)

    async def pipe_to(self, dst: asyncio.StreamWriter, high_water: int = 1 << 20) -> None:
        """Write everything the peer sends on this stream to ``dst`` until its FIN (passed on as ``dst``'s EOF) or
        a reset: what :attr:`reader` holds first, then each DATA frame as the session parses it, with no reader,
        copy or task wake-up in between. While ``dst`` has more than ``high_water`` bytes unsent the stream counts
        as full, so the session stops reading the connection (and resets the stream after its stall timeout, as
        for a full reader)."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        out = BoundedWriter(dst, high_water, self._gate.pause_reading, self._gate.resume_reading)

        def end() -> None:
            if not done.done():
                done.set_result(None)

        def eof() -> None:
            out.write_eof()
            end()

        self.on_reset(end)
        # What the reader holds goes first. With its EOF fed, read() returns at once every time and never gives the
        # loop a turn, so no DATA frame can be parsed until the sink below is in place.
        self.reader.feed_eof()
        with contextlib.suppress(ConnectionError):
            while data := await self.reader.read(1 << 20):
                out.write(data)
        self._sink, self._sink_eof = out.write, eof
        if self._finished or self._remote_fin:  # the peer finished before the pipe was set up
            eof()
        try:
            await done
        finally:
            self._sink = self._sink_eof = None
            out.cancel()

    # --- driven by the session ---
    def _peer_reset(self) -> None:
        self.reset_by_peer = True
        self._finished = True
        self.reader.feed_eof()
        if self._replied is not None and not self._replied.done():
            self._replied.set_exception(ConnectionResetError(f"stream {self.id} reset"))
        for cb in self._on_reset:
            cb()


class SpdySession:
    """Runs a :class:`SpdyConnection` over a byte reader/writer pair."""

    def __init__(self, reader: ByteReader | PushSource, writer: ByteWriter, *, server: bool = True,
                 on_stream: Callable[[SpdyStream], None] | None = None,
                 stream_limit: int = DEFAULT_STREAM_LIMIT,
                 stall_timeout: float = DEFAULT_STALL_TIMEOUT) -> None:
        self.reader = reader
        self.writer = writer
        self.server = server
        self.conn = SpdyConnection(server=server)
        self.streams: dict[int, SpdyStream] = {}
        self.on_stream = on_stream
        self.stream_limit = stream_limit
        self.stall_timeout = stall_timeout
        self.closed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._unstalling: asyncio.Task[None] | None = None

    def start(self) -> asyncio.Task[None]:
        if self._task is None:
            self._task = asyncio.create_task(self.run())
        return self._task

    def flush(self) -> None:
        out = self.conn.data_to_send()
        if out and not self.closed.is_set():
            self.writer.write(out)

    async def drain(self) -> None:
        if self.closed.is_set():
            raise ConnectionResetError("SPDY connection closed")
        await self.writer.drain()

    async def open_stream(self, headers: Mapping[str, str], *, reply_timeout: float = 30.0) -> SpdyStream:
        """Create a stream and wait for its SYN_REPLY (mostly for clients/tests)."""
        sid = self.conn.syn_stream(headers)
        stream = SpdyStream(self, sid, {k.lower(): [v] for k, v in headers.items()})
        self.streams[sid] = stream
        self.flush()
        assert stream._replied is not None
        await asyncio.wait_for(asyncio.shield(stream._replied), reply_timeout)
        return stream

    async def run(self) -> None:
        if isinstance(self.reader, PushSource):
            await self._run_pushed(self.reader)
            return
        try:
            while not self.conn.goaway_received:
                try:
                    data = await self.reader.read(1 << 18)
                except (ConnectionError, OSError):
                    break
                if not data:
                    break
                if self._receive(data) is None:
                    break
                if any(st._gate.paused for st in self.streams.values()):
                    await self._wait_stalled()
        finally:
            self._teardown()

    def _receive(self, data: bytes | memoryview) -> int | None:
        """Parse and dispatch one chunk: how many frames it completed (0 when it only held part of one, as a
        WebSocket tunnel's small messages do: nothing else can have changed then), None on a protocol error."""
        try:
            events = self.conn.receive_data(data)
        except SpdyProtocolError as e:
            log.info("SPDY protocol error from peer: %s", e)
            return None
        if events:
            for ev in events:
                self._dispatch(ev)
            self.flush()
        return len(events)

    async def _run_pushed(self, source: PushSource) -> None:
        """Each chunk is parsed as the connection delivers it; a full stream stops the connection being read
        until it drains (or is reset after ``stall_timeout``), as in the read loop."""
        def on_data(view: memoryview) -> None:
            if self.closed.is_set():
                return
            frames = self._receive(view)
            if frames == 0:
                return
            if frames is None or self.conn.goaway_received:
                self._teardown()
                return
            if self._unstalling is None and any(st._gate.paused for st in self.streams.values()):
                source.pause()
                self._unstalling = asyncio.get_running_loop().create_task(unstall())

        async def unstall() -> None:
            await self._wait_stalled()
            self._unstalling = None
            if not self.closed.is_set():
                source.resume()

        source.attach(on_data, self._teardown)
        try:
            await self.closed.wait()
        finally:
            self._teardown()

    def _dispatch(self, ev: object) -> None:
        if isinstance(ev, Data):
            st = self.streams.get(ev.stream_id)
            if st is None:
                return
            if ev.fin:
                st._remote_fin = True
            if st._sink is not None:
                if ev.data:
                    st._sink(ev.data)
                if ev.fin and st._sink_eof is not None:
                    st._sink_eof()
                return
            if ev.data:
                st.reader.feed_data(ev.data)
            if ev.fin:
                st.reader.feed_eof()
        elif isinstance(ev, SynStream):
            st = SpdyStream(self, ev.stream_id, ev.headers)
            self.streams[ev.stream_id] = st
            if ev.fin:
                st._remote_fin = True
                st.reader.feed_eof()
            if self.on_stream is None:
                st.reset(RST_REFUSED_STREAM)
            else:
                try:
                    self.on_stream(st)
                except Exception:
                    log.exception("stream handler failed")
                    st.reset(RST_PROTOCOL_ERROR)
        elif isinstance(ev, SynReply | Headers):
            st = self.streams.get(ev.stream_id)
            if st is not None:
                if isinstance(ev, SynReply) and st._replied is not None and not st._replied.done():
                    st._replied.set_result(None)
                if ev.fin:
                    st._remote_fin = True
                    if st._sink_eof is not None:
                        st._sink_eof()
                    else:
                        st.reader.feed_eof()
        elif isinstance(ev, RstStream):
            st = self.streams.pop(ev.stream_id, None)
            if st is not None:
                st._peer_reset()
        elif isinstance(ev, GoAway):
            log.debug("peer sent GOAWAY %s", ev)

    async def _wait_stalled(self) -> None:
        for st in list(self.streams.values()):
            if st._gate.paused and not await st._gate.wait(self.stall_timeout):
                log.info("SPDY stream %d stalled for %.1fs; resetting it", st.id, self.stall_timeout)
                st.reader.set_exception(ConnectionResetError("stream reset: consumer stalled"))
                st.reset(RST_CANCEL)
                for cb in st._on_reset:
                    cb()

    def _teardown(self) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        if self._unstalling is not None and self._unstalling is not asyncio.current_task():
            self._unstalling.cancel()
        for st in list(self.streams.values()):
            st._peer_reset()
        self.streams.clear()
        with contextlib.suppress(Exception):
            self.writer.close()

    async def close(self, *, goaway: bool = True) -> None:
        """Send GOAWAY (optionally) and close the transport; stops the reader task."""
        if not self.closed.is_set() and goaway:
            with contextlib.suppress(SpdyLocalError):
                self.conn.goaway()
            self.flush()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.writer.drain(), 5)
        self._teardown()
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.writer.wait_closed(), 5)


# --------------------------------------------------------------------------- exec / attach


class RemoteCommandSession(Protocol):
    """What an exec/attach implementation talks to, whatever the transport."""

    protocol: str
    stdin: asyncio.StreamReader | None
    resize: asyncio.Queue[tuple[int, int]] | None
    tty: bool
    disconnected: asyncio.Event  # set when the client went away

    async def write_stdout(self, data: bytes) -> None: ...

    async def write_stderr(self, data: bytes) -> None: ...

    async def finish(self, exit_code: int | None, error: str | None = None) -> None: ...


def _put_resize(q: asyncio.Queue[tuple[int, int]], size: tuple[int, int]) -> None:
    """Bounded queue where the newest size wins."""
    if q.full():
        with contextlib.suppress(asyncio.QueueEmpty):
            q.get_nowait()
    q.put_nowait(size)


def _expect_flags(expect: Collection[str]) -> tuple[bool, bool, bool, bool]:
    unknown = set(expect) - {"stdin", "stdout", "stderr", "tty"}
    if unknown:
        raise ValueError(f"unknown stream flags {sorted(unknown)}")
    tty = "tty" in expect
    return "stdin" in expect, "stdout" in expect, "stderr" in expect and not tty, tty


class SpdyRemoteCommand:
    """:class:`RemoteCommandSession` over SPDY streams."""

    def __init__(self, session: SpdySession, protocol: str, streams: dict[str, SpdyStream],
                 tty: bool, linger: float) -> None:
        self.session = session
        self.protocol = protocol
        self.streams = streams
        self.tty = tty
        self.linger = linger
        self.disconnected = session.closed
        self.stdin = streams["stdin"].reader if "stdin" in streams else None
        self.resize: asyncio.Queue[tuple[int, int]] | None = None
        self._resize_task: asyncio.Task[None] | None = None
        if "resize" in streams:
            self.resize = asyncio.Queue(maxsize=16)
            self._resize_task = asyncio.create_task(self._read_resize(streams["resize"].reader))
        self._finished = False

    async def _read_resize(self, reader: asyncio.StreamReader) -> None:
        assert self.resize is not None
        dec = ResizeDecoder()
        try:
            while data := await reader.read(4096):
                for size in dec.feed(data):
                    _put_resize(self.resize, size)
        except (ChannelError, ConnectionError) as e:
            log.info("resize stream ended: %s", e)

    async def _write(self, name: str, data: bytes) -> None:
        st = self.streams.get(name)
        if st is None or not data:
            return
        st.write(data)
        await st.drain()

    async def write_stdout(self, data: bytes) -> None:
        await self._write("stdout", data)

    async def write_stderr(self, data: bytes) -> None:
        await self._write("stderr", data)

    async def finish(self, exit_code: int | None, error: str | None = None) -> None:
        if self._finished:
            return
        self._finished = True
        if self._resize_task is not None:
            self._resize_task.cancel()
        try:
            for name in ("stdin", "resize"):
                if name in self.streams:
                    self.streams[name].reset(RST_CANCEL)
            payload = status_payload(self.protocol, exit_code, error)
            err = self.streams["error"]
            if payload and not err.is_closing():
                err.write(payload)
            for name in ("stdout", "stderr", "error"):
                if name in self.streams:
                    self.streams[name].write_eof()
            await self.session.drain()
            # Let the client read everything and hang up first (it sends RST + GOAWAY).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.session.closed.wait(), self.linger)
        except (ConnectionError, OSError):
            pass
        finally:
            await self.session.close(goaway=not self.session.closed.is_set())


async def spdy_remotecommand(reader: ByteReader | PushSource, writer: ByteWriter, protocol: str, *,
                             expect: Collection[str],
                             creation_timeout: float = DEFAULT_STREAM_CREATION_TIMEOUT,
                             linger: float = 60.0, stream_limit: int = DEFAULT_STREAM_LIMIT,
                             stall_timeout: float = DEFAULT_STALL_TIMEOUT) -> SpdyRemoteCommand:
    """Accept the client's exec/attach streams on a freshly upgraded SPDY connection.

    ``expect`` holds the request's flags among ``stdin``, ``stdout``, ``stderr``, ``tty``.
    Waits (up to ``creation_timeout``) for ``error`` plus the expected streams (``resize`` with a tty
    from v3 on; ``stderr`` is dropped with a tty), replying to each.  Raises TimeoutError
    (connection closed) if they do not all arrive.  ``linger`` bounds how long ``finish``
    waits for the client to hang up.
    """
    info = protocol_info(protocol)
    want_in, want_out, want_err, tty = _expect_flags(expect)
    expected = {"error"}
    expected |= {n for n, on in (("stdin", want_in), ("stdout", want_out), ("stderr", want_err)) if on}
    if tty and info.spdy_resize:
        expected.add("resize")
    got: dict[str, SpdyStream] = {}
    complete = asyncio.Event()

    def on_stream(st: SpdyStream) -> None:
        kind = st.header("streamtype")
        if kind not in channels.STREAM_TYPES or kind in got:
            st.reset(RST_PROTOCOL_ERROR)
            return
        st.accept()
        got[kind] = st
        if expected <= got.keys():
            complete.set()

    session = SpdySession(reader, writer, server=True, on_stream=on_stream,
                          stream_limit=stream_limit, stall_timeout=stall_timeout)
    task = session.start()
    waiter = asyncio.create_task(complete.wait())
    done, _ = await asyncio.wait({waiter, task}, timeout=creation_timeout,
                                 return_when=asyncio.FIRST_COMPLETED)
    if waiter not in done:
        waiter.cancel()
        await session.close()
        if task in done:
            raise ConnectionResetError("client went away before creating its streams")
        raise TimeoutError("timed out waiting for client to create streams")
    session.on_stream = lambda st: st.reset(RST_PROTOCOL_ERROR)
    if tty:
        got.pop("stderr", None)
    return SpdyRemoteCommand(session, protocol, got, tty, linger)


class WebSocketRemoteCommand:
    """:class:`RemoteCommandSession` over a k8s channel WebSocket (v1-v5, base64)."""

    def __init__(self, ws: web.WebSocketResponse, protocol: str, expect: Collection[str],
                 stream_limit: int) -> None:
        self.ws = ws
        self.protocol = protocol
        self.info = protocol_info(protocol)
        want_in, self._out, self._err, self.tty = _expect_flags(expect)
        self.disconnected = asyncio.Event()
        self.stdin: asyncio.StreamReader | None = None
        self._gate: _Gate | None = None
        if want_in:
            self.stdin, self._gate = _bounded_reader(stream_limit)
        self.resize: asyncio.Queue[tuple[int, int]] | None = asyncio.Queue(maxsize=16) if self.tty else None
        self._send_lock = asyncio.Lock()
        self._finished = False
        self._task: asyncio.Task[None] | None = None

    async def _send(self, channel: int, data: bytes) -> None:
        msg = channels.encode(channel, data, base64=self.info.base64)
        async with self._send_lock:
            if isinstance(msg, str):
                await self.ws.send_str(msg)
            else:
                await self.ws.send_bytes(msg)

    async def _start(self) -> None:
        # "connection established": an empty message on the lowest writable channel
        first = channels.STDOUT if self._out else channels.STDERR if self._err else channels.ERROR
        await self._send(first, b"")
        self._task = asyncio.create_task(self._read_loop())

    async def _read_loop(self) -> None:
        resize = ResizeDecoder()
        try:
            while True:
                msg = await self.ws.receive()
                if msg.type in (WSMsgType.BINARY, WSMsgType.TEXT):
                    if not msg.data:
                        continue
                    ch, data = channels.decode(msg.data, base64=self.info.base64)
                    if ch == channels.STDIN and self.stdin is not None:
                        if data:
                            self.stdin.feed_data(data)
                            assert self._gate is not None
                            await self._gate.wait(None)
                    elif ch == channels.RESIZE and self.resize is not None:
                        for size in resize.feed(data):
                            _put_resize(self.resize, size)
                    elif (ch == channels.CLOSE and self.info.supports_close
                          and channels.parse_close(data) == channels.STDIN and self.stdin is not None):
                        self.stdin.feed_eof()
                    # anything else: a channel we do not read -> dropped
                elif msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
                    break
        except ChannelError as e:
            log.info("remotecommand websocket protocol error: %s", e)
            with contextlib.suppress(Exception):
                await self.ws.close(code=1002, message=str(e).encode()[:120])
        except (ConnectionError, RuntimeError):
            pass
        finally:
            if self.stdin is not None:
                self.stdin.feed_eof()
            self.disconnected.set()

    async def write_stdout(self, data: bytes) -> None:
        if self._out and data:
            await self._send(channels.STDOUT, data)

    async def write_stderr(self, data: bytes) -> None:
        if self._err and data:
            await self._send(channels.STDERR, data)

    async def finish(self, exit_code: int | None, error: str | None = None) -> None:
        if self._finished:
            return
        self._finished = True
        try:
            payload = status_payload(self.info, exit_code, error)
            if payload:
                await self._send(channels.ERROR, payload)
            await self.ws.close(code=1000)
        except (ConnectionError, RuntimeError):
            pass
        finally:
            if self._task is not None:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self._task
            self.disconnected.set()


async def websocket_remotecommand(ws: web.WebSocketResponse, protocol: str | None = None, *,
                                  expect: Collection[str],
                                  stream_limit: int = DEFAULT_STREAM_LIMIT) -> WebSocketRemoteCommand:
    """Start an exec/attach session on a prepared WebSocket (``ws.prepare`` already done).

    Create the response with ``protocols=channels.REMOTECOMMAND_WS_PROTOCOLS``; the
    negotiated ``ws.ws_protocol`` is used unless ``protocol`` is given (None = v1 binary).
    """
    sess = WebSocketRemoteCommand(ws, protocol if protocol is not None else (ws.ws_protocol or ""),
                                  expect, stream_limit)
    await sess._start()
    return sess


# --------------------------------------------------------------------------- port-forward

SendError = Callable[[str], Awaitable[None]]
Dial = Callable[[int], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


class PortForwardHandler(Protocol):
    async def handle(self, port: int, reader_from_client: asyncio.StreamReader,
                     writer_to_client: ClientWriter, send_error: SendError) -> None: ...


class DialHandler:
    """Forward one client connection to ``dial(port)`` and pump bytes both ways."""

    def __init__(self, dial: Dial, *, describe: str = "pod") -> None:
        self.dial = dial
        self.describe = describe

    async def handle(self, port: int, reader_from_client: asyncio.StreamReader,
                     writer_to_client: ClientWriter, send_error: SendError) -> None:
        try:
            pod_reader, pod_writer = await self.dial(port)
        except Exception as e:
            await send_error(f"error forwarding port {port} to {self.describe}: {e}")
            return

        async def upstream() -> None:  # client -> pod
            if isinstance(writer_to_client, SpdyStream) and writer_to_client.reader is reader_from_client:
                await writer_to_client.pipe_to(pod_writer)  # DATA frames straight to the pod's socket
                return
            with contextlib.suppress(ConnectionError, OSError):
                while data := await reader_from_client.read(CHUNK):
                    pod_writer.write(data)
                    await pod_writer.drain()
                if pod_writer.can_write_eof():
                    pod_writer.write_eof()

        up = asyncio.create_task(upstream())
        try:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await pod_reader.read(CHUNK):
                    writer_to_client.write(data)
                    await writer_to_client.drain()
            with contextlib.suppress(ConnectionError, OSError):
                writer_to_client.write_eof()
            # The pod is done talking; give the client a moment to finish its half.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(up), 1.0)
        finally:
            up.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await up
            pod_writer.close()
            with contextlib.suppress(Exception):
                await pod_writer.wait_closed()


def _handler(dial: Dial | None, handler: PortForwardHandler | None) -> PortForwardHandler:
    if handler is not None:
        return handler
    if dial is None:
        raise TypeError("give dial or handler")
    return DialHandler(dial)


class _Pair:
    def __init__(self) -> None:
        self.error: SpdyStream | None = None
        self.data: SpdyStream | None = None
        self.port = 0
        self.timer: asyncio.TimerHandle | None = None


async def spdy_portforward(reader: ByteReader | PushSource, writer: ByteWriter, dial: Dial | None = None, *,
                           handler: PortForwardHandler | None = None,
                           pair_timeout: float = DEFAULT_STREAM_CREATION_TIMEOUT,
                           stream_limit: int = DEFAULT_STREAM_LIMIT,
                           stall_timeout: float = DEFAULT_STALL_TIMEOUT) -> None:
    """Serve ``portforward.k8s.io`` on an upgraded SPDY connection until it ends."""
    h = _handler(dial, handler)
    pairs: dict[str, _Pair] = {}
    tasks: set[asyncio.Task[None]] = set()
    loop = asyncio.get_running_loop()

    def expire(key: str) -> None:
        pair = pairs.pop(key, None)
        if pair is None:
            return
        if pair.error is not None and not pair.error.is_closing():
            with contextlib.suppress(ConnectionError):
                pair.error.write(b"timed out waiting for streams")
                pair.error.write_eof()
        for st in (pair.error, pair.data):
            if st is not None and st is not pair.error:
                st.reset()

    def on_stream(st: SpdyStream) -> None:
        kind = st.header("streamtype")
        try:
            port = int(st.header("port") or "")
        except ValueError:
            port = 0
        if kind not in ("error", "data") or not 0 < port <= 0xFFFF:
            st.reset(RST_PROTOCOL_ERROR)
            return
        key = st.header("requestid")
        if key is None:  # pre-requestID clients: pair by stream id
            key = f"#{st.id if kind == 'error' else st.id - 2}"
        pair = pairs.get(key)
        if pair is None:
            pair = pairs[key] = _Pair()
            pair.port = port
            pair.timer = loop.call_later(pair_timeout, expire, key)
        if getattr(pair, kind) is not None or pair.port != port:
            st.reset(RST_PROTOCOL_ERROR)
            return
        st.accept()
        setattr(pair, kind, st)
        if pair.error is not None and pair.data is not None:
            del pairs[key]
            if pair.timer is not None:
                pair.timer.cancel()
            t = asyncio.create_task(run_pair(pair.port, pair.error, pair.data))
            tasks.add(t)
            t.add_done_callback(tasks.discard)

    async def run_pair(port: int, err: SpdyStream, data: SpdyStream) -> None:
        async def send_error(msg: str) -> None:
            if not err.is_closing():
                err.write(msg.encode())
                await err.drain()

        job = asyncio.create_task(h.handle(port, data.reader, data, send_error))
        data.on_reset(job.cancel)
        try:
            await job
        except asyncio.CancelledError:
            if not job.cancelled():
                raise
        except Exception as e:
            log.exception("port-forward handler failed")
            with contextlib.suppress(ConnectionError, OSError):
                await send_error(f"error forwarding port {port}: {e}")
        finally:
            with contextlib.suppress(ConnectionError, OSError):
                data.write_eof()
                err.write_eof()
                await session.drain()

    session = SpdySession(reader, writer, server=True, on_stream=on_stream,
                          stream_limit=stream_limit, stall_timeout=stall_timeout)
    try:
        await session.run()
    finally:
        for pair in pairs.values():
            if pair.timer is not None:
                pair.timer.cancel()
        for t in list(tasks):
            t.cancel()
        for t in list(tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        await session.close(goaway=False)


class _WsChannelWriter:
    """ClientWriter for one WebSocket port-forward data channel."""

    def __init__(self, send: Callable[[int, bytes], Awaitable[None]], channel: int) -> None:
        self._send = send
        self._channel = channel
        self._buf = bytearray()
        self._closed = False
        self._lock = asyncio.Lock()

    def write(self, data: bytes) -> None:
        if self._closed:
            raise ConnectionResetError("channel closed")
        self._buf += data

    async def drain(self) -> None:
        async with self._lock:
            while self._buf:
                chunk = bytes(self._buf[:CHUNK])
                del self._buf[:CHUNK]
                await self._send(self._channel, chunk)

    def write_eof(self) -> None:
        return None  # v4 has no per-channel close

    def close(self) -> None:
        self._closed = True

    def is_closing(self) -> bool:
        return self._closed


async def websocket_portforward(ws: web.WebSocketResponse, ports: Iterable[int], dial: Dial | None = None,
                                *, handler: PortForwardHandler | None = None, protocol: str | None = None,
                                stream_limit: int = DEFAULT_STREAM_LIMIT,
                                stall_timeout: float = DEFAULT_STALL_TIMEOUT) -> None:
    """Serve ``v4.channel.k8s.io`` (or its base64 variant) port-forward on a prepared WebSocket.

    Port ``i`` gets data channel ``2i`` and error channel ``2i+1``; both start with the
    port as 2 bytes little-endian.  Returns when every port is done or the client left.
    """
    h = _handler(dial, handler)
    ports = list(ports)
    b64 = (protocol if protocol is not None else ws.ws_protocol) == "v4.base64.channel.k8s.io"
    lock = asyncio.Lock()

    async def send(channel: int, data: bytes) -> None:
        msg = channels.encode(channel, data, base64=b64)
        async with lock:
            if isinstance(msg, str):
                await ws.send_str(msg)
            else:
                await ws.send_bytes(msg)

    readers: list[tuple[asyncio.StreamReader, _Gate]] = []
    tasks: list[asyncio.Task[None]] = []
    try:
        for i, port in enumerate(ports):
            await send(2 * i, channels.port_prefix(port))
            await send(2 * i + 1, channels.port_prefix(port))
        for i, port in enumerate(ports):
            rd, gate = _bounded_reader(stream_limit)
            readers.append((rd, gate))

            def make_send_error(ch: int) -> SendError:
                async def send_error(msg: str) -> None:
                    await send(ch, msg.encode())
                return send_error

            tasks.append(asyncio.create_task(
                h.handle(port, rd, _WsChannelWriter(send, 2 * i), make_send_error(2 * i + 1))))
    except (ConnectionError, RuntimeError):
        for t in tasks:
            t.cancel()
        return

    async def read_loop() -> None:
        dead: set[int] = set()
        try:
            while True:
                msg = await ws.receive()
                if msg.type in (WSMsgType.BINARY, WSMsgType.TEXT):
                    if not msg.data:
                        continue
                    ch, data = channels.decode(msg.data, base64=b64)
                    idx = ch // 2
                    if ch % 2 or idx >= len(readers) or idx in dead or not data:
                        continue
                    rd, gate = readers[idx]
                    rd.feed_data(data)
                    if not await gate.wait(stall_timeout):
                        log.info("port-forward channel %d stalled; dropping it", ch)
                        rd.set_exception(ConnectionResetError("consumer stalled"))
                        tasks[idx].cancel()
                        dead.add(idx)
                else:
                    break
        except (ChannelError, ConnectionError, RuntimeError) as e:
            log.info("port-forward websocket ended: %s", e)
        finally:
            for rd, _ in readers:
                rd.feed_eof()

    reader_task = asyncio.create_task(read_loop())
    try:
        handlers: asyncio.Future[Any] = asyncio.gather(*tasks, return_exceptions=True)
        waitables: set[asyncio.Future[Any]] = {reader_task, handlers}
        done, _ = await asyncio.wait(waitables, return_when=asyncio.FIRST_COMPLETED)
        if reader_task in done:  # client went away: stop everything
            for t in tasks:
                t.cancel()
        await handlers
    finally:
        reader_task.cancel()  # before the first await: a cancel landing there must not leave it running
        with contextlib.suppress(Exception):
            await ws.close(code=1000)
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await reader_task


# --------------------------------------------------------------------------- SPDY in WebSocket


class _WsByteWriter:
    """ByteWriter that ships bytes as binary WebSocket messages from a sender task."""

    HIGH_WATER = 256 * 1024

    def __init__(self, ws: web.WebSocketResponse) -> None:
        self._ws = ws
        self._buf = bytearray()
        self._wake = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()
        self._closing = False
        self._error: BaseException | None = None
        self._task = asyncio.create_task(self._sender())

    def write(self, data: bytes) -> None:
        if self._closing or self._error is not None:
            return
        self._buf += data
        self._wake.set()
        if len(self._buf) > self.HIGH_WATER:
            self._drained.clear()

    async def drain(self) -> None:
        if self._error is not None:
            raise ConnectionResetError(str(self._error))
        await self._drained.wait()
        if self._error is not None:
            raise ConnectionResetError(str(self._error))

    async def _sender(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self._buf:
                    chunk = bytes(self._buf[:65536])
                    del self._buf[:65536]
                    await self._ws.send_bytes(chunk)
                    if len(self._buf) <= self.HIGH_WATER:
                        self._drained.set()
                if self._closing:
                    break
            await self._ws.close(code=1000)
        except (ConnectionError, RuntimeError) as e:
            self._error = e
        finally:
            self._drained.set()

    def close(self) -> None:
        self._closing = True
        self._wake.set()

    async def wait_closed(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(self._task), 15)


class _WsMessageReader:
    """ByteReader over a WebSocket that carries a byte stream: ``read()`` returns the next non-empty binary
    message whole, with no buffer in between (its only reader, :class:`SpdySession`, takes any length; what
    is not read yet waits in aiohttp's message queue, which pauses the socket when it fills)."""

    def __init__(self, ws: web.WebSocketResponse) -> None:
        self._ws = ws
        self._eof = False

    async def read(self, n: int = -1) -> bytes:
        while not self._eof:
            try:
                msg = await self._ws.receive()
            except (ConnectionError, RuntimeError) as e:
                self._eof = True
                raise ConnectionError(str(e)) from e
            if msg.type == WSMsgType.BINARY:
                if msg.data:
                    return bytes(msg.data)
            elif msg.type == WSMsgType.TEXT:
                self._eof = True
                raise ConnectionError("invalid message type received")
            else:
                self._eof = True
        return b""


def tunnel_spdy_over_websocket(ws: web.WebSocketResponse, *, limit: int = DEFAULT_STREAM_LIMIT,
                               ) -> tuple[ByteReader, ByteWriter]:
    """Byte streams over a prepared ``SPDY/3.1+portforward.k8s.io`` WebSocket.

    Binary messages are concatenated (empty ones skipped; message boundaries mean
    nothing); a text message is a protocol error; close = EOF.  Writes go out as binary
    messages; ``close()`` flushes and closes with 1000. (``limit`` is unused: inbound
    messages are read one at a time, straight from aiohttp's queue.)
    """
    return _WsMessageReader(ws), _WsByteWriter(ws)
