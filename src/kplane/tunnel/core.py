"""The Konnectivity server's relay, sans I/O.

State (all of it lives here; the asyncio server only moves packets in and out):

- **agents**: the connected agent streams, grouped by ``agentid``, newest first, each with the identifiers it
  declared, whether it is draining, its pending dials and its connections. Dials go to one stream per agent, the
  newest *confirmed* one. An agent reconnects because it believes its old stream dead (a NAT may have dropped it
  without a reset), so the new stream must take over. But an agent discovering servers behind a load balancer
  also opens short-lived duplicate streams (closed as soon as it sees a ``serverid`` it already holds), and those
  must not steal dials or kill the established stream. So:

  - a stream that declares it ``replaces`` the agent's others (kplane's agent says so when it holds no stream to
    this server) is confirmed and takes the agent's dials at once. The older streams stop getting dials but are
    not killed: if they are dead, keepalives end them; if two attempts raced, the agent closes the one it does
    not keep and dials fall back to the other. Nothing churns.
  - otherwise (upstream's agent cannot tell us) the new stream is confirmed, and the older ones closed, only if it
    is still there after ``replace_grace`` seconds; until then dials keep going to the established stream.

  At most ``MAX_STREAMS_PER_AGENT`` streams per agent are kept; beyond that the oldest are closed.
- **frontends**: one entry per apiserver-side stream (a gRPC ``Proxy`` stream or one HTTP-CONNECT socket), with
  its own pending dials and connections.
- a **pending dial** links ``(frontend, the frontend's random)`` to ``(agent, a random we chose)``; a
  **connection** links ``(frontend, a connectID we chose)`` to ``(agent, the agent's connectID)``. Renumbering on
  both sides keeps frontends from colliding with (or guessing at) each other's dials and connections, and lets
  one frontend stream carry connections through several agents.

Inputs are method calls (a packet from an agent, a dial/data/close from a frontend, a stream going away, a
timer firing); outputs are calls on the links' non-blocking ``send()`` (a queue put). Nothing here awaits, so a
slow peer can only ever fill its own queue, and that is bounded by the per-connection flow control of
:mod:`kplane.tunnel.flow`. For an agent without windows that includes pausing the reading of its stream (the
link's ``pause_reading``/``resume_reading``) while one of its connections holds more than ``buffer_limit``.

Routing (``strategies``, evaluated in order, as upstream's ``--proxy-strategies``): ``destHost`` (the dial host
equals a declared ``host``/``ipv4``/``ipv6``), ``destCIDR`` (inside a declared ``cidr``; upstream parses but never
routes on these), ``defaultRoute`` (agents that declared ``default-route=true``) and ``default`` (any agent). With
``only_declared`` (the default) every strategy only considers agents that declared the destination one way or
another, so an agent is never asked to dial an address it did not claim; non-draining agents are preferred.
"""

from __future__ import annotations

import itertools
import random
from collections import Counter
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from kplane.tunnel import packets as P
from kplane.tunnel.flow import (
    DEFAULT_BUFFER_LIMIT,
    STALL_TIMEOUT,
    Cancellable,
    FlowControlError,
    ReadGate,
    ReceiveBuffer,
    Scheduler,
    SendCredit,
)
from kplane.tunnel.packets import AgentIdentifiers, Packet, PacketType

STRATEGIES = ("destHost", "destCIDR", "defaultRoute", "default")

# dial failure texts (the HTTP-CONNECT side maps them to statuses, see httpconnect.status_for_dial_error)
ERR_NO_AGENT = "no agent available"
ERR_AGENT_GONE = "agent disconnected"
ERR_DIAL_TIMEOUT = "timed out waiting for the agent's dial"
ERR_TOO_MANY = "too many pending dials"
ERR_DUPLICATE = "duplicate dial id"
ERR_DIAL_CLOSED = "dial closed by the agent"

MAX_PENDING_PER_FRONTEND = 256
MAX_STREAMS_PER_AGENT = 4
MAX_CONNS_PER_FRONTEND = 4096
LOCAL_CREDIT = 1 << 20  # in-flight bytes per connection toward an agent that does not do windows


class AgentLink(Protocol):
    """One agent's stream, as the relay sees it."""

    def send(self, packet: Packet) -> None: ...  # enqueue, never blocks

    # enqueue DATA (the link may merge it with DATA queued just before for the same connection); ``payload`` is
    # bytes or a view of bytes that never change
    def send_data(self, connect_id: int, payload: bytes | memoryview) -> None: ...

    def close(self, reason: str) -> None: ...  # end the stream (replaced, protocol violation)

    def pause_reading(self) -> None: ...  # stop reading the stream (an agent without windows sends too much)

    def resume_reading(self) -> None: ...


class FrontendLink(Protocol):
    """One apiserver-side stream or socket."""

    def send(self, packet: Packet) -> None: ...  # enqueue, never blocks

    def send_data(self, connect_id: int, payload: bytes | memoryview) -> None: ...  # as AgentLink.send_data

    def wake(self, connect_id: int) -> None: ...  # connect_id got send credit, or was closed: look again


@dataclass(eq=False)
class Agent:
    agent_id: str
    identifiers: AgentIdentifiers
    user: str
    link: AgentLink
    window: int | None  # the agent's announced receive window (kplane extension), None: upstream agent
    gate: ReadGate  # holds the stream's reading while a connection lags (only an agent without windows)
    draining: bool = False
    pending: dict[int, Pending] = field(default_factory=dict)  # our random -> dial
    conns: dict[int, Conn] = field(default_factory=dict)  # agent's connectID -> connection
    randoms: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    gone: bool = False
    confirmed: bool = False


@dataclass(eq=False)
class Frontend:
    link: FrontendLink
    kind: str  # "grpc" | "http-connect"
    pending: dict[int, Pending] = field(default_factory=dict)  # frontend's random -> dial
    conns: dict[int, Conn] = field(default_factory=dict)  # our connectID -> connection
    ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    gone: bool = False


@dataclass(eq=False)
class Pending:
    frontend: Frontend
    frontend_random: int
    agent: Agent
    random: int
    address: str
    timer: Cancellable | None = None


@dataclass(eq=False)
class Conn:
    agent: Agent
    agent_cid: int
    frontend: Frontend
    cid: int
    to_agent: SendCredit
    from_agent: ReceiveBuffer
    closing: bool = False
    timer: Cancellable | None = None


class _NoTimer:
    def cancel(self) -> None:
        pass


def _no_schedule(delay: float, fn: Callable[[], None]) -> Cancellable:
    return _NoTimer()


class ProxyCore:
    def __init__(
        self,
        *,
        strategies: Iterable[str] = ("destHost", "default"),
        only_declared: bool = True,
        window: int | None = None,
        buffer_limit: int = DEFAULT_BUFFER_LIMIT,
        stall_timeout: float = STALL_TIMEOUT,
        dial_timeout: float = 10.0,
        close_timeout: float = 10.0,
        replace_grace: float = 5.0,
        schedule: Scheduler = _no_schedule,
        rng: random.Random | None = None,
    ) -> None:
        self.strategies = tuple(strategies)
        for s in self.strategies:
            if s not in STRATEGIES:
                raise ValueError(f"unknown proxy strategy {s!r} (want one of {', '.join(STRATEGIES)})")
        if not self.strategies:
            raise ValueError("at least one proxy strategy is needed")
        self.only_declared = only_declared
        self.window = window  # what we announce to agents that do windows
        self.buffer_limit = buffer_limit
        self.stall_timeout = stall_timeout
        self.dial_timeout = dial_timeout
        self.close_timeout = close_timeout
        self.replace_grace = replace_grace
        self.schedule = schedule
        self.rng = rng or random.Random()
        self.agents: dict[str, list[Agent]] = {}  # agentid -> its streams, newest first
        self.frontends: set[Frontend] = set()
        self.stats: Counter[str] = Counter()

    # ---------------------------------------------------------------------------------------- agents

    def add_agent(self, agent_id: str, identifiers: AgentIdentifiers, user: str, link: AgentLink,
                  window: int | None, *, replaces: bool = False) -> Agent:
        """Register an authenticated agent stream (see the module docstring for ``replaces``)."""
        gate = ReadGate(pause=link.pause_reading, resume=link.resume_reading, schedule=self.schedule,
                        on_stall=self._conn_stalled, stall_timeout=self.stall_timeout)
        a = Agent(agent_id=agent_id, identifiers=identifiers, user=user, link=link,
                  window=window if self.window is not None else None, gate=gate)
        streams = self.agents.setdefault(agent_id, [])
        streams.insert(0, a)
        for extra in streams[MAX_STREAMS_PER_AGENT:]:
            self._retire(extra)
        if replaces or len(streams) == 1:
            a.confirmed = True
        else:
            self.schedule(self.replace_grace, lambda: self._confirm(a))
        return a

    def _confirm(self, a: Agent) -> None:
        """``a`` outlived the grace period: it is the agent's stream now, the older ones go."""
        streams = self.agents.get(a.agent_id)
        if a.gone or not streams or a not in streams:
            return
        a.confirmed = True
        for old in streams[streams.index(a) + 1 :]:
            self._retire(old)

    def _target(self, streams: list[Agent]) -> Agent:
        return next((a for a in streams if a.confirmed), streams[0])

    def _retire(self, old: Agent) -> None:
        reason = "replaced by a newer connection from the same agent"
        self.stats["agent_replaced"] += 1
        self.remove_agent(old, reason=reason)
        old.link.close(reason)

    def remove_agent(self, agent: Agent, *, reason: str = ERR_AGENT_GONE) -> None:
        """The agent's stream ended: fail its pending dials now and close its connections."""
        if agent.gone:
            return
        agent.gone = True
        streams = self.agents.get(agent.agent_id)
        if streams is not None and agent in streams:
            streams.remove(agent)
            if not streams:
                del self.agents[agent.agent_id]
            elif not any(a.confirmed for a in streams):
                streams[0].confirmed = True
        for p in list(agent.pending.values()):
            self._drop_pending(p)
            self._dial_failed(p, f"{ERR_AGENT_GONE}: {reason}" if reason != ERR_AGENT_GONE else reason)
        for c in list(agent.conns.values()):
            self._drop_conn(c)
            if not c.frontend.gone:
                c.frontend.link.send(P.close_response(c.cid, ERR_AGENT_GONE))

    def from_agent(self, agent: Agent, packet: Packet) -> None:
        if agent.gone:
            return
        try:
            P.check(packet)
        except P.PacketError:
            self.stats["agent_bad_packet"] += 1
            return
        t = packet.type
        self.stats[f"from_agent_{P.type_name(packet)}"] += 1
        if t == PacketType.DIAL_RSP:
            self._agent_dial_response(agent, packet.dialResponse)
        elif t == PacketType.DATA:
            self._agent_data(agent, packet.data.connectID, packet.data.data)
        elif t == PacketType.CLOSE_RSP:
            c = agent.conns.get(packet.closeResponse.connectID)
            if c is not None:
                self._drop_conn(c)
                if not c.frontend.gone:
                    c.frontend.link.send(P.close_response(c.cid, packet.closeResponse.error))
        elif t == PacketType.DIAL_CLS:
            p = agent.pending.get(packet.closeDial.random)
            if p is not None:
                self._drop_pending(p)
                self._dial_failed(p, ERR_DIAL_CLOSED)
        elif t == PacketType.DRAIN:
            agent.draining = True
        elif t == PacketType.KPLANE_WINDOW_UPDATE:
            c = agent.conns.get(packet.windowUpdate.connectID)
            if c is None or agent.window is None:
                return
            try:
                c.to_agent.give(packet.windowUpdate.bytes)
            except FlowControlError as e:
                self._abort_conn(c, str(e))
                return
            if not c.frontend.gone:
                c.frontend.link.wake(c.cid)
        else:  # DIAL_REQ, CLOSE_REQ: not something an agent sends
            self.stats["agent_unexpected_packet"] += 1

    def agent_data(self, agent: Agent, connect_id: int, payload: bytes | memoryview) -> None:
        """A DATA packet from the agent, already taken apart (the stream reader's fast path)."""
        if agent.gone:
            return
        self.stats["from_agent_DATA"] += 1
        self._agent_data(agent, connect_id, payload)

    def agent_sent_data(self, agent: Agent, connect_id: int, n: int) -> None:
        """The agent's stream writer handed ``n`` bytes of DATA for the agent's ``connect_id`` to gRPC. For an
        agent without windows this is what returns local send credit."""
        if agent.window is not None or n <= 0:
            return
        c = agent.conns.get(connect_id)
        if c is not None and c.agent is agent:
            try:
                c.to_agent.give(n)
            except FlowControlError:
                return
            if not c.frontend.gone:
                c.frontend.link.wake(c.cid)

    def _agent_dial_response(self, agent: Agent, rsp: P.pb.DialResponse) -> None:
        p = agent.pending.get(rsp.random)
        if p is None:
            # a late answer to a dial that timed out or was cancelled: don't leave the connection open
            self.stats["dial_unrecognized_response"] += 1
            if rsp.connectID and not rsp.error:
                agent.link.send(P.close_request(rsp.connectID))
            return
        self._drop_pending(p)
        if rsp.error or rsp.connectID == 0 or rsp.connectID in agent.conns:
            if not rsp.error and rsp.connectID:
                # a connectID that is already in use: refuse the new one, keep the old
                self.stats["dial_duplicate_connect_id"] += 1
                self._dial_failed(p, "agent answered with a connectID already in use")
                return
            self._dial_failed(p, rsp.error or "agent answered without a connectID")
            return
        f = p.frontend
        if f.gone:
            agent.link.send(P.close_request(rsp.connectID))
            return
        if len(f.conns) >= MAX_CONNS_PER_FRONTEND:
            agent.link.send(P.close_request(rsp.connectID))
            f.link.send(P.dial_response(p.frontend_random, error="too many connections on this stream"))
            return
        cid = next(f.ids)
        to_agent = (SendCredit(agent.window, ceiling=agent.window * 4) if agent.window is not None
                    else SendCredit(LOCAL_CREDIT, ceiling=LOCAL_CREDIT))
        from_agent = ReceiveBuffer(window=self.window if agent.window is not None else None,
                                   limit=self.buffer_limit)
        c = Conn(agent=agent, agent_cid=rsp.connectID, frontend=f, cid=cid, to_agent=to_agent,
                 from_agent=from_agent)
        agent.conns[rsp.connectID] = c
        f.conns[cid] = c
        self.stats["dial_ok"] += 1
        f.link.send(P.dial_response(p.frontend_random, connect_id=cid))

    def _agent_data(self, agent: Agent, agent_cid: int, payload: bytes | memoryview) -> None:
        c = agent.conns.get(agent_cid)
        if c is None:
            # data for a connection nobody holds (upstream answers with CLOSE_REQ too)
            self.stats["data_unrecognized"] += 1
            agent.link.send(P.close_request(agent_cid))
            return
        if c.closing or c.frontend.gone:
            return
        buf = c.from_agent
        try:
            buf.received(len(payload))
        except FlowControlError as e:
            self._abort_conn(c, str(e))
            return
        c.frontend.link.send_data(c.cid, payload)
        if buf.over:
            agent.gate.update(c, True)

    # ------------------------------------------------------------------------------------- frontends

    def add_frontend(self, link: FrontendLink, kind: str) -> Frontend:
        f = Frontend(link=link, kind=kind)
        self.frontends.add(f)
        self.stats[f"frontend_{kind}"] += 1
        return f

    def remove_frontend(self, f: Frontend) -> None:
        """The frontend went away: cancel its dials and close its connections at the agents."""
        if f.gone:
            return
        f.gone = True
        self.frontends.discard(f)
        for p in list(f.pending.values()):
            self._drop_pending(p)
            if not p.agent.gone:
                p.agent.link.send(P.close_dial(p.random))
        for c in list(f.conns.values()):
            self._drop_conn(c)
            if not c.agent.gone:
                c.agent.link.send(P.close_request(c.agent_cid))

    def dial(self, f: Frontend, frontend_random: int, protocol: str, address: str) -> None:
        """A DIAL_REQ from a frontend; the answer arrives as a DIAL_RSP on ``f.link``."""
        if f.gone:
            return
        if frontend_random in f.pending:
            f.link.send(P.dial_response(frontend_random, error=ERR_DUPLICATE))
            return
        if len(f.pending) >= MAX_PENDING_PER_FRONTEND:
            self.stats["dial_failure_too_many"] += 1
            f.link.send(P.dial_response(frontend_random, error=ERR_TOO_MANY))
            return
        if protocol != "tcp":
            f.link.send(P.dial_response(frontend_random, error=f"unsupported protocol {protocol[:20]!r}"))
            return
        try:
            host, port = P.split_host_port(address)
        except ValueError as e:
            f.link.send(P.dial_response(frontend_random, error=f"invalid address: {e}"))
            return
        agent = self.route(host)
        if agent is None:
            self.stats["dial_failure_no_agent"] += 1
            f.link.send(P.dial_response(frontend_random, error=f"{ERR_NO_AGENT} for {host}"))
            return
        r = next(agent.randoms)
        p = Pending(frontend=f, frontend_random=frontend_random, agent=agent, random=r,
                    address=P.join_host_port(host, port))
        agent.pending[r] = p
        f.pending[frontend_random] = p
        p.timer = self.schedule(self.dial_timeout, lambda: self._dial_timed_out(p))
        agent.link.send(P.dial_request(p.address, r))

    def cancel_dial(self, f: Frontend, frontend_random: int) -> None:
        """DIAL_CLS from a frontend: forget the dial and tell the agent (ours cancels it)."""
        p = f.pending.get(frontend_random)
        if p is None:
            return
        self._drop_pending(p)
        if not p.agent.gone:
            p.agent.link.send(P.close_dial(p.random))

    def frontend_data(self, f: Frontend, cid: int, payload: bytes | memoryview) -> int:
        """Forward as much of ``payload`` as the connection's send credit allows; returns the number of bytes
        taken (0: wait for ``f.link.wake(cid)``), or -1 if ``cid`` is not an open connection of ``f``. The bytes
        are queued, not copied: ``payload`` must be bytes or a view of bytes that never change."""
        c = f.conns.get(cid)
        if c is None or c.closing:
            return -1
        size = len(payload)
        n = c.to_agent.take(size)
        if n:
            c.agent.link.send_data(c.agent_cid, payload if n == size else payload[:n])
        return n

    def frontend_consumed(self, f: Frontend, cid: int, n: int) -> None:
        """``n`` bytes of ``cid``'s data were written to the frontend."""
        c = f.conns.get(cid)
        if c is None:
            return
        grant = c.from_agent.consumed(n)
        if grant and not c.agent.gone:
            c.agent.link.send(P.window_update(c.agent_cid, grant))
        elif c.agent.window is None:
            c.agent.gate.update(c, c.from_agent.over)

    def frontend_close(self, f: Frontend, cid: int) -> bool:
        """CLOSE_REQ from a frontend (or EOF on an HTTP-CONNECT socket). The agent's CLOSE_RSP completes it;
        if none comes within ``close_timeout`` the connection is dropped anyway. False: unknown cid."""
        c = f.conns.get(cid)
        if c is None:
            return False
        if not c.closing:
            c.closing = True
            c.agent.link.send(P.close_request(c.agent_cid))
            c.timer = self.schedule(self.close_timeout, lambda: self._close_timed_out(c))
        return True

    # ------------------------------------------------------------------------------------- internals

    def route(self, host: str) -> Agent | None:
        for strategy in self.strategies:
            targets = [self._target(s) for s in self.agents.values()]
            cands = [a for a in targets if self._candidate(strategy, a, host)]
            if cands:
                fresh = [a for a in cands if not a.draining]
                return self.rng.choice(fresh or cands)
        return None

    def _candidate(self, strategy: str, a: Agent, host: str) -> bool:
        ids = a.identifiers
        if strategy == "destHost":
            return ids.matches_host(host)
        if strategy == "destCIDR":
            return ids.matches_cidr(host)
        if strategy == "defaultRoute":
            return ids.default_route
        return not self.only_declared or ids.covers(host)

    def _drop_pending(self, p: Pending) -> None:
        if p.timer is not None:
            p.timer.cancel()
            p.timer = None
        if p.agent.pending.get(p.random) is p:
            del p.agent.pending[p.random]
        if p.frontend.pending.get(p.frontend_random) is p:
            del p.frontend.pending[p.frontend_random]

    def _dial_failed(self, p: Pending, error: str) -> None:
        self.stats["dial_failure"] += 1
        if not p.frontend.gone:
            p.frontend.link.send(P.dial_response(p.frontend_random, error=error))

    def _dial_timed_out(self, p: Pending) -> None:
        p.timer = None
        if p.agent.pending.get(p.random) is not p:
            return
        self._drop_pending(p)
        self.stats["dial_failure_timeout"] += 1
        if not p.agent.gone:
            p.agent.link.send(P.close_dial(p.random))
        self._dial_failed(p, ERR_DIAL_TIMEOUT)

    def _drop_conn(self, c: Conn) -> None:
        if c.timer is not None:
            c.timer.cancel()
            c.timer = None
        if c.agent.conns.get(c.agent_cid) is c:
            del c.agent.conns[c.agent_cid]
        c.agent.gate.release(c)
        if c.frontend.conns.get(c.cid) is c:
            del c.frontend.conns[c.cid]
            if not c.frontend.gone:
                c.frontend.link.wake(c.cid)  # a sender waiting for credit on it must notice

    def _abort_conn(self, c: Conn, error: str) -> None:
        """Close one connection on both sides (flow-control violation or a stalled frontend)."""
        self.stats["conn_aborted"] += 1
        self._drop_conn(c)
        if not c.agent.gone:
            c.agent.link.send(P.close_request(c.agent_cid))
        if not c.frontend.gone:
            c.frontend.link.send(P.close_response(c.cid, error))

    def _conn_stalled(self, key: Hashable) -> None:
        """An agent without windows has had its stream paused for ``stall_timeout`` by this connection, whose
        frontend is not reading: close it, as upstream's client closes a tunnel that stalls this long."""
        assert isinstance(key, Conn)
        self.stats["conn_stalled"] += 1
        self._abort_conn(key, f"its reader stayed over {self.buffer_limit} bytes behind for {self.stall_timeout:g} s")

    def _close_timed_out(self, c: Conn) -> None:
        c.timer = None
        if c.agent.conns.get(c.agent_cid) is not c:
            return
        self._drop_conn(c)
        if not c.frontend.gone:
            c.frontend.link.send(P.close_response(c.cid, "agent did not confirm the close"))

    # ------------------------------------------------------------------------------------- metrics

    @property
    def ready(self) -> bool:
        return bool(self.agents)

    def gauges(self) -> dict[str, int]:
        streams = [a for s in self.agents.values() for a in s]
        return {
            "ready_backends": len(self.agents),
            "ready_backend_connections": len(streams),
            "draining_backends": sum(1 for s in self.agents.values() if self._target(s).draining),
            "pending_backend_dials": sum(len(a.pending) for a in streams),
            "established_connections": sum(len(a.conns) for a in streams),
            "frontends": len(self.frontends),
        }
