"""The Konnectivity server: agents on a TLS gRPC port, the apiserver on a Unix socket.

Three listeners, each with one job:

- **agent port** (default 8132, gRPC over TLS, only ``/AgentService/Connect``). Agents authenticate with a
  client certificate signed by the cluster CA (mTLS) or, when a ``token_reviewer`` is given, with
  ``authorization: Bearer <token>`` checked by a TokenReview for ``system:konnectivity-server``. Their
  ``agentid``/``agentidentifiers`` claims are then checked by the authorizer (:mod:`kplane.tunnel.auth`).
  The server answers with the ``serverid`` and ``servercount`` headers.
- **apiserver socket** (a Unix socket, ``mode`` ``grpc``: ``/ProxyService/Proxy`` as upstream's
  konnectivity-client speaks it; or ``http-connect``: ``CONNECT host:port HTTP/1.1`` → ``200`` then raw bytes,
  errors as an HTTP status with a text body).
- **health** on 127.0.0.1 only: ``/healthz``, ``/readyz`` (ready when at least one agent is connected),
  ``/metrics`` (Prometheus text format).

All routing and connection state is the sans-I/O :class:`kplane.tunnel.core.ProxyCore`; this module only moves
packets between it and sockets. Every queue it fills is bounded by per-connection flow control.

The byte path is kept short: gRPC methods are registered with raw-bytes (de)serializers and DATA is encoded and
taken apart by :mod:`kplane.tunnel.packets` without protobuf objects; each stream has one writer whose
:class:`~kplane.tunnel.outbox.Outbox` turns DATA queued back to back for one connection into one packet; an
HTTP-CONNECT socket is an :class:`asyncio.Protocol` driven by its callbacks (no task, no stream buffers).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web

from kplane.tunnel import packets as P
from kplane.tunnel.auth import (
    AgentClaim,
    AgentRejected,
    Authorizer,
    NodeAgentAuthorizer,
    TokenReviewer,
    identity_from_certificate,
    identity_from_token,
)
from kplane.tunnel.core import Agent, Frontend, ProxyCore
from kplane.tunnel.flow import DEFAULT_BUFFER_LIMIT, DEFAULT_WINDOW, STALL_TIMEOUT, parse_window
from kplane.tunnel.httpconnect import (
    ESTABLISHED,
    HTTPError,
    error_response,
    parse_connect,
    status_for_dial_error,
)
from kplane.tunnel.outbox import DataBatch, Outbox
from kplane.tunnel.packets import AgentIdentifiers, Packet, PacketType

log = logging.getLogger(__name__)

MAX_MESSAGE = 4 << 20 | 1024
HEAD_TIMEOUT = 10.0
REVIEW_TIMEOUT = 10.0


def _grpc_options(keepalive_s: float) -> list[tuple[str, Any]]:
    return [
        ("grpc.so_reuseport", 0),  # never share the port with another process silently
        ("grpc.max_receive_message_length", MAX_MESSAGE),
        ("grpc.max_send_message_length", MAX_MESSAGE),
        ("grpc.keepalive_time_ms", int(keepalive_s * 1000)),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
        ("grpc.http2.max_ping_strikes", 0),
        ("grpc.max_concurrent_streams", 16),
    ]


def _md(context: grpc.aio.ServicerContext[Any, Any]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for key, value in context.invocation_metadata() or ():
        if isinstance(value, bytes):
            continue
        out.setdefault(key.lower(), []).append(value)
    return out


def _raw_handler(service: str, method: str, behavior: Any) -> grpc.GenericRpcHandler:
    """A bidirectional-streaming method whose messages reach ``behavior`` as bytes (no (de)serializers)."""
    return grpc.method_handlers_generic_handler(service, {method: grpc.stream_stream_rpc_method_handler(behavior)})


def _prepare_uds(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(f"{path} exists and is not a socket")
    path.unlink()


# --------------------------------------------------------------------------------------------------
# agent side
# --------------------------------------------------------------------------------------------------


class _AgentStream:
    """An agent's Connect stream as a :class:`kplane.tunnel.core.AgentLink`."""

    def __init__(self) -> None:
        self.outbox = Outbox()
        self.ready = asyncio.Event()
        self.closed = asyncio.Event()
        self.reason = ""
        self.readable = asyncio.Event()  # cleared while the relay holds the stream (ProxyCore's ReadGate)
        self.readable.set()

    def send(self, packet: Packet) -> None:
        self.outbox.put(packet)
        self.ready.set()

    def send_data(self, connect_id: int, payload: bytes | memoryview) -> None:
        self.outbox.put_data(connect_id, payload)
        self.ready.set()

    def close(self, reason: str) -> None:
        self.reason = reason
        self.closed.set()

    def pause_reading(self) -> None:
        self.readable.clear()

    def resume_reading(self) -> None:
        self.readable.set()


class _AgentService:
    """``/AgentService/Connect``, registered with raw-bytes (de)serializers: DATA is encoded and taken apart
    by :mod:`kplane.tunnel.packets` without protobuf objects; everything else goes through protobuf."""

    def __init__(self, server: KonnectivityServer) -> None:
        self.server = server

    async def Connect(self, request_iterator: Any, context: Any) -> None:
        s = self.server
        peer = context.peer()
        try:
            agent_id, identifiers, identity_user, window, held = await s._admit(context)
        except AgentRejected as e:
            s.core.stats["agent_rejected"] += 1
            log.warning("konnectivity: refused agent from %s: %s", peer, e)
            code = grpc.StatusCode.UNAUTHENTICATED if e.unauthenticated else grpc.StatusCode.PERMISSION_DENIED
            await context.abort(code, str(e))
            return
        headers = [(P.MD_SERVER_ID, s.server_id), (P.MD_SERVER_COUNT, str(s.server_count))]
        if window is not None and s.window is not None:
            headers.append((P.MD_WINDOW, str(s.window)))
        await context.send_initial_metadata(headers)
        if held is not None and s.server_id in held:
            # kplane's agent already holds a stream to us: this one only told it our serverid and servercount
            s.core.stats["agent_duplicate"] += 1
            return
        link = _AgentStream()
        agent = s.core.add_agent(agent_id, identifiers, identity_user, link, window, replaces=held is not None)
        log.info("konnectivity: agent %s (%s) connected from %s, identifiers %r", agent_id, identity_user, peer,
                 identifiers.format())
        reader = asyncio.create_task(self._read(context, agent, link))
        writer = asyncio.create_task(self._write(context, agent, link))
        closed = asyncio.create_task(link.closed.wait())
        stopping = asyncio.create_task(s._stopping.wait())
        try:
            await asyncio.wait({reader, writer, closed, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if stopping.done():
                link.reason = "server shutting down"
        finally:
            # The bookkeeping comes before the first await: gRPC cancels this handler when the agent's stream
            # ends, and that can land while the tasks below are torn down, skipping whatever follows the await.
            for t in (reader, writer, closed, stopping):
                t.cancel()
            s.core.remove_agent(agent)
            log.info("konnectivity: agent %s disconnected%s", agent_id, f" ({link.reason})" if link.reason else "")
            await asyncio.gather(reader, writer, closed, stopping, return_exceptions=True)
        if link.reason:
            await context.abort(grpc.StatusCode.UNAVAILABLE, link.reason)

    async def _read(self, context: Any, agent: Agent, link: _AgentStream) -> None:
        core = self.server.core
        readable = link.readable
        while True:
            if not readable.is_set():
                await readable.wait()
            msg = await context.read()
            if msg is grpc.aio.EOF:
                return
            d = P.parse_data(msg)
            if d is not None:
                core.agent_data(agent, d[0], d[1])
                continue
            try:
                pkt = P.decode(msg)
            except P.PacketError:
                core.stats["agent_bad_packet"] += 1
                continue
            core.from_agent(agent, pkt)

    async def _write(self, context: Any, agent: Agent, link: _AgentStream) -> None:
        core = self.server.core
        outbox = link.outbox
        while True:
            while not outbox:
                link.ready.clear()
                await link.ready.wait()
            item = outbox.pop()
            if isinstance(item, DataBatch):
                await context.write(item.encode())
                core.agent_sent_data(agent, item.connect_id, item.size)
            else:
                await context.write(P.encode(item))


# --------------------------------------------------------------------------------------------------
# apiserver side: gRPC
# --------------------------------------------------------------------------------------------------


class _FrontendQueue:
    """What goes to one gRPC frontend, plus per-connection wake-ups for senders waiting on credit."""

    def __init__(self) -> None:
        self.outbox = Outbox()
        self.ready = asyncio.Event()
        self.events: dict[int, asyncio.Event] = {}
        self.changed = asyncio.Event()
        self.writing = False

    def send(self, packet: Packet) -> None:
        self.outbox.put(packet)
        self.ready.set()
        self.changed.set()

    def send_data(self, connect_id: int, payload: bytes | memoryview) -> None:
        self.outbox.put_data(connect_id, payload)
        self.ready.set()

    def wake(self, connect_id: int) -> None:
        ev = self.events.get(connect_id)
        if ev is not None:
            ev.set()

    async def wait(self, connect_id: int) -> None:
        # nothing awaits between the caller seeing no credit and this registration, so no wake-up is missed
        ev = self.events.setdefault(connect_id, asyncio.Event())
        try:
            await ev.wait()
        finally:
            del self.events[connect_id]


async def forward_with_credit(core: ProxyCore, f: Frontend, link: _FrontendQueue, cid: int,
                              payload: bytes | memoryview) -> bool:
    """Send ``payload`` on connection ``cid`` as credit allows, waiting for more; False: the connection is gone."""
    view = memoryview(payload)
    while view:
        n = core.frontend_data(f, cid, view)
        if n < 0:
            return False
        if n == 0:
            await link.wait(cid)
            continue
        view = view[n:]
    return True


class _ProxyService:
    """``/ProxyService/Proxy`` (raw bytes, as :class:`_AgentService`)."""

    def __init__(self, server: KonnectivityServer) -> None:
        self.server = server

    async def Proxy(self, request_iterator: Any, context: Any) -> None:
        core = self.server.core
        link = _FrontendQueue()
        f = core.add_frontend(link, "grpc")
        writer = asyncio.create_task(self._write(context, f, link))
        reader = asyncio.create_task(self._read(context, f, link))
        stopping = asyncio.create_task(self.server._stopping.wait())
        try:
            done, _ = await asyncio.wait({reader, writer, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if reader in done and not reader.cancelled() and reader.exception() is None:
                # the frontend half-closed: let its open dials and connections finish (bounded)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(core.close_timeout):
                        while (f.pending or f.conns or link.outbox or link.writing) and not writer.done():
                            link.changed.clear()
                            await link.changed.wait()
        finally:
            for t in (reader, writer, stopping):
                t.cancel()
            core.remove_frontend(f)  # before the await, for the reason given in _AgentService.Connect
            await asyncio.gather(reader, writer, stopping, return_exceptions=True)

    async def _read(self, context: Any, f: Frontend, link: _FrontendQueue) -> None:
        core = self.server.core
        while True:
            msg = await context.read()
            if msg is grpc.aio.EOF:
                return
            d = P.parse_data(msg)
            payload: bytes | memoryview
            if d is not None:
                cid, payload = d
            else:
                try:
                    pkt = P.decode(msg)
                    P.check(pkt)
                except P.PacketError:
                    core.stats["frontend_bad_packet"] += 1
                    continue
                t = pkt.type
                if t == PacketType.DIAL_REQ:
                    r = pkt.dialRequest
                    core.dial(f, r.random, r.protocol, r.address)
                    continue
                if t == PacketType.CLOSE_REQ:
                    cid = pkt.closeRequest.connectID
                    if not core.frontend_close(f, cid):
                        link.send(P.close_response(cid, "Unknown connectID"))
                    continue
                if t == PacketType.DIAL_CLS:
                    core.cancel_dial(f, pkt.closeDial.random)
                    continue
                if t != PacketType.DATA:
                    core.stats["frontend_unexpected_packet"] += 1
                    continue
                cid, payload = pkt.data.connectID, pkt.data.data
            if not await forward_with_credit(core, f, link, cid, payload):
                link.send(P.close_response(cid, "unrecognized connectID"))

    async def _write(self, context: Any, f: Frontend, link: _FrontendQueue) -> None:
        core = self.server.core
        outbox = link.outbox
        while True:
            while not outbox:
                link.ready.clear()
                await link.ready.wait()
            item = outbox.pop()
            link.writing = True
            try:
                if isinstance(item, DataBatch):
                    await context.write(item.encode())
                    core.frontend_consumed(f, item.connect_id, item.size)
                else:
                    await context.write(P.encode(item))
            finally:
                link.writing = False
                link.changed.set()


# --------------------------------------------------------------------------------------------------
# apiserver side: HTTP CONNECT
# --------------------------------------------------------------------------------------------------


class _HTTPConnect(asyncio.Protocol):
    """One CONNECT socket, driven by callbacks only (no task, no stream buffers): the request head, the dial,
    then bytes both ways. It is the connection's :class:`~kplane.tunnel.core.FrontendLink` as well.

    Upload (socket → agent): each read goes to the relay as far as the connection's send credit allows; the
    rest waits here with reading paused until :meth:`wake`. Download (agent → socket): DATA is written to the
    transport at once; bytes count as consumed (earning the agent more credit) once the transport has handed
    them to the kernel, which the write-buffer callbacks report (the high-water mark is 0)."""

    def __init__(self, server: KonnectivityServer) -> None:
        self.server = server
        self.core = server.core
        self.transport: asyncio.Transport | None = None
        self.head = bytearray()
        self.timer: asyncio.TimerHandle | None = None
        self.f: Frontend | None = None
        self.cid = 0  # 0 until the dial succeeded
        self.pending: bytes | memoryview = b""  # upload bytes waiting for credit (reading is paused meanwhile)
        self.eof = False
        self.written = 0
        self.accounted = 0

    # ------------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=0)
        self.server._http_conns.add(self)
        self.timer = asyncio.get_running_loop().call_later(HEAD_TIMEOUT, self._head_timeout)

    def data_received(self, data: bytes) -> None:
        if self.f is None:
            self._head_received(data)
            return
        self.pending = bytes(self.pending) + data if self.pending else data
        self._upload()

    def eof_received(self) -> bool:
        if self.f is None:  # the request head never completed: nothing to answer
            return False
        self.eof = True
        if self.cid and not self.pending:
            self.core.frontend_close(self.f, self.cid)
        return True  # keep writing what the target sends until its CLOSE_RSP

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.server._http_conns.discard(self)
        if self.f is not None:
            self.core.remove_frontend(self.f)

    def resume_writing(self) -> None:
        self._account()

    # ------------------------------------------------------------------ FrontendLink

    def send(self, packet: Packet) -> None:
        t = packet.type
        if t == PacketType.DIAL_RSP:
            if not self.cid:
                self._dialed(packet.dialResponse)
        elif t == PacketType.CLOSE_RSP and self.transport is not None:
            self.transport.close()  # after what is buffered

    def send_data(self, connect_id: int, payload: bytes | memoryview) -> None:
        t = self.transport
        if t is None or t.is_closing():
            return
        t.write(payload)
        self.written += len(payload)
        self._account()

    def wake(self, connect_id: int) -> None:
        if self.pending:
            self._upload()

    # ------------------------------------------------------------------ internals

    def _head_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.head += data
        try:
            req = parse_connect(bytes(self.head))
        except HTTPError as e:
            self.core.stats[f"http_error_{e.status}"] += 1
            self._fail(e.status, e.message)
            return
        if req is None:
            return
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.pending = bytes(self.head[req.head_length :])
        self.head = bytearray()
        self.transport.pause_reading()  # until the dial is answered
        self.f = self.core.add_frontend(self, "http-connect")
        self.core.dial(self.f, 1, "tcp", req.address)

    def _head_timeout(self) -> None:
        self.timer = None
        if self.f is None:
            self._fail(408, "timed out reading the CONNECT request")

    def _fail(self, status: int, message: str) -> None:
        t = self.transport
        if t is not None and not t.is_closing():
            t.write(error_response(status, message))
            t.close()

    def _dialed(self, rsp: P.pb.DialResponse) -> None:
        t = self.transport
        if t is None or t.is_closing():
            return
        if rsp.error:
            self._fail(status_for_dial_error(rsp.error), rsp.error)
            return
        self.cid = rsp.connectID
        t.write(ESTABLISHED)
        self.written += len(ESTABLISHED)
        self.accounted += len(ESTABLISHED)
        self._upload()

    def _upload(self) -> None:
        t, f = self.transport, self.f
        if t is None or f is None or not self.cid or t.is_closing():
            return
        p = self.pending
        while p:
            n = self.core.frontend_data(f, self.cid, p)
            if n == 0:  # no credit: wait for wake()
                self.pending = p
                t.pause_reading()
                return
            if n < 0:  # the connection is gone; its CLOSE_RSP (or the socket closing) ends this
                self.pending = b""
                t.pause_reading()
                return
            p = memoryview(p)[n:] if n < len(p) else b""
        self.pending = b""
        if self.eof:
            self.core.frontend_close(f, self.cid)
        else:
            t.resume_reading()

    def _account(self) -> None:
        t, f = self.transport, self.f
        if t is None or f is None:
            return
        done = self.written - t.get_write_buffer_size()
        n = done - self.accounted
        if n > 0:
            self.accounted = done
            self.core.frontend_consumed(f, self.cid, n)


# --------------------------------------------------------------------------------------------------
# the server
# --------------------------------------------------------------------------------------------------


class KonnectivityServer:
    """A Konnectivity server. ``start()`` binds everything; ``stop()`` closes everything.

    ``token_reviewer`` switches agent authentication from client certificates (``ca_file``) to bearer tokens.
    ``health_port=None`` disables the health/metrics listener; ``0`` picks a free port (see ``health_port``
    after ``start()``; likewise ``agent_port``)."""

    def __init__(
        self,
        agent_port: int = 8132,
        uds_path: str | os.PathLike[str] = "/run/kplane/konnectivity-server.socket",
        ca_file: str | os.PathLike[str] | None = None,
        cert_file: str | os.PathLike[str] | None = None,
        key_file: str | os.PathLike[str] | None = None,
        *,
        token_reviewer: TokenReviewer | None = None,
        token_audience: str = P.TOKEN_AUDIENCE,
        host: str = "0.0.0.0",
        mode: str = "grpc",
        server_id: str | None = None,
        server_count: int = 1,
        authorizer: Authorizer | None = None,
        strategies: Iterable[str] = ("destHost", "default"),
        only_declared: bool = True,
        health_port: int | None = 8134,
        dial_timeout: float = 10.0,
        replace_grace: float = 5.0,
        window: int | None = DEFAULT_WINDOW,
        buffer_limit: int = DEFAULT_BUFFER_LIMIT,
        stall_timeout: float = STALL_TIMEOUT,
        keepalive: float = 30.0,
    ) -> None:
        if mode not in ("grpc", "http-connect"):
            raise ValueError(f"mode must be grpc or http-connect, not {mode!r}")
        if cert_file is None or key_file is None:
            raise ValueError("the agent port needs a serving certificate and key")
        if token_reviewer is None and ca_file is None:
            raise ValueError("agents authenticate with client certificates (ca_file) or tokens (token_reviewer)")
        if server_count < 1:
            raise ValueError("server_count must be at least 1")
        self.requested_agent_port = agent_port
        self.uds_path = Path(uds_path)
        self.ca_file, self.cert_file, self.key_file = ca_file, cert_file, key_file
        self.token_reviewer = token_reviewer
        self.token_audience = token_audience
        self.host = host
        self.mode = mode
        self.server_id = server_id or os.environ.get("PROXY_SERVER_ID") or str(uuid.uuid4())
        self.server_count = server_count
        self.authorizer: Authorizer = authorizer or NodeAgentAuthorizer()
        self.window = window
        self.keepalive = keepalive
        self.requested_health_port = health_port
        self.core = ProxyCore(strategies=strategies, only_declared=only_declared, window=window,
                              buffer_limit=buffer_limit, stall_timeout=stall_timeout, dial_timeout=dial_timeout,
                              replace_grace=replace_grace, schedule=self._schedule)
        self.agent_port = 0
        self.health_port: int | None = None
        self._agent_server: grpc.aio.Server | None = None
        self._frontend_grpc: grpc.aio.Server | None = None
        self._frontend_http: asyncio.Server | None = None
        self._http_conns: set[_HTTPConnect] = set()
        self._health: web.AppRunner | None = None
        self._stopping = asyncio.Event()

    def _schedule(self, delay: float, fn: Any) -> asyncio.TimerHandle:
        return asyncio.get_running_loop().call_later(delay, fn)

    async def start(self) -> None:
        self._stopping = asyncio.Event()
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    def _credentials(self) -> grpc.ServerCredentials:
        assert self.cert_file is not None and self.key_file is not None
        cert = Path(self.cert_file).read_bytes()
        key = Path(self.key_file).read_bytes()
        if self.token_reviewer is None:
            assert self.ca_file is not None
            return grpc.ssl_server_credentials([(key, cert)], root_certificates=Path(self.ca_file).read_bytes(),
                                               require_client_auth=True)
        return grpc.ssl_server_credentials([(key, cert)])

    async def _start(self) -> None:
        creds = self._credentials()
        self._agent_server = grpc.aio.server(options=_grpc_options(self.keepalive))
        self._agent_server.add_generic_rpc_handlers((_raw_handler("AgentService", "Connect",
                                                                 _AgentService(self).Connect),))
        addr = f"[{self.host}]:{self.requested_agent_port}" if ":" in self.host else \
            f"{self.host}:{self.requested_agent_port}"
        self.agent_port = self._agent_server.add_secure_port(addr, creds)
        if not self.agent_port:
            raise OSError(f"cannot listen on {addr}")
        await self._agent_server.start()

        _prepare_uds(self.uds_path)
        if self.mode == "grpc":
            self._frontend_grpc = grpc.aio.server(options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE),
                ("grpc.max_send_message_length", MAX_MESSAGE),
            ])
            self._frontend_grpc.add_generic_rpc_handlers((_raw_handler("ProxyService", "Proxy",
                                                                       _ProxyService(self).Proxy),))
            if not self._frontend_grpc.add_insecure_port(f"unix:{self.uds_path}"):
                raise OSError(f"cannot listen on {self.uds_path}")
            await self._frontend_grpc.start()
        else:
            loop = asyncio.get_running_loop()
            self._frontend_http = await loop.create_unix_server(lambda: _HTTPConnect(self), path=str(self.uds_path))
        os.chmod(self.uds_path, 0o600)

        if self.requested_health_port is not None:
            app = web.Application()
            app.router.add_get("/healthz", self._healthz)
            app.router.add_get("/livez", self._healthz)
            app.router.add_get("/readyz", self._readyz)
            app.router.add_get("/ready", self._readyz)
            app.router.add_get("/metrics", self._metrics)
            self._health = web.AppRunner(app, access_log=None)
            await self._health.setup()
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", self.requested_health_port))
            self.health_port = sock.getsockname()[1]
            site = web.SockSite(self._health, sock)
            await site.start()
        log.info("konnectivity server %s: agents on %s:%d (%s), apiserver on %s (%s)", self.server_id,
                 self.host, self.agent_port, "token" if self.token_reviewer else "mTLS", self.uds_path, self.mode)

    async def stop(self, grace: float = 0.5) -> None:
        self._stopping.set()  # stream handlers return on their own (no cancellation inside gRPC)
        if self._frontend_http is not None:
            self._frontend_http.close()
            for conn in list(self._http_conns):
                if conn.transport is not None:
                    conn.transport.abort()
            await asyncio.sleep(0)  # their connection_lost() runs: frontends removed
            self._frontend_http = None
        for srv in (self._frontend_grpc, self._agent_server):
            if srv is not None:
                await srv.stop(grace)
        self._frontend_grpc = self._agent_server = None
        if self._health is not None:
            await self._health.cleanup()
            self._health = None
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(self.uds_path.lstat().st_mode):
                self.uds_path.unlink()

    async def __aenter__(self) -> KonnectivityServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -------------------------------------------------------------------------------- agent admission

    async def _admit(self, context: Any) -> tuple[str, AgentIdentifiers, str, int | None, set[str] | None]:
        md = _md(context)
        if self.token_reviewer is not None:
            auth = md.get(P.MD_AUTHORIZATION, [])
            if len(auth) != 1 or not auth[0].startswith(P.BEARER_PREFIX):
                raise AgentRejected("expected exactly one 'authorization: Bearer <token>'", unauthenticated=True)
            try:
                async with asyncio.timeout(REVIEW_TIMEOUT):
                    identity = await identity_from_token(self.token_reviewer, auth[0][len(P.BEARER_PREFIX):],
                                                         self.token_audience)
            except TimeoutError:
                raise AgentRejected("token review timed out", unauthenticated=True) from None
        else:
            ac = context.auth_context() or {}
            pems: Sequence[bytes] = ac.get("x509_pem_cert") or ()
            if not pems:
                raise AgentRejected("no client certificate", unauthenticated=True)
            identity = identity_from_certificate(pems[0])
        ids = md.get(P.MD_AGENT_ID, [])
        if len(ids) != 1 or not 0 < len(ids[0]) <= P.MAX_AGENT_ID or not ids[0].isprintable():
            raise AgentRejected("expected exactly one agentid")
        raw = md.get(P.MD_AGENT_IDENTIFIERS, [])
        if len(raw) > 1:
            raise AgentRejected("expected at most one agentidentifiers")
        try:
            identifiers = AgentIdentifiers.parse(raw[0]) if raw else AgentIdentifiers()
        except ValueError as e:
            raise AgentRejected(f"invalid agentidentifiers: {e}") from None
        await self.authorizer(AgentClaim(identity=identity, agent_id=ids[0], identifiers=identifiers))
        announced = md.get(P.MD_WINDOW)
        window = parse_window(announced[0]) if announced else None
        held_md = md.get(P.MD_HELD_SERVERS)
        held = {x for x in held_md[0].split(",") if x} if held_md and len(held_md[0]) <= 4096 else None
        return ids[0], identifiers, identity.user, window, held

    # -------------------------------------------------------------------------------- health

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def _readyz(self, request: web.Request) -> web.Response:
        if self.core.ready:
            return web.Response(text="ok")
        return web.Response(status=500, text="no connection to any proxy agent")

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(text=self.metrics_text(), content_type="text/plain", charset="utf-8")

    def metrics_text(self) -> str:
        ns = "konnectivity_network_proxy_server"
        lines: list[str] = []
        for name, value in self.core.gauges().items():
            lines += [f"# TYPE {ns}_{name} gauge", f"{ns}_{name} {value}"]
        lines.append(f"# TYPE {ns}_events_total counter")
        for key, value in sorted(self.core.stats.items()):
            lines.append(f'{ns}_events_total{{event="{key}"}} {value}')
        return "\n".join(lines) + "\n"
