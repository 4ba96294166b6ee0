"""The Konnectivity agent: dials out to the server(s) and dials on their behalf.

The agent is the gRPC *client*: it opens ``/AgentService/Connect`` to each server with its ``agentid``, its
``agentidentifiers`` and, in token mode, ``authorization: Bearer <token>`` (re-read from ``token_file`` on every
connect, so a rotated projected token is picked up). Which servers to hold and when to redial is decided by
:class:`kplane.tunnel.clientset.ClientSetPlanner` (``servercount``/``serverid`` semantics, capped jittered
exponential back-off).

On each stream it answers ``DIAL_REQ`` by connecting to the target (only destinations its
:class:`~kplane.tunnel.packets.AddressPolicy` allows; 5 s timeout), then pumps bytes:

- the receive loop never awaits anything but the next packet: ``DATA`` is appended to that connection's
  buffer, whose size per-connection flow control bounds (:mod:`kplane.tunnel.flow`), and a per-connection
  writer task drains it to the socket. A target that stops reading therefore stalls only its own connection.
- a per-connection reader task reads the target only while it holds send credit, so one busy connection
  cannot fill the shared stream's queue either.

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
from collections import deque
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import grpc

from kplane.tunnel import konnectivity_pb2_grpc as pb_grpc
from kplane.tunnel import packets as P
from kplane.tunnel.clientset import Backoff, ClientSetPlanner
from kplane.tunnel.flow import (
    CHUNK,
    DEFAULT_BUFFER_LIMIT,
    DEFAULT_WINDOW,
    FlowControlError,
    ReceiveBuffer,
    SendCredit,
    parse_window,
)
from kplane.tunnel.packets import AddressPolicy, AgentIdentifiers, Packet, PacketType

log = logging.getLogger(__name__)

MAX_MESSAGE = 4 << 20 | 1024
LOCAL_CREDIT = 256 << 10  # in-flight bytes per connection toward a server that does not do windows
MAX_PENDING_DIALS = 256
FLUSH_ON_CLOSE = 5.0


class ConnectError(Exception):
    """A server could not be connected to (or refused us)."""


class _Endpoint:
    """One tunnelled TCP connection on the agent side."""

    def __init__(self, session: _Session, cid: int, random: int, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.session = session
        self.cid = cid
        self.random = random
        self.reader = reader
        self.writer = writer
        negotiated = session.peer_window is not None
        self.credit = (SendCredit(session.peer_window, ceiling=session.peer_window * 4)
                       if session.peer_window is not None else SendCredit(LOCAL_CREDIT, ceiling=LOCAL_CREDIT))
        self.recv = ReceiveBuffer(window=session.agent.window if negotiated else None,
                                  limit=session.agent.buffer_limit)
        self.out: deque[bytes] = deque()
        self.out_ready = asyncio.Event()
        self.credit_ready = asyncio.Event()
        self.closing = False
        self.tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self.tasks = [asyncio.create_task(self._pump_in()), asyncio.create_task(self._pump_out())]

    # called from the receive loop: never await
    def on_data(self, payload: bytes) -> None:
        if self.closing:
            return
        try:
            self.recv.received(len(payload))
        except FlowControlError as e:
            self.session.close_endpoint(self, error=str(e))
            return
        self.out.append(payload)
        self.out_ready.set()

    def on_credit(self, n: int) -> None:
        try:
            self.credit.give(n)
        except FlowControlError as e:
            self.session.close_endpoint(self, error=str(e))
            return
        self.credit_ready.set()

    async def _pump_in(self) -> None:
        """target → server, only with credit."""
        try:
            while True:
                while self.credit.available <= 0:
                    self.credit_ready.clear()
                    await self.credit_ready.wait()
                chunk = await self.reader.read(min(CHUNK, self.credit.available))
                if not chunk:
                    break
                self.credit.take(len(chunk))
                self.session.send(P.data(self.cid, chunk))
        except (ConnectionError, OSError):
            pass
        # the target closed (or failed): tell the server, unsolicited CLOSE_RSP as upstream does
        self.session.close_endpoint(self)

    async def _pump_out(self) -> None:
        """server → target, as fast as the target reads."""
        try:
            while True:
                while not self.out:
                    if self.closing:
                        return
                    self.out_ready.clear()
                    await self.out_ready.wait()
                chunk = self.out.popleft()
                self.writer.write(chunk)
                await self.writer.drain()
                grant = self.recv.consumed(len(chunk))
                if grant and not self.closing:
                    self.session.send(P.window_update(self.cid, grant))
        except (ConnectionError, OSError):
            if not self.closing:
                self.session.close_endpoint(self, error="write to the target failed")
        finally:
            if self.closing:
                self.writer.close()

    def shutdown(self, *, flush: bool) -> None:
        """Stop reading the target; with ``flush`` deliver what was already received, then close."""
        self.closing = True
        self.out_ready.set()
        current = asyncio.current_task()
        if self.tasks and self.tasks[0] is not current:
            self.tasks[0].cancel()
        if not flush or not self.out:
            if self.tasks and self.tasks[1] is not current:
                self.tasks[1].cancel()
            self.writer.close()
            return
        # let _pump_out drain the remainder, bounded in time
        asyncio.get_running_loop().call_later(FLUSH_ON_CLOSE, self._kill)

    def _kill(self) -> None:
        for t in self.tasks:
            t.cancel()
        self.writer.close()


class _Session:
    """One Connect stream to one server."""

    def __init__(self, agent: KonnectivityAgent, address: str, channel: grpc.aio.Channel, call: Any,
                 server_id: str, server_count: int, peer_window: int | None) -> None:
        self.agent = agent
        self.address = address
        self.channel = channel
        self.call = call
        self.server_id = server_id
        self.server_count = server_count
        self.peer_window = peer_window
        self.queue: asyncio.Queue[Packet] = asyncio.Queue()
        self.conns: dict[int, _Endpoint] = {}
        self.dials: dict[int, asyncio.Task[None]] = {}
        self.dialed: dict[int, int] = {}  # random -> cid, for a DIAL_CLS that arrives after the dial completed
        self.cids = itertools.count(1)
        self.closed = False

    def send(self, packet: Packet) -> None:
        if not self.closed:
            self.queue.put_nowait(packet)

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
            ep.shutdown(flush=False)
        self.conns.clear()
        self.call.cancel()
        await self.channel.close(grace=None)

    async def _read(self) -> None:
        while True:
            pkt = await self.call.read()
            if pkt is grpc.aio.EOF:
                return
            self.handle(pkt)

    async def _write(self) -> None:
        while True:
            pkt = await self.queue.get()
            await self.call.write(pkt)
            if self.peer_window is None and pkt.type == PacketType.DATA:
                ep = self.conns.get(pkt.data.connectID)
                if ep is not None:
                    ep.on_credit(len(pkt.data.data))

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
            ep = self.conns.get(pkt.data.connectID)
            if ep is None:
                self.send(P.close_response(pkt.data.connectID, "unrecognized connectID"))
            else:
                ep.on_data(pkt.data.data)
        elif t == PacketType.CLOSE_REQ:
            cid = pkt.closeRequest.connectID
            ep = self.conns.get(cid)
            if ep is None:
                self.send(P.close_response(cid, "Unknown connectID"))
            else:
                self._forget(ep)
                ep.shutdown(flush=True)
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

    def close_endpoint(self, ep: _Endpoint, *, error: str = "") -> None:
        """Close a connection from this side and tell the server (CLOSE_RSP, as upstream's agent does)."""
        if self.conns.get(ep.cid) is not ep:
            return
        self._forget(ep)
        ep.shutdown(flush=False)
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
            try:
                async with asyncio.timeout(agent.dial_timeout):
                    reader, writer = await asyncio.open_connection(host, port, limit=CHUNK)
            except TimeoutError:
                self.send(P.dial_response(random, error=f"dial tcp {address}: i/o timeout"))
                return
            except OSError as e:
                self.send(P.dial_response(random, error=f"dial tcp {address}: {e.strerror or e}"))
                return
            if self.closed:
                writer.close()
                return
            cid = next(self.cids)
            ep = _Endpoint(self, cid, random, reader, writer)
            self.conns[cid] = ep
            self.dialed[random] = cid
            agent.stats["dial_ok"] += 1
            self.send(P.dial_response(random, connect_id=cid))
            ep.start()
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
        self.keepalive = keepalive
        self.sessions: dict[str, _Session] = {}
        self.stats: dict[str, int] = {"dial_ok": 0, "dial_refused": 0, "connect_failures": 0}
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
            call = pb_grpc.AgentServiceStub(channel).Connect(metadata=md)
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
