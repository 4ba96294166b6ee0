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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
import uuid
from collections import deque
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web

from kplane.tunnel import konnectivity_pb2_grpc as pb_grpc
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
from kplane.tunnel.flow import CHUNK, DEFAULT_WINDOW, parse_window
from kplane.tunnel.httpconnect import (
    ESTABLISHED,
    HTTPError,
    error_response,
    parse_connect,
    status_for_dial_error,
)
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
        self.queue: asyncio.Queue[Packet] = asyncio.Queue()
        self.closed = asyncio.Event()
        self.reason = ""

    def send(self, packet: Packet) -> None:
        self.queue.put_nowait(packet)

    def close(self, reason: str) -> None:
        self.reason = reason
        self.closed.set()


class _AgentService(pb_grpc.AgentServiceServicer):
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
        reader = asyncio.create_task(self._read(context, agent))
        writer = asyncio.create_task(self._write(context, agent, link))
        closed = asyncio.create_task(link.closed.wait())
        stopping = asyncio.create_task(s._stopping.wait())
        try:
            await asyncio.wait({reader, writer, closed, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if stopping.done():
                link.reason = "server shutting down"
        finally:
            for t in (reader, writer, closed, stopping):
                t.cancel()
            await asyncio.gather(reader, writer, closed, stopping, return_exceptions=True)
            s.core.remove_agent(agent)
            log.info("konnectivity: agent %s disconnected%s", agent_id, f" ({link.reason})" if link.reason else "")
        if link.reason:
            await context.abort(grpc.StatusCode.UNAVAILABLE, link.reason)

    async def _read(self, context: Any, agent: Agent) -> None:
        while True:
            pkt = await context.read()
            if pkt is grpc.aio.EOF:
                return
            self.server.core.from_agent(agent, pkt)

    async def _write(self, context: Any, agent: Agent, link: _AgentStream) -> None:
        while True:
            pkt = await link.queue.get()
            await context.write(pkt)
            self.server.core.agent_sent(agent, pkt)


# --------------------------------------------------------------------------------------------------
# apiserver side: gRPC
# --------------------------------------------------------------------------------------------------


class _FrontendQueue:
    """Packets for one frontend, plus per-connection wake-ups for senders waiting on credit."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Packet] = asyncio.Queue()
        self.events: dict[int, asyncio.Event] = {}
        self.changed = asyncio.Event()

    def send(self, packet: Packet) -> None:
        self.queue.put_nowait(packet)
        self.changed.set()

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
                              payload: bytes) -> bool:
    """Send ``payload`` on connection ``cid`` in chunks, waiting for credit; False: the connection is gone."""
    view = memoryview(payload)
    off = 0
    while off < len(view):
        n = core.frontend_data(f, cid, view[off : off + CHUNK])
        if n < 0:
            return False
        if n == 0:
            await link.wait(cid)
            continue
        off += n
    return True


class _ProxyService(pb_grpc.ProxyServiceServicer):
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
                        while (f.pending or f.conns) and not writer.done():
                            link.changed.clear()
                            await link.changed.wait()
                        await link.queue.join()
        finally:
            for t in (reader, writer, stopping):
                t.cancel()
            await asyncio.gather(reader, writer, stopping, return_exceptions=True)
            core.remove_frontend(f)

    async def _read(self, context: Any, f: Frontend, link: _FrontendQueue) -> None:
        core = self.server.core
        while True:
            pkt = await context.read()
            if pkt is grpc.aio.EOF:
                return
            try:
                P.check(pkt)
            except P.PacketError:
                core.stats["frontend_bad_packet"] += 1
                continue
            t = pkt.type
            if t == PacketType.DIAL_REQ:
                r = pkt.dialRequest
                core.dial(f, r.random, r.protocol, r.address)
            elif t == PacketType.DATA:
                cid = pkt.data.connectID
                if not await forward_with_credit(core, f, link, cid, pkt.data.data):
                    link.send(P.close_response(cid, "unrecognized connectID"))
            elif t == PacketType.CLOSE_REQ:
                cid = pkt.closeRequest.connectID
                if not core.frontend_close(f, cid):
                    link.send(P.close_response(cid, "Unknown connectID"))
            elif t == PacketType.DIAL_CLS:
                core.cancel_dial(f, pkt.closeDial.random)
            else:
                core.stats["frontend_unexpected_packet"] += 1

    async def _write(self, context: Any, f: Frontend, link: _FrontendQueue) -> None:
        core = self.server.core
        while True:
            pkt = await link.queue.get()
            await context.write(pkt)
            if pkt.type == PacketType.DATA:
                core.frontend_consumed(f, pkt.data.connectID, len(pkt.data.data))
            link.queue.task_done()


# --------------------------------------------------------------------------------------------------
# apiserver side: HTTP CONNECT
# --------------------------------------------------------------------------------------------------


class _HTTPFrontend(_FrontendQueue):
    """One CONNECT socket: the DIAL_RSP resolves a future, DATA and CLOSE_RSP go to the writer."""

    def __init__(self) -> None:
        super().__init__()
        self.dialed: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.out: deque[Packet] = deque()
        self.ready = asyncio.Event()

    def send(self, packet: Packet) -> None:
        if packet.type == PacketType.DIAL_RSP:
            if not self.dialed.done():
                self.dialed.set_result(packet.dialResponse)
            return
        self.out.append(packet)
        self.ready.set()


async def _serve_http_connect(server: KonnectivityServer, reader: asyncio.StreamReader,
                              writer: asyncio.StreamWriter) -> None:
    core = server.core
    f: Frontend | None = None
    try:
        buf = b""
        try:
            async with asyncio.timeout(HEAD_TIMEOUT):
                while (req := parse_connect(buf)) is None:
                    chunk = await reader.read(4096)
                    if not chunk:
                        return
                    buf += chunk
        except HTTPError as e:
            core.stats[f"http_error_{e.status}"] += 1
            writer.write(error_response(e.status, e.message))
            return
        except TimeoutError:
            writer.write(error_response(408, "timed out reading the CONNECT request"))
            return
        early = buf[req.head_length :]
        link = _HTTPFrontend()
        f = core.add_frontend(link, "http-connect")
        core.dial(f, 1, "tcp", req.address)
        rsp = await link.dialed
        if rsp.error:
            writer.write(error_response(status_for_dial_error(rsp.error), rsp.error))
            return
        cid = rsp.connectID
        writer.write(ESTABLISHED)
        up = asyncio.create_task(_http_up(core, f, link, cid, reader, early))
        try:
            await _http_down(core, f, link, cid, writer)
        finally:
            up.cancel()
    except (ConnectionError, OSError):
        pass
    finally:
        if f is not None:
            core.remove_frontend(f)
        with contextlib.suppress(Exception):
            await writer.drain()
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def _http_up(core: ProxyCore, f: Frontend, link: _HTTPFrontend, cid: int, reader: asyncio.StreamReader,
                   early: bytes) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        if early and not await forward_with_credit(core, f, link, cid, early):
            return
        while True:
            chunk = await reader.read(CHUNK)
            if not chunk:
                break
            if not await forward_with_credit(core, f, link, cid, chunk):
                return
    core.frontend_close(f, cid)


async def _http_down(core: ProxyCore, f: Frontend, link: _HTTPFrontend, cid: int,
                     writer: asyncio.StreamWriter) -> None:
    while True:
        while not link.out:
            link.ready.clear()
            await link.ready.wait()
        pkt = link.out.popleft()
        if pkt.type == PacketType.DATA:
            writer.write(pkt.data.data)
            await writer.drain()
            core.frontend_consumed(f, cid, len(pkt.data.data))
        elif pkt.type == PacketType.CLOSE_RSP:
            return


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
                              dial_timeout=dial_timeout, replace_grace=replace_grace, schedule=self._schedule)
        self.agent_port = 0
        self.health_port: int | None = None
        self._agent_server: grpc.aio.Server | None = None
        self._frontend_grpc: grpc.aio.Server | None = None
        self._frontend_http: asyncio.Server | None = None
        self._http_tasks: set[asyncio.Task[None]] = set()
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
        pb_grpc.add_AgentServiceServicer_to_server(_AgentService(self), self._agent_server)
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
            pb_grpc.add_ProxyServiceServicer_to_server(_ProxyService(self), self._frontend_grpc)
            if not self._frontend_grpc.add_insecure_port(f"unix:{self.uds_path}"):
                raise OSError(f"cannot listen on {self.uds_path}")
            await self._frontend_grpc.start()
        else:
            self._frontend_http = await asyncio.start_unix_server(self._on_http, path=str(self.uds_path),
                                                                  limit=CHUNK)
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
            for t in list(self._http_tasks):
                t.cancel()
            if self._http_tasks:
                await asyncio.gather(*self._http_tasks, return_exceptions=True)
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

    # -------------------------------------------------------------------------------- apiserver side

    async def _on_http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # the work runs in a task of our own, so stop() can cancel it without asyncio's stream callback
        # reporting the cancellation as an error
        task = asyncio.create_task(_serve_http_connect(self, reader, writer))
        self._http_tasks.add(task)
        try:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(task)
        finally:
            self._http_tasks.discard(task)

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
