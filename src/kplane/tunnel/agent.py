"""The Konnectivity agent: dials out to the server(s) and dials on their behalf.

The agent is the gRPC *client*: it opens ``/AgentService/Connect`` to each server with its ``agentid``, its
``agentidentifiers`` and, in token mode, ``authorization: Bearer <token>`` (re-read from ``token_file`` on every
connect, so a rotated projected token is picked up). Which servers to hold and when to redial is decided by
:class:`kplane.tunnel.clientset.ClientSetPlanner` (``servercount``/``serverid`` semantics, capped jittered
exponential back-off).

On each stream it answers ``DIAL_REQ`` by connecting to the target (only destinations its
:class:`~kplane.tunnel.packets.AddressPolicy` allows; 5 s timeout), then pumps bytes:

- the receive loop never awaits anything but the next packet: ``DATA`` is written to that connection's
  transport at once, whose buffer per-connection flow control bounds (:mod:`kplane.tunnel.flow`). A target
  that stops reading therefore stalls only its own connection.
- the target is read only while the connection holds send credit (its transport's reading is paused
  otherwise), so one busy connection cannot fill the shared stream's queue either.
- each connection is driven by its transport's callbacks (no task per connection); the stream has one writer,
  whose :class:`~kplane.tunnel.outbox.Outbox` turns DATA queued back to back for one connection into one
  packet. Packets travel as bytes: DATA is encoded and taken apart by :mod:`kplane.tunnel.packets` directly,
  without protobuf objects or extra copies.

``CLOSE_REQ`` closes a connection (after flushing what it already received), ``DIAL_CLS`` cancels a dial in
progress (or closes the connection it produced), and :meth:`KonnectivityAgent.drain` sends ``DRAIN`` on every
stream and stops dialling new servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import grpc

from kplane.tunnel import packets as P
from kplane.tunnel.clientset import Backoff, ClientSetPlanner
from kplane.tunnel.flow import (
    DEFAULT_BUFFER_LIMIT,
    DEFAULT_WINDOW,
    STALL_TIMEOUT,
    FlowControlError,
    ReadGate,
    ReceiveBuffer,
    SendCredit,
    parse_window,
)
from kplane.tunnel.outbox import DataBatch, Outbox
from kplane.tunnel.packets import AddressPolicy, AgentIdentifiers, Packet, PacketType

log = logging.getLogger(__name__)

MAX_MESSAGE = 4 << 20 | 1024
LOCAL_CREDIT = 256 << 10  # in-flight bytes per connection toward a server that does not do windows
MAX_PENDING_DIALS = 256
CONNECT_METHOD = "/AgentService/Connect"
FLUSH_ON_CLOSE = 5.0


class ConnectError(Exception):
    """A server could not be connected to (or refused us)."""


class _Endpoint(asyncio.Protocol):
    """One tunnelled TCP connection on the agent side, driven by the target socket's callbacks (no tasks).

    target → server: each read goes out as DATA as far as the connection's send credit allows; the rest waits
    here with reading paused until credit comes back. server → target: DATA is written to the transport at once
    (never awaiting, so the stream's receive loop never blocks); bytes count as consumed, earning the server
    more credit, once the transport has handed them to the kernel (the high-water mark is 0, so the write-buffer
    callbacks say when). From a server without windows, more than the buffer limit unwritten holds the stream's
    reading (the session's :class:`~kplane.tunnel.flow.ReadGate`) until the target takes it."""

    def __init__(self, session: _Session, random: int) -> None:
        self.session = session
        self.cid = 0  # assigned by start(), once the DIAL_RSP is queued
        self.random = random
        negotiated = session.peer_window is not None
        self.credit = (SendCredit(session.peer_window, ceiling=session.peer_window * 4)
                       if session.peer_window is not None else SendCredit(LOCAL_CREDIT, ceiling=LOCAL_CREDIT))
        self.recv = ReceiveBuffer(window=session.agent.window if negotiated else None,
                                  limit=session.agent.buffer_limit)
        self.transport: asyncio.Transport | None = None
        self.pending: bytes | memoryview = b""
        self.eof = False
        self.closing = False
        self.written = 0
        self.accounted = 0
        self.kill: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=0)
        transport.pause_reading()  # until start()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        self.pending = bytes(self.pending) + data if self.pending else data
        self._send_up()

    def eof_received(self) -> bool:
        self.eof = True
        self._send_up()
        return True  # we close it ourselves (after flushing what is buffered for the target)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.kill is not None:
            self.kill.cancel()
            self.kill = None
        if not self.closing and self.cid:
            self.session.close_endpoint(self, error=f"connection to the target failed: {exc}" if exc else "")
        self.closing = True
        self.eof = True

    def resume_writing(self) -> None:
        self._account()

    # ------------------------------------------------------------------ called by the session

    def start(self, cid: int) -> None:
        self.cid = cid
        if self.eof and not self.pending and self.transport is not None and self.transport.is_closing():
            self.session.close_endpoint(self)  # the target hung up before we even answered the dial
            return
        self._send_up()

    def on_data(self, payload: bytes | memoryview) -> None:
        """DATA from the server (from the receive loop: never awaits)."""
        t = self.transport
        if self.closing or t is None:
            return
        try:
            self.recv.received(len(payload))
        except FlowControlError as e:
            self.session.close_endpoint(self, error=str(e))
            return
        t.write(payload)
        self.written += len(payload)
        self._account()
        if self.recv.over:
            self.session.gate.update(self, True)

    def on_credit(self, n: int) -> None:
        try:
            self.credit.give(n)
        except FlowControlError as e:
            self.session.close_endpoint(self, error=str(e))
            return
        if self.pending or self.eof:
            self._send_up()

    def shutdown(self) -> None:
        """Stop reading the target and close it once what it was already sent is written (bounded in time)."""
        self.closing = True
        self.pending = b""
        t = self.transport
        if t is None or t.is_closing():
            return
        t.close()
        if t.get_write_buffer_size():
            self.kill = asyncio.get_running_loop().call_later(FLUSH_ON_CLOSE, t.abort)

    # ------------------------------------------------------------------ internals

    def _send_up(self) -> None:
        t = self.transport
        if not self.cid or self.closing or t is None:
            return
        p = self.pending
        while p:
            n = self.credit.take(len(p))
            if not n:
                self.pending = p
                t.pause_reading()
                return
            self.session.send_data(self.cid, p if n == len(p) else memoryview(p)[:n])
            p = memoryview(p)[n:] if n < len(p) else b""
        self.pending = b""
        if self.eof:
            # the target closed (or failed): tell the server, unsolicited CLOSE_RSP as upstream does
            self.session.close_endpoint(self)
        else:
            t.resume_reading()

    def _account(self) -> None:
        t = self.transport
        if t is None:
            return
        done = self.written - t.get_write_buffer_size()
        n = done - self.accounted
        if n > 0:
            self.accounted = done
            grant = self.recv.consumed(n)
            if grant and not self.closing:
                self.session.send(P.window_update(self.cid, grant))
            elif self.session.peer_window is None:
                self.session.gate.update(self, self.recv.over)


class _Session:
    """One Connect stream to one server (raw bytes on the wire: DATA is encoded and taken apart without
    protobuf objects, see :func:`kplane.tunnel.packets.parse_data`)."""

    def __init__(self, agent: KonnectivityAgent, address: str, channel: grpc.aio.Channel, call: Any,
                 server_id: str, server_count: int, peer_window: int | None) -> None:
        self.agent = agent
        self.address = address
        self.channel = channel
        self.call = call
        self.server_id = server_id
        self.server_count = server_count
        self.peer_window = peer_window
        self.outbox = Outbox()
        self.ready = asyncio.Event()
        self.conns: dict[int, _Endpoint] = {}
        self.dials: dict[int, asyncio.Task[None]] = {}
        self.dialed: dict[int, int] = {}  # random -> cid, for a DIAL_CLS that arrives after the dial completed
        self.cids = itertools.count(1)
        self.closed = False
        self.readable = asyncio.Event()  # cleared while the gate holds the stream
        self.readable.set()
        loop = asyncio.get_running_loop()
        self.gate = ReadGate(pause=self.readable.clear, resume=self.readable.set, schedule=loop.call_later,
                             on_stall=self._stalled, stall_timeout=agent.stall_timeout)

    def send(self, packet: Packet) -> None:
        if not self.closed:
            self.outbox.put(packet)
            self.ready.set()

    def send_data(self, cid: int, payload: bytes | memoryview) -> None:
        if not self.closed:
            self.outbox.put_data(cid, payload)
            self.ready.set()

    async def run(self) -> None:
        reader = asyncio.create_task(self._read())
        writer = asyncio.create_task(self._write())
        try:
            done, _ = await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if not t.cancelled() and t.exception() is not None:
                    log.info("konnectivity agent: stream to %s (%s) ended: %s", self.address, self.server_id,
                             _describe(t.exception()))
        finally:
            reader.cancel()
            writer.cancel()
            await self.close()

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for t in self.dials.values():
            t.cancel()
        for ep in list(self.conns.values()):
            ep.shutdown()
        self.conns.clear()
        self.call.cancel()
        await self.channel.close(grace=None)

    async def _read(self) -> None:
        readable = self.readable
        while True:
            if not readable.is_set():
                await readable.wait()
            msg = await self.call.read()
            if msg is grpc.aio.EOF:
                return
            d = P.parse_data(msg)
            if d is not None:
                self.on_data(d[0], d[1])
                continue
            try:
                pkt = P.decode(msg)
            except P.PacketError as e:
                log.debug("konnectivity agent: ignoring bad packet: %s", e)
                continue
            self.handle(pkt)

    async def _write(self) -> None:
        outbox = self.outbox
        while True:
            while not outbox:
                self.ready.clear()
                await self.ready.wait()
            item = outbox.pop()
            if isinstance(item, DataBatch):
                await self.call.write(item.encode())
                if self.peer_window is None and item.size:
                    ep = self.conns.get(item.connect_id)
                    if ep is not None:
                        ep.on_credit(item.size)
            else:
                await self.call.write(P.encode(item))

    def on_data(self, cid: int, payload: bytes | memoryview) -> None:
        ep = self.conns.get(cid)
        if ep is None:
            self.send(P.close_response(cid, "unrecognized connectID"))
        else:
            ep.on_data(payload)

    def handle(self, pkt: Packet) -> None:
        """One packet from the server. Never awaits."""
        try:
            P.check(pkt)
        except P.PacketError as e:
            log.debug("konnectivity agent: ignoring bad packet: %s", e)
            return
        t = pkt.type
        if t == PacketType.DIAL_REQ:
            r = pkt.dialRequest
            if r.random in self.dials or r.random in self.dialed:
                self.send(P.dial_response(r.random, error="duplicate dial id"))
            elif len(self.dials) >= MAX_PENDING_DIALS:
                self.send(P.dial_response(r.random, error="too many pending dials"))
            else:
                self.dials[r.random] = asyncio.create_task(self._dial(r.random, r.protocol, r.address))
        elif t == PacketType.DATA:
            self.on_data(pkt.data.connectID, pkt.data.data)
        elif t == PacketType.CLOSE_REQ:
            cid = pkt.closeRequest.connectID
            ep = self.conns.get(cid)
            if ep is None:
                self.send(P.close_response(cid, "Unknown connectID"))
            else:
                self._forget(ep)
                ep.shutdown()
                self.send(P.close_response(cid))
        elif t == PacketType.DIAL_CLS:
            rnd = pkt.closeDial.random
            task = self.dials.pop(rnd, None)
            if task is not None:
                task.cancel()
            elif rnd in self.dialed:
                ep = self.conns.get(self.dialed[rnd])
                if ep is not None:
                    self.close_endpoint(ep)
        elif t == PacketType.KPLANE_WINDOW_UPDATE:
            ep = self.conns.get(pkt.windowUpdate.connectID)
            if ep is not None and self.peer_window is not None:
                ep.on_credit(pkt.windowUpdate.bytes)

    def _forget(self, ep: _Endpoint) -> None:
        if self.conns.get(ep.cid) is ep:
            del self.conns[ep.cid]
        self.dialed.pop(ep.random, None)
        self.gate.release(ep)

    def _stalled(self, key: object) -> None:
        """A target took too little for the gate's stall timeout while the stream waited for it: close it."""
        assert isinstance(key, _Endpoint)
        if self.conns.get(key.cid) is not key:
            return  # closed meanwhile (with the whole stream, say)
        self.agent.stats["conn_stalled"] += 1
        self.close_endpoint(key, error=f"the target stayed over {self.agent.buffer_limit} bytes behind for "
                                       f"{self.agent.stall_timeout:g} s")

    def close_endpoint(self, ep: _Endpoint, *, error: str = "") -> None:
        """Close a connection from this side and tell the server (CLOSE_RSP, as upstream's agent does)."""
        if self.conns.get(ep.cid) is not ep:
            return
        self._forget(ep)
        ep.shutdown()
        self.send(P.close_response(ep.cid, error))

    async def _dial(self, random: int, protocol: str, address: str) -> None:
        agent = self.agent
        try:
            error = ""
            try:
                host, port = P.split_host_port(address)
            except ValueError as e:
                error = f"invalid address: {e}"
            else:
                if protocol != "tcp":
                    error = f"unsupported protocol {protocol[:20]!r}"
                elif not agent.policy.allows(host, port):
                    agent.stats["dial_refused"] += 1
                    error = f"dial to {address} is not allowed by this agent"
            if error:
                self.send(P.dial_response(random, error=error))
                return
            ep = _Endpoint(self, random)
            try:
                async with asyncio.timeout(agent.dial_timeout):
                    transport, _ = await asyncio.get_running_loop().create_connection(lambda: ep, host, port)
            except TimeoutError:
                self.send(P.dial_response(random, error=f"dial tcp {address}: i/o timeout"))
                return
            except OSError as e:
                self.send(P.dial_response(random, error=f"dial tcp {address}: {e.strerror or e}"))
                return
            if self.closed:
                transport.close()
                return
            cid = next(self.cids)
            self.conns[cid] = ep
            self.dialed[random] = cid
            agent.stats["dial_ok"] += 1
            self.send(P.dial_response(random, connect_id=cid))
            ep.start(cid)
        finally:
            self.dials.pop(random, None)


def _describe(exc: BaseException | None) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return repr(exc)


class KonnectivityAgent:
    """A Konnectivity agent. ``servers`` are ``host:port`` addresses of servers (or load balancers).

    Credentials: ``ca_file`` verifies the servers; ``cert_file``/``key_file`` is the client certificate (mTLS), or
    ``token``/``token_file`` a bearer token (token mode). ``identifiers`` is what the agent declares
    (:class:`AgentIdentifiers` or its query-string form); ``allowed`` lists what it agrees to dial (default:
    exactly the declared hosts, IPs and CIDRs)."""

    def __init__(
        self,
        servers: Sequence[str],
        ca_file: str | os.PathLike[str],
        cert_file: str | os.PathLike[str] | None = None,
        key_file: str | os.PathLike[str] | None = None,
        *,
        agent_id: str,
        token: str | None = None,
        token_file: str | os.PathLike[str] | None = None,
        identifiers: AgentIdentifiers | str = "",
        allowed: Iterable[str] | None = None,
        server_name: str | None = None,
        backoff: Backoff | None = None,
        sync_interval: float = 1.0,
        connect_timeout: float = 10.0,
        dial_timeout: float = 5.0,
        window: int | None = DEFAULT_WINDOW,
        buffer_limit: int = DEFAULT_BUFFER_LIMIT,
        stall_timeout: float = STALL_TIMEOUT,
        keepalive: float = 30.0,
    ) -> None:
        if (cert_file is None) != (key_file is None):
            raise ValueError("cert_file and key_file go together")
        if cert_file is None and token is None and token_file is None:
            raise ValueError("an agent needs a client certificate or a token")
        if not agent_id or len(agent_id) > P.MAX_AGENT_ID:
            raise ValueError("invalid agent_id")
        self.servers = list(servers)
        self.ca_file, self.cert_file, self.key_file = ca_file, cert_file, key_file
        self.agent_id = agent_id
        self.token, self.token_file = token, token_file
        self.identifiers = (identifiers if isinstance(identifiers, AgentIdentifiers)
                            else AgentIdentifiers.parse(identifiers))
        self.policy = (AddressPolicy.parse(allowed) if allowed is not None
                       else AddressPolicy.from_identifiers(self.identifiers))
        self.server_name = server_name
        self.planner = ClientSetPlanner(self.servers, backoff=backoff or Backoff(), sync_interval=sync_interval)
        self.connect_timeout = connect_timeout
        self.dial_timeout = dial_timeout
        self.window = window
        self.buffer_limit = buffer_limit
        self.stall_timeout = stall_timeout
        self.keepalive = keepalive
        self.sessions: dict[str, _Session] = {}
        self.stats: dict[str, int] = {"dial_ok": 0, "dial_refused": 0, "connect_failures": 0, "conn_stalled": 0}
        self.draining = False
        self._changed = asyncio.Event()
        self._main: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def connected_servers(self) -> dict[str, str]:
        """serverid -> address of every server this agent holds a stream to."""
        return {sid: s.address for sid, s in self.sessions.items()}

    async def start(self) -> None:
        if self._main is None:
            self._main = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._main is not None:
            self._main.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._main
            self._main = None
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for s in list(self.sessions.values()):
            await s.close()
        self.sessions.clear()

    async def __aenter__(self) -> KonnectivityAgent:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def drain(self) -> None:
        """Tell every server we are going away (DRAIN) and stop connecting to more."""
        self.draining = True
        for s in self.sessions.values():
            s.send(P.drain())
        self._changed.set()

    async def wait_connected(self, count: int = 1) -> None:
        """Return once streams to ``count`` distinct servers are up (wrap in ``asyncio.timeout``)."""
        while len(self.sessions) < count:
            self._changed.clear()
            await self._changed.wait()

    # ------------------------------------------------------------------------------------------------

    def _spawn(self, coro: Any) -> None:
        t = asyncio.create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def _run(self) -> None:
        while True:
            if self.draining:
                address, wait = None, None
            else:
                address, wait = self.planner.next_dial(time.monotonic())
            if address is not None:
                self._spawn(self._attempt(address))
                continue
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._changed.wait()

    async def _attempt(self, address: str) -> None:
        try:
            session = await self._connect(address)
        except Exception as e:
            self.stats["connect_failures"] += 1
            delay = self.planner.on_failed(address, time.monotonic())
            log.info("konnectivity agent: cannot connect to %s: %s (retry in %.1fs)", address,
                     _describe(e) if isinstance(e, grpc.aio.AioRpcError) else e, delay)
            self._changed.set()
            return
        if self.draining or not self.planner.on_connected(address, session.server_id, session.server_count,
                                                          time.monotonic()):
            await session.close()
            self._changed.set()
            return
        self.sessions[session.server_id] = session
        log.info("konnectivity agent %s: connected to server %s at %s (server count %d)", self.agent_id,
                 session.server_id, address, session.server_count)
        self._changed.set()
        try:
            await session.run()
        finally:
            if self.sessions.get(session.server_id) is session:
                del self.sessions[session.server_id]
            self.planner.on_disconnected(session.server_id, time.monotonic())
            self._changed.set()

    def _credentials(self) -> tuple[grpc.ChannelCredentials, list[tuple[str, str]]]:
        ca = Path(self.ca_file).read_bytes()
        md = [(P.MD_AGENT_ID, self.agent_id)]
        ids = self.identifiers.format()
        if ids:
            md.append((P.MD_AGENT_IDENTIFIERS, ids))
        if self.window is not None:
            md.append((P.MD_WINDOW, str(self.window)))
        md.append((P.MD_HELD_SERVERS, ",".join(sorted(self.sessions))))
        if self.cert_file is not None and self.key_file is not None:
            creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=Path(self.key_file).read_bytes(),
                                                 certificate_chain=Path(self.cert_file).read_bytes())
        else:
            creds = grpc.ssl_channel_credentials(root_certificates=ca)
        token = self.token
        if self.token_file is not None:
            token = Path(self.token_file).read_text().strip()
        if token is not None:
            md.append((P.MD_AUTHORIZATION, P.BEARER_PREFIX + token))
        return creds, md

    async def _connect(self, address: str) -> _Session:
        creds, md = self._credentials()
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_MESSAGE),
            ("grpc.keepalive_time_ms", int(self.keepalive * 1000)),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.enable_retries", 0),
            # a connection of its own each time, so a load balancer can hand us a different server
            ("grpc.use_local_subchannel_pool", 1),
        ]
        if self.server_name:
            options.append(("grpc.ssl_target_name_override", self.server_name))
        channel = grpc.aio.secure_channel(address, creds, options=options)
        try:
            call = channel.stream_stream(CONNECT_METHOD)(metadata=md)  # bytes in, bytes out
            async with asyncio.timeout(self.connect_timeout):
                headers = await call.initial_metadata()
                h: dict[str, list[str]] = {}
                for k, v in headers or ():
                    if isinstance(v, str):
                        h.setdefault(k.lower(), []).append(v)
                if P.MD_SERVER_ID not in h:
                    code = await call.code()
                    raise ConnectError(f"{code.name if code else 'no status'}: {await call.details()}")
            sid, cnt = h.get(P.MD_SERVER_ID, []), h.get(P.MD_SERVER_COUNT, [])
            if len(sid) != 1 or not sid[0] or len(cnt) != 1 or not cnt[0].isdigit():
                call.cancel()
                raise ConnectError("server did not send exactly one serverid and servercount")
            peer_window = None
            if self.window is not None:
                w = h.get(P.MD_WINDOW)
                peer_window = parse_window(w[0]) if w else None
            return _Session(self, address, channel, call, sid[0], int(cnt[0]), peer_window)
        except BaseException:
            await channel.close(grace=None)
            raise
