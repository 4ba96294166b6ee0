"""Konnectivity server and agent over real gRPC, real TLS (certificates from kplane.pki) and real sockets on
loopback: dials in both apiserver-side modes, concurrency, large transfers, per-connection flow control,
reconnects, several servers, and bad input at every endpoint (each followed by a check that the server still
serves)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest

from kplane import pki
from kplane.tunnel import konnectivity_pb2_grpc as pb_grpc
from kplane.tunnel import packets as P
from kplane.tunnel import server as server_mod
from kplane.tunnel.agent import KonnectivityAgent
from kplane.tunnel.auth import NodeAgentAuthorizer
from kplane.tunnel.client import TunnelDialError, dial_grpc, dial_http_connect
from kplane.tunnel.clientset import Backoff
from kplane.tunnel.flow import DEFAULT_BUFFER_LIMIT
from kplane.tunnel.httpconnect import ESTABLISHED
from kplane.tunnel.outbox import MAX_DATA
from kplane.tunnel.packets import PacketType
from kplane.tunnel.server import KonnectivityServer

MODES = ["http-connect", "grpc"]
FAST = Backoff(base=0.05, cap=0.5)

# --------------------------------------------------------------------------------------------------
# certificates and helpers
# --------------------------------------------------------------------------------------------------


@dataclass
class Certs:
    dir: Path
    authority: pki.KeyPair

    def p(self, name: str) -> Path:
        return self.dir / name

    @property
    def ca(self) -> Path:
        return self.p("ca.crt")


def _save(d: Path, name: str, pair: pki.KeyPair) -> None:
    (d / f"{name}.crt").write_bytes(pair.cert_pem())
    if pair.key is not None:
        (d / f"{name}.key").write_bytes(pair.key_pem())


@pytest.fixture(scope="module")
def certs() -> Iterator[Certs]:
    d = Path(tempfile.mkdtemp(prefix="kt-pki-"))
    ca = pki.new_ca("kplane-test-ca")
    _save(d, "ca", ca)
    _save(d, "server", pki.issue(ca, common_name="konnectivity-server", server=True, ips=["127.0.0.1"],
                                 dns_names=["localhost"]))
    for n in ("n1", "n2"):
        _save(d, n, pki.issue(ca, common_name=f"system:node:{n}", organizations=["system:nodes"], client=True))
    _save(d, "alice", pki.issue(ca, common_name="alice", organizations=["system:masters"], client=True))
    _save(d, "serveronly", pki.issue(ca, common_name="system:node:n1", organizations=["system:nodes"],
                                     server=True))
    rogue = pki.new_ca("kplane-test-ca")  # same name, different key
    _save(d, "rogue-ca", pki.KeyPair(rogue.cert))
    _save(d, "rogue", pki.issue(rogue, common_name="system:node:n1", organizations=["system:nodes"], client=True))
    yield Certs(d, ca)
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def sockdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="kt-"))  # short: AF_UNIX paths are limited to 108 bytes
    yield d
    shutil.rmtree(d, ignore_errors=True)


async def _owned(node: str) -> list[str]:
    return {"n1": ["127.0.0.1"], "n2": ["127.0.0.2"]}.get(node, [])


@pytest.fixture
async def stack() -> AsyncIterator[contextlib.AsyncExitStack]:
    async with contextlib.AsyncExitStack() as s:
        yield s


def make_server(certs: Certs, sockdir: Path, mode: str = "http-connect", *, name: str = "k", port: int = 0,
                **kw: Any) -> KonnectivityServer:
    kw.setdefault("authorizer", NodeAgentAuthorizer(node_addresses=_owned))
    return KonnectivityServer(port, sockdir / f"{name}.sock", certs.ca, certs.p("server.crt"),
                              certs.p("server.key"), host="127.0.0.1", mode=mode, health_port=0, **kw)


async def start_server(stack: contextlib.AsyncExitStack, certs: Certs, sockdir: Path, mode: str = "http-connect",
                       **kw: Any) -> KonnectivityServer:
    s = make_server(certs, sockdir, mode, **kw)
    await s.start()
    stack.push_async_callback(s.stop)
    return s


def make_agent(certs: Certs, addresses: list[str], node: str = "n1", ids: str = "ipv4=127.0.0.1",
               **kw: Any) -> KonnectivityAgent:
    if "token" not in kw and "cert_file" not in kw:
        kw["cert_file"], kw["key_file"] = certs.p(f"{node}.crt"), certs.p(f"{node}.key")
    kw.setdefault("backoff", FAST)
    return KonnectivityAgent(addresses, certs.ca, agent_id=kw.pop("agent_id", node), identifiers=ids, **kw)


async def start_agent(stack: contextlib.AsyncExitStack, certs: Certs, servers: list[KonnectivityServer],
                      **kw: Any) -> KonnectivityAgent:
    a = make_agent(certs, [f"127.0.0.1:{s.agent_port}" for s in servers], **kw)
    await a.start()
    stack.push_async_callback(a.stop)
    async with asyncio.timeout(10):
        await a.wait_connected(len(servers))
        await until(lambda: all(s.core.ready for s in servers))
    return a


async def until(cond: Callable[[], bool]) -> None:
    while not cond():  # noqa: ASYNC110 (a liveness bound is always put around this by the caller)
        await asyncio.sleep(0.02)


async def dial(server: KonnectivityServer, host: str, port: int) -> socket.socket:
    if server.mode == "grpc":
        return await dial_grpc(server.uds_path, host, port, dial_timeout=10)
    return await dial_http_connect(server.uds_path, host, port, dial_timeout=10)


async def open_tunnel(server: KonnectivityServer, host: str, port: int
                      ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(sock=await dial(server, host, port), limit=1 << 20)


async def read_exactly(r: asyncio.StreamReader, n: int) -> bytes:
    return await r.readexactly(n)


@dataclass
class TCPServer:
    server: asyncio.Server
    port: int
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]


async def tcp_server(stack: contextlib.AsyncExitStack,
                     handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
                     host: str = "127.0.0.1") -> TCPServer:
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def wrapped(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        conns.append((r, w))
        try:
            await handler(r, w)
        except (ConnectionError, OSError):
            pass
        finally:
            w.close()

    srv = await asyncio.start_server(wrapped, host, 0)
    stack.push_async_callback(srv.wait_closed)
    stack.callback(srv.close)
    stack.callback(lambda: [w.close() for _, w in conns])
    return TCPServer(srv, srv.sockets[0].getsockname()[1], conns)


async def _echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    while data := await r.read(1 << 16):
        w.write(data)
        await w.drain()


async def echo_roundtrip(server: KonnectivityServer, port: int, payload: bytes, host: str = "127.0.0.1") -> None:
    r, w = await open_tunnel(server, host, port)
    try:
        reading = asyncio.create_task(read_exactly(r, len(payload)))
        w.write(payload)
        await w.drain()
        assert hashlib.sha256(await reading).digest() == hashlib.sha256(payload).digest()
    finally:
        w.close()


def raw_channel(certs: Certs, server: KonnectivityServer, node: str | None = "n1") -> grpc.aio.Channel:
    if node is None:
        creds = grpc.ssl_channel_credentials(root_certificates=certs.ca.read_bytes())
    else:
        creds = grpc.ssl_channel_credentials(root_certificates=certs.ca.read_bytes(),
                                             private_key=certs.p(f"{node}.key").read_bytes(),
                                             certificate_chain=certs.p(f"{node}.crt").read_bytes())
    return grpc.aio.secure_channel(f"127.0.0.1:{server.agent_port}", creds,
                                   options=[("grpc.use_local_subchannel_pool", 1)])


async def raw_connect_status(certs: Certs, server: KonnectivityServer, md: list[tuple[str, str]],
                             node: str | None = "n1") -> tuple[grpc.StatusCode, str]:
    """Open Connect by hand and return the status the server ends it with."""
    async with raw_channel(certs, server, node) as ch:
        call = pb_grpc.AgentServiceStub(ch).Connect(metadata=md)
        async with asyncio.timeout(10):
            return await call.code(), await call.details() or ""


# --------------------------------------------------------------------------------------------------
# happy paths
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_echo_through_the_tunnel(certs: Certs, sockdir: Path, stack: contextlib.AsyncExitStack,
                                       mode: str) -> None:
    echo = await tcp_server(stack, _echo)
    server = await start_server(stack, certs, sockdir, mode)
    await start_agent(stack, certs, [server])
    await echo_roundtrip(server, echo.port, b"hello through konnectivity")
    assert server.core.stats["dial_ok"] == 1


@pytest.mark.parametrize("mode", MODES)
async def test_many_concurrent_connections(certs: Certs, sockdir: Path, stack: contextlib.AsyncExitStack,
                                           mode: str) -> None:
    echo = await tcp_server(stack, _echo)
    server = await start_server(stack, certs, sockdir, mode)
    await start_agent(stack, certs, [server])
    async with asyncio.timeout(60):
        await asyncio.gather(*(echo_roundtrip(server, echo.port, os.urandom(64 << 10)) for _ in range(64)))
    assert server.core.stats["dial_ok"] == 64
    async with asyncio.timeout(10):
        await until(lambda: server.core.gauges()["established_connections"] == 0)


@pytest.mark.parametrize("window", [True, False], ids=["kplane-window", "upstream-credit"])
@pytest.mark.parametrize("mode", MODES)
async def test_large_transfer(certs: Certs, sockdir: Path, stack: contextlib.AsyncExitStack, mode: str,
                              window: bool) -> None:
    echo = await tcp_server(stack, _echo)
    server = await start_server(stack, certs, sockdir, mode)
    await start_agent(stack, certs, [server], **({} if window else {"window": None}))
    async with asyncio.timeout(90):
        await echo_roundtrip(server, echo.port, os.urandom(24 << 20))


async def test_several_agents_each_get_the_dials_for_their_own_addresses(
        certs: Certs, sockdir: Path, stack: contextlib.AsyncExitStack) -> None:
    echo1 = await tcp_server(stack, _echo, host="127.0.0.1")
    echo2 = await tcp_server(stack, _echo, host="127.0.0.2")
    server = await start_server(stack, certs, sockdir, "grpc")
    a1 = await start_agent(stack, certs, [server], node="n1", ids="ipv4=127.0.0.1")
    a2 = await start_agent(stack, certs, [server], node="n2", ids="ipv4=127.0.0.2")
    assert set(server.core.agents) == {"n1", "n2"}
    for _ in range(3):
        await echo_roundtrip(server, echo1.port, b"to n1", host="127.0.0.1")
        await echo_roundtrip(server, echo2.port, b"to n2", host="127.0.0.2")
    assert a1.stats["dial_ok"] == 3 and a2.stats["dial_ok"] == 3


async def test_dial_cancelled_by_the_frontend_is_cancelled_at_the_agent(
        certs: Certs, sockdir: Path, stack: contextlib.AsyncExitStack) -> None:
    # a listener whose accept queue is full: a new connect to it hangs (its SYN is dropped)
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    stack.callback(full.close)
    port = full.getsockname()[1]
    filler = socket.create_connection(("127.0.0.1", port))
    stack.callback(filler.close)
    server = await start_server(stack, certs, sockdir, "grpc")
    agent = await start_agent(stack, certs, [server], dial_timeout=30)
    async with grpc.aio.insecure_channel(f"unix:{server.uds_path}") as ch:
        call = pb_grpc.ProxyServiceStub(ch).Proxy()
        await call.write(P.dial_request(f"127.0.0.1:{port}", 77))
        async with asyncio.timeout(10):
            await until(lambda: any(s.dials for s in agent.sessions.values()))
        await call.write(P.close_dial(77))
        async with asyncio.timeout(10):  # well before the agent's own 30 s dial timeout
            await until(lambda: not any(s.dials for s in agent.sessions.values()))
            await until(lambda: server.core.gauges()["pending_backend_dials"] == 0)
        call.cancel()


# --------------------------------------------------------------------------------------------------
# flow control: one stalled connection does not block another on the same agent stream
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_stalled_connections_do_not_block_others(certs: Certs, sockdir: Path,
                                                        stack: contextlib.AsyncExitStack, mode: str) -> None:
    echo = await tcp_server(stack, _echo)
    release = asyncio.Event()
    received = bytearray()

    async def sink(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await release.wait()  # does not read until released
        while data := await r.read(1 << 16):
            received.extend(data)

    async def firehose(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        block = b"f" * (1 << 16)
        while True:
            w.write(block)
            await w.drain()

    sink_srv = await tcp_server(stack, sink)
    hose_srv = await tcp_server(stack, firehose)
    server = await start_server(stack, certs, sockdir, mode)
    await start_agent(stack, certs, [server])

    # A: pushes 32 MB at a target that does not read
    _ra, wa = await open_tunnel(server, "127.0.0.1", sink_srv.port)
    upload = os.urandom(32 << 20)
    wa.write(upload)
    writing = asyncio.create_task(wa.drain())
    # C: a target that never stops writing, to a client that does not read
    rc, wc = await open_tunnel(server, "127.0.0.1", hose_srv.port)
    await asyncio.sleep(0.5)
    assert not writing.done()  # A is stalled (its data is bounded by flow control, not buffered whole)

    # B: a full echo on the same agent stream is unaffected
    async with asyncio.timeout(30):
        await echo_roundtrip(server, echo.port, os.urandom(4 << 20))

    # stalled is not dead: both resume when their peers read again
    release.set()
    async with asyncio.timeout(60):
        await writing
        await until(lambda: len(received) == len(upload))
        assert hashlib.sha256(received).digest() == hashlib.sha256(upload).digest()
        assert await rc.readexactly(1 << 20) == b"f" * (1 << 20)
    wa.close()
    wc.close()


async def test_stalled_reader_without_windows_holds_the_stream_until_its_connection_is_closed(
        certs: Certs, sockdir: Path, stack: contextlib.AsyncExitStack) -> None:
    """With an agent that does not speak the window extension (as upstream's), the only brake is the agent's
    stream: a reader that stops holds it, and is closed after the stall timeout so that the others go on."""
    echo = await tcp_server(stack, _echo)

    async def firehose(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        block = b"f" * (1 << 16)
        while True:
            w.write(block)
            await w.drain()

    hose = await tcp_server(stack, firehose)
    server = await start_server(stack, certs, sockdir, "http-connect", stall_timeout=1.0)
    await start_agent(stack, certs, [server], window=None)
    rc, wc = await open_tunnel(server, "127.0.0.1", hose.port)
    async with asyncio.timeout(30):
        await until(lambda: server.core.stats["conn_stalled"] >= 1)
        await echo_roundtrip(server, echo.port, os.urandom(1 << 20))
        # the stalled client finds its connection ended after what was buffered
        while await rc.read(1 << 20):
            pass
    assert server.core.stats["conn_stalled"] == 1
    wc.close()


async def test_stalled_target_with_a_server_without_windows_is_closed_by_the_agent(
        certs: Certs, sockdir: Path, stack: contextlib.AsyncExitStack) -> None:
    """The same brake on the agent's side, toward a server that does not do windows: a target that does not read
    holds the stream for the agent's stall timeout, then loses its connection, and the others go on."""
    echo = await tcp_server(stack, _echo)
    never = asyncio.Event()

    async def deaf(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await never.wait()

    target = await tcp_server(stack, deaf)
    server = await start_server(stack, certs, sockdir, "grpc", window=None)
    agent = await start_agent(stack, certs, [server], stall_timeout=1.0)
    r, w = await open_tunnel(server, "127.0.0.1", target.port)
    w.write(os.urandom(32 << 20))
    held = 0
    async with asyncio.timeout(30):
        while not agent.stats["conn_stalled"]:
            held = max([held, *(ep.recv.buffered for s in agent.sessions.values() for ep in s.conns.values())])
            await asyncio.sleep(0.01)
        await echo_roundtrip(server, echo.port, os.urandom(1 << 20))
        assert await _read_all(r) == b""  # closed by the agent
    assert agent.stats["conn_stalled"] == 1
    # the stream was held, so the agent kept about its limit (plus a packet), not the 32 MiB sent its way
    assert DEFAULT_BUFFER_LIMIT < held <= DEFAULT_BUFFER_LIMIT + MAX_DATA
    never.set()
    w.close()


@pytest.mark.parametrize("direction", ["download", "upload"])
@pytest.mark.parametrize("mode", MODES)
async def test_a_slow_reader_without_windows_gets_every_byte(certs: Certs, sockdir: Path,
                                                             stack: contextlib.AsyncExitStack, mode: str,
                                                             direction: str) -> None:
    """A reader slower than its sender, with a peer that does not do windows on the far side (download: the
    agent does not; upload: the server does not), holds the stream instead of losing its connection: 12 MiB,
    three times the buffer limit, arrive whole, and nothing stalls for good."""
    payload = os.urandom(12 << 20)
    got = bytearray()

    async def slowly(r: asyncio.StreamReader) -> None:
        while data := await r.read(64 << 10):
            got.extend(data)
            await asyncio.sleep(0.002)

    async def target(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        if direction == "download":
            w.write(payload)
            await w.drain()
        else:
            await slowly(r)
        w.close()

    srv = await tcp_server(stack, target)
    server = await start_server(stack, certs, sockdir, mode, **({"window": None} if direction == "upload" else {}))
    agent = await start_agent(stack, certs, [server], **({"window": None} if direction == "download" else {}))
    r, w = await open_tunnel(server, "127.0.0.1", srv.port)
    async with asyncio.timeout(60):
        if direction == "download":
            await slowly(r)
        else:
            w.write(payload)
            await w.drain()
            w.write_eof()
            await until(lambda: len(got) == len(payload))
    assert bytes(got) == payload
    assert server.core.stats["conn_aborted"] == 0 and agent.stats["conn_stalled"] == 0
    w.close()


# --------------------------------------------------------------------------------------------------
# reconnects, several servers
# --------------------------------------------------------------------------------------------------


async def test_agent_reconnects_after_server_restart(certs: Certs, sockdir: Path,
                                                     stack: contextlib.AsyncExitStack) -> None:
    echo = await tcp_server(stack, _echo)
    server = make_server(certs, sockdir, "grpc", server_id="s1")
    await server.start()
    try:
        agent = await start_agent(stack, certs, [server])
        await echo_roundtrip(server, echo.port, b"before")
        port = server.agent_port
    finally:
        await server.stop()
    async with asyncio.timeout(5):
        await until(lambda: not agent.sessions)
    restarted = await start_server(stack, certs, sockdir, "grpc", server_id="s1", port=port)
    async with asyncio.timeout(5):  # back within 5 s of the server being up
        await agent.wait_connected(1)
        await until(lambda: restarted.core.ready)
    await echo_roundtrip(restarted, echo.port, b"after")


async def test_two_servers_with_server_count_two(certs: Certs, sockdir: Path,
                                                 stack: contextlib.AsyncExitStack) -> None:
    echo = await tcp_server(stack, _echo)
    s1 = await start_server(stack, certs, sockdir, "grpc", name="a", server_id="s1", server_count=2)
    s2 = await start_server(stack, certs, sockdir, "http-connect", name="b", server_id="s2", server_count=2)
    agent = await start_agent(stack, certs, [s1, s2])
    assert set(agent.connected_servers) == {"s1", "s2"}
    await echo_roundtrip(s1, echo.port, b"via s1")
    await echo_roundtrip(s2, echo.port, b"via s2")


async def test_one_load_balancer_address_finds_both_servers(certs: Certs, sockdir: Path,
                                                            stack: contextlib.AsyncExitStack) -> None:
    """Upstream's model: one address (a load balancer), --server-count 2: the agent keeps dialling until it
    holds both serverids, closing duplicates."""
    s1 = await start_server(stack, certs, sockdir, name="a", server_id="s1", server_count=2)
    s2 = await start_server(stack, certs, sockdir, name="b", server_id="s2", server_count=2)
    backends = [s1.agent_port, s2.agent_port]
    turn = [0]

    async def balance(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        # the first two connections both go to s1, so the agent must see and drop a duplicate
        port = backends[0] if turn[0] < 2 else backends[turn[0] % 2]
        turn[0] += 1
        br, bw = await asyncio.open_connection("127.0.0.1", port)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await src.read(1 << 16):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(r, bw), pipe(br, w))

    lb = await tcp_server(stack, balance)
    agent = make_agent(certs, [f"127.0.0.1:{lb.port}"], sync_interval=0.1)
    await agent.start()
    stack.push_async_callback(agent.stop)
    async with asyncio.timeout(15):
        await agent.wait_connected(2)
        await until(lambda: s1.core.ready and s2.core.ready)
    assert set(agent.connected_servers) == {"s1", "s2"} and turn[0] >= 3


# --------------------------------------------------------------------------------------------------
# agent credentials and claims
# --------------------------------------------------------------------------------------------------


async def _still_serves(stack: contextlib.AsyncExitStack, certs: Certs, server: KonnectivityServer) -> None:
    echo = await tcp_server(stack, _echo)
    await start_agent(stack, certs, [server])
    await echo_roundtrip(server, echo.port, b"still serving")


async def _never_connects(agent: KonnectivityAgent, server: KonnectivityServer) -> None:
    await agent.start()
    try:
        async with asyncio.timeout(10):
            await until(lambda: agent.stats["connect_failures"] >= 3)
        assert not agent.sessions and not server.core.ready
    finally:
        await agent.stop()


@pytest.mark.parametrize("cred", ["no-cert", "foreign-ca", "server-only-cert", "not-a-node", "untrusted-server"])
async def test_agent_with_a_bad_certificate_is_refused(certs: Certs, sockdir: Path,
                                                        stack: contextlib.AsyncExitStack, cred: str) -> None:
    server = await start_server(stack, certs, sockdir)
    addr = [f"127.0.0.1:{server.agent_port}"]
    if cred == "no-cert":
        agent = make_agent(certs, addr, token="whatever")
    elif cred == "untrusted-server":  # the agent checks the server too: this CA did not sign its certificate
        agent = KonnectivityAgent(addr, certs.p("rogue-ca.crt"), certs.p("n1.crt"), certs.p("n1.key"),
                                  agent_id="n1", identifiers="ipv4=127.0.0.1", backoff=FAST)
    else:
        name = {"foreign-ca": "rogue", "server-only-cert": "serveronly", "not-a-node": "alice"}[cred]
        agent = make_agent(certs, addr, cert_file=certs.p(f"{name}.crt"), key_file=certs.p(f"{name}.key"))
    await _never_connects(agent, server)
    await _still_serves(stack, certs, server)


@pytest.mark.parametrize(("agent_id", "ids", "why"), [
    ("n2", "ipv4=127.0.0.1", "does not match"),  # n1's certificate claiming to be n2
    ("n1", "ipv4=127.0.0.2", "does not own"),  # n1 claiming n2's address
    ("n1", "cidr=127.0.0.0/8", "does not own"),
    ("n1", "default-route=true", "default-route"),
    ("n1", "ipv4=not-an-ip", "invalid agentidentifiers"),
])
async def test_forged_agentid_or_identifiers_are_refused(certs: Certs, sockdir: Path,
                                                         stack: contextlib.AsyncExitStack, agent_id: str, ids: str,
                                                         why: str) -> None:
    server = await start_server(stack, certs, sockdir)
    code, details = await raw_connect_status(certs, server, [("agentid", agent_id), ("agentidentifiers", ids)])
    assert code == grpc.StatusCode.PERMISSION_DENIED and why in details
    assert not server.core.ready
    await _still_serves(stack, certs, server)


@pytest.mark.parametrize("md", [
    [],  # no agentid
    [("agentid", "n1"), ("agentid", "n1")],
    [("agentid", "n1"), ("agentidentifiers", "ipv4=127.0.0.1"), ("agentidentifiers", "host=n1")],
    [("agentid", "x" * 300)],
])
async def test_malformed_agent_metadata_is_refused(certs: Certs, sockdir: Path, stack: contextlib.AsyncExitStack,
                                                   md: list[tuple[str, str]]) -> None:
    server = await start_server(stack, certs, sockdir)
    code, _ = await raw_connect_status(certs, server, md)
    assert code == grpc.StatusCode.PERMISSION_DENIED
    await _still_serves(stack, certs, server)


async def test_token_authentication(certs: Certs, sockdir: Path, stack: contextlib.AsyncExitStack,
                                    tmp_path: Path) -> None:
    reviews: list[tuple[str, list[str]]] = []
    valid = {"good-token": {"username": "system:serviceaccount:kube-system:konnectivity-agent",
                            "groups": ["system:serviceaccounts"],
                            "extra": {"authentication.kubernetes.io/node-name": ["n1"]}}}

    async def reviewer(token: str, audiences: Any) -> dict[str, Any]:
        reviews.append((token, list(audiences)))
        if token in valid:
            return {"authenticated": True, "user": valid[token], "audiences": list(audiences)}
        return {"authenticated": False, "error": "invalid bearer token"}

    echo = await tcp_server(stack, _echo)
    server = await start_server(stack, certs, sockdir, token_reviewer=reviewer)
    addr = [f"127.0.0.1:{server.agent_port}"]
    # wrong token, no token (a client certificate is not what this server asks for)
    await _never_connects(make_agent(certs, addr, token="bad-token"), server)
    code, details = await raw_connect_status(certs, server, [("agentid", "n1")])
    assert code == grpc.StatusCode.UNAUTHENTICATED and "Bearer" in details
    code, _ = await raw_connect_status(certs, server, [("agentid", "n1"), ("authorization", "Basic Zm9vOmJhcg==")])
    assert code == grpc.StatusCode.UNAUTHENTICATED
    # a token bound to n1 may not claim n2
    code, details = await raw_connect_status(
        certs, server, [("agentid", "n2"), ("authorization", "Bearer good-token")], node=None)
    assert code == grpc.StatusCode.PERMISSION_DENIED and "does not match" in details
    # the right token, read from a file (re-read on every connect)
    token_file = tmp_path / "token"
    token_file.write_text("good-token\n")
    await start_agent(stack, certs, [server], token_file=token_file)
    await echo_roundtrip(server, echo.port, b"token mode")
    assert ("bad-token", ["system:konnectivity-server"]) in reviews
    assert ("good-token", ["system:konnectivity-server"]) in reviews


# --------------------------------------------------------------------------------------------------
# dials the node does not own
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_dial_to_an_undeclared_address_is_refused(certs: Certs, sockdir: Path,
                                                        stack: contextlib.AsyncExitStack, mode: str) -> None:
    echo = await tcp_server(stack, _echo)
    server = await start_server(stack, certs, sockdir, mode)
    await start_agent(stack, certs, [server])
    with pytest.raises(TunnelDialError) as ei:
        await dial(server, "127.0.0.2", echo.port)  # nobody declared 127.0.0.2
    assert ei.value.status == 503 and "no agent available" in ei.value.message
    await echo_roundtrip(server, echo.port, b"the declared address still works")


@pytest.mark.parametrize("mode", MODES)
async def test_agent_refuses_dials_outside_its_policy(certs: Certs, sockdir: Path,
                                                      stack: contextlib.AsyncExitStack, mode: str) -> None:
    """Even a server that routes anything to anyone (upstream's `default`) cannot make the agent dial what its
    policy does not allow."""
    echo = await tcp_server(stack, _echo)
    other = await tcp_server(stack, _echo)
    server = await start_server(stack, certs, sockdir, mode, only_declared=False)
    agent = await start_agent(stack, certs, [server], allowed=[f"127.0.0.1:{echo.port}"])
    for host, port in (("127.0.0.1", other.port), ("127.0.0.2", echo.port), ("localhost", echo.port)):
        with pytest.raises(TunnelDialError) as ei:
            await dial(server, host, port)
        assert ei.value.status == 403 and "not allowed" in ei.value.message
    assert agent.stats["dial_refused"] == 3 and not other.conns
    await echo_roundtrip(server, echo.port, b"allowed")


# --------------------------------------------------------------------------------------------------
# garbage at every listener
# --------------------------------------------------------------------------------------------------


async def _read_all(r: asyncio.StreamReader) -> bytes:
    out = b""
    with contextlib.suppress(ConnectionError):
        async with asyncio.timeout(10):
            while chunk := await r.read(65536):
                out += chunk
    return out


async def test_garbage_on_the_agent_port(certs: Certs, sockdir: Path, stack: contextlib.AsyncExitStack) -> None:
    server = await start_server(stack, certs, sockdir)
    for garbage in (os.urandom(4096), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" * 50,
                    b"\x16\x03\x01\x02\x00" + os.urandom(512)):
        r, w = await asyncio.open_connection("127.0.0.1", server.agent_port)
        w.write(garbage)
        with contextlib.suppress(ConnectionError):
            await w.drain()
        await _read_all(r)  # the server closes it
        w.close()
    # TLS done right (the server's CA) but no client certificate and no gRPC: refused or closed
    ctx = ssl.create_default_context(cafile=str(certs.ca))
    with contextlib.suppress(ssl.SSLError, ConnectionError):
        r, w = await asyncio.open_connection("127.0.0.1", server.agent_port, ssl=ctx)
        w.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await w.drain()
        assert b"200" not in (await _read_all(r))[:20]
        w.close()
    await _still_serves(stack, certs, server)


async def test_garbage_on_the_http_connect_socket(certs: Certs, sockdir: Path, stack: contextlib.AsyncExitStack,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server_mod, "HEAD_TIMEOUT", 1.0)
    server = await start_server(stack, certs, sockdir, "http-connect")

    async def ask(data: bytes, close_write: bool = False) -> bytes:
        r, w = await asyncio.open_unix_connection(server.uds_path)
        w.write(data)
        await w.drain()
        if close_write:
            w.write_eof()
        out = await _read_all(r)
        w.close()
        return out

    assert (await ask(os.urandom(64) + b"\r\n\r\n")).startswith(b"HTTP/1.1 400 ")
    assert (await ask(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")).startswith(b"HTTP/1.1 405 ")
    assert (await ask(b"CONNECT " + b"a" * 20000)).startswith(b"HTTP/1.1 414 ")
    assert (await ask(b"CONNECT a:1 HTTP/1.1\r\n" + b"X-Pad: 0123456789\r\n" * 2000)).startswith(b"HTTP/1.1 431 ")
    assert (await ask(b"CONNECT 127.0.0.1:1 HTTP/1.1\r\n")).startswith(b"HTTP/1.1 408 ")  # never finishes
    assert await ask(b"CONNECT 127.0.0.1:1", close_write=True) == b""
    assert (await ask(b"CONNECT 127.0.0.1:99999 HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 400 ")
    rsp = await ask(b"CONNECT 127.0.0.1:1 HTTP/1.1\r\n\r\n")
    assert rsp.startswith(b"HTTP/1.1 503 ") and b"no agent available" in rsp  # no agent yet
    await _still_serves(stack, certs, server)


async def test_garbage_on_the_grpc_socket(certs: Certs, sockdir: Path, stack: contextlib.AsyncExitStack) -> None:
    server = await start_server(stack, certs, sockdir, "grpc")
    for garbage in (os.urandom(4096), b"CONNECT 127.0.0.1:1 HTTP/1.1\r\n\r\n",
                    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + os.urandom(1024)):
        r, w = await asyncio.open_unix_connection(server.uds_path)
        w.write(garbage)
        with contextlib.suppress(ConnectionError):
            await w.drain()
        await _read_all(r)
        w.close()
    # well-formed gRPC, nonsense packets: each gets an answer, none kills the server
    echo = await tcp_server(stack, _echo)
    await start_agent(stack, certs, [server])
    async with grpc.aio.insecure_channel(f"unix:{server.uds_path}") as ch:
        call = pb_grpc.ProxyServiceStub(ch).Proxy()
        await call.write(P.data(12345, b"nobody's"))
        await call.write(P.close_request(777))
        await call.write(P.dial_request("not-an-address", 5))
        await call.write(P.dial_request("127.0.0.1:1", 6, protocol="udp"))
        await call.write(P.Packet(type=PacketType.DATA))  # a DATA packet without its payload: ignored
        got = [await call.read() for _ in range(4)]
        assert [(p.type, p.closeResponse.error or p.dialResponse.error) for p in got] == [
            (PacketType.CLOSE_RSP, "unrecognized connectID"), (PacketType.CLOSE_RSP, "Unknown connectID"),
            (PacketType.DIAL_RSP, got[2].dialResponse.error), (PacketType.DIAL_RSP, "unsupported protocol 'udp'")]
        assert "invalid address" in got[2].dialResponse.error
        call.cancel()
    await echo_roundtrip(server, echo.port, b"still serving")


async def test_services_are_only_on_their_own_listener(certs: Certs, sockdir: Path,
                                                       stack: contextlib.AsyncExitStack) -> None:
    server = await start_server(stack, certs, sockdir, "grpc")
    async with raw_channel(certs, server) as ch:
        call = pb_grpc.ProxyServiceStub(ch).Proxy()
        assert await call.code() == grpc.StatusCode.UNIMPLEMENTED
    async with grpc.aio.insecure_channel(f"unix:{server.uds_path}") as ch:
        call2 = pb_grpc.AgentServiceStub(ch).Connect(metadata=[("agentid", "n1")])
        assert await call2.code() == grpc.StatusCode.UNIMPLEMENTED
    assert (server.uds_path.stat().st_mode & 0o777) == 0o600


# --------------------------------------------------------------------------------------------------
# a hand-driven agent: the server's side of the protocol with an upstream-style peer
# --------------------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def manual_agent(certs: Certs, server: KonnectivityServer, agent_id: str = "n1",
                       extra: tuple[tuple[str, str], ...] = ()) -> AsyncIterator[Any]:
    """An upstream-style agent's Connect stream, yielded once the server has an agent to dial through."""
    async with raw_channel(certs, server) as ch:
        call = pb_grpc.AgentServiceStub(ch).Connect(
            metadata=[("agentid", agent_id), ("agentidentifiers", "ipv4=127.0.0.1"), *extra])
        md = {k: v for k, v in await call.initial_metadata()}
        assert md["serverid"] == server.server_id and md["servercount"] == "1"
        assert "kplane-window-v1" not in md  # we did not offer it: upstream behaviour
        try:
            async with asyncio.timeout(10):
                await until(lambda: server.core.ready)
            yield call
        finally:
            call.cancel()


async def start_dial(server: KonnectivityServer, call: Any) -> tuple[asyncio.Task[socket.socket], Any]:
    """An apiserver-side dial to 127.0.0.1:4242 through ``server``, and the DIAL_REQ it sent ``call``'s agent."""
    dialing = asyncio.create_task(dial_http_connect(server.uds_path, "127.0.0.1", 4242))
    return dialing, await call.read()


async def test_upstream_style_agent_end_to_end(certs: Certs, sockdir: Path, stack: contextlib.AsyncExitStack) -> None:
    server = await start_server(stack, certs, sockdir, "http-connect")
    async with manual_agent(certs, server) as call:
        dialing, req = await start_dial(server, call)
        assert req.type == PacketType.DIAL_REQ and req.dialRequest.address == "127.0.0.1:4242"
        assert req.dialRequest.protocol == "tcp"
        await call.write(P.dial_response(req.dialRequest.random, connect_id=9))
        r, w = await asyncio.open_connection(sock=await dialing)
        w.write(b"ping")
        await w.drain()
        pkt = await call.read()
        assert pkt == P.data(9, b"ping")
        await call.write(P.data(9, b"pong"))
        assert await r.readexactly(4) == b"pong"
        await call.write(P.data(4444, b"for nobody"))  # the server answers a stray with CLOSE_REQ
        assert await call.read() == P.close_request(4444)
        await call.write(P.close_response(9))  # the remote end closed
        assert await _read_all(r) == b""
        w.close()


async def test_large_data_packets_reach_an_upstream_style_agent_within_the_size_limit(
        certs: Certs, sockdir: Path, stack: contextlib.AsyncExitStack) -> None:
    """A socket read becomes one DATA packet (not 64 KiB pieces), none larger than MAX_DATA, and protobuf on the
    agent's side reads what the server encoded by hand, every byte in order."""
    server = await start_server(stack, certs, sockdir, "http-connect")
    async with manual_agent(certs, server) as call:
        dialing, req = await start_dial(server, call)
        await call.write(P.dial_response(req.dialRequest.random, connect_id=9))
        _r, w = await asyncio.open_connection(sock=await dialing)
        payload = os.urandom(3 << 20)
        w.write(payload)
        got = bytearray()
        sizes = []
        async with asyncio.timeout(30):
            while len(got) < len(payload):
                pkt = await call.read()
                assert pkt.type == PacketType.DATA and pkt.data.connectID == 9
                sizes.append(len(pkt.data.data))
                got += pkt.data.data
        assert bytes(got) == payload
        assert 64 << 10 < max(sizes) <= MAX_DATA
        w.close()


async def test_data_in_other_valid_encodings_is_delivered(certs: Certs, sockdir: Path,
                                                          stack: contextlib.AsyncExitStack) -> None:
    """A peer's protobuf library may order fields differently or add fields: such DATA takes the slow path
    (protobuf) and arrives all the same; a message that is no packet at all is counted and ignored."""
    server = await start_server(stack, certs, sockdir, "http-connect")
    async with raw_channel(certs, server) as ch:
        call = ch.stream_stream("/AgentService/Connect")(  # bytes in, bytes out
            metadata=[("agentid", "n1"), ("agentidentifiers", "ipv4=127.0.0.1")])
        async with asyncio.timeout(10):
            await until(lambda: server.core.ready)
        dialing = asyncio.create_task(dial_http_connect(server.uds_path, "127.0.0.1", 4242))
        req = P.decode(await call.read())
        await call.write(P.encode(P.dial_response(req.dialRequest.random, connect_id=9)))
        r, w = await asyncio.open_connection(sock=await dialing)
        await call.write(b"\x08\x04\x22\x09" + b"\x1a\x05hello" + b"\x08\x09")  # data before connectID
        await call.write(b"\xff\xff")  # not a packet
        await call.write(b"\x22\x0b" + b"\x08\x09\x1a\x05 over" + b"\x28\x01" + b"\x08\x04")  # type last
        await call.write(b"\x08\x04\x22\x10" + b"\x08\x09\x1a\x05 here" + b"\x12\x05fine.")  # error field
        async with asyncio.timeout(10):
            assert await r.readexactly(15) == b"hello over here"
        assert server.core.stats["agent_bad_packet"] == 1
        w.close()
        call.cancel()


@pytest.mark.parametrize("window", [True, False], ids=["kplane-window", "upstream-credit"])
@pytest.mark.parametrize("mode", MODES)
async def test_target_that_sends_then_closes_delivers_every_byte(certs: Certs, sockdir: Path,
                                                                 stack: contextlib.AsyncExitStack, mode: str,
                                                                 window: bool) -> None:
    """The target writes far more than one window and closes at once: its EOF waits behind the bytes still
    held for lack of credit, and every byte arrives before the tunnel closes."""
    payload = os.urandom(12 << 20)

    async def blurt(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(payload)
        await w.drain()

    target = await tcp_server(stack, blurt)
    server = await start_server(stack, certs, sockdir, mode)
    await start_agent(stack, certs, [server], **({} if window else {"window": None}))
    r, w = await open_tunnel(server, "127.0.0.1", target.port)
    async with asyncio.timeout(60):
        got = await r.read(-1)
    assert len(got) == len(payload) and hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
    w.close()


async def test_bytes_sent_right_behind_the_connect_head_are_delivered(certs: Certs, sockdir: Path,
                                                                       stack: contextlib.AsyncExitStack) -> None:
    echo = await tcp_server(stack, _echo)
    server = await start_server(stack, certs, sockdir, "http-connect")
    await start_agent(stack, certs, [server])
    r, w = await asyncio.open_unix_connection(server.uds_path)
    w.write(f"CONNECT 127.0.0.1:{echo.port} HTTP/1.1\r\nHost: x\r\n\r\n".encode() + b"early bytes")
    async with asyncio.timeout(10):
        assert await r.readuntil(b"\r\n\r\n") == ESTABLISHED
        assert await r.readexactly(11) == b"early bytes"
    w.close()


async def test_pending_dial_fails_fast_when_its_agent_drops(certs: Certs, sockdir: Path,
                                                            stack: contextlib.AsyncExitStack) -> None:
    server = await start_server(stack, certs, sockdir, "http-connect", dial_timeout=60)
    async with manual_agent(certs, server) as call:
        dialing, _ = await start_dial(server, call)  # its DIAL_REQ is never answered
        call.cancel()
    async with asyncio.timeout(5):  # far less than the 60 s dial timeout
        with pytest.raises(TunnelDialError) as ei:
            await dialing
    assert ei.value.status == 502 and "agent disconnected" in ei.value.message


@pytest.mark.parametrize("mode", MODES)
async def test_dial_timeout(certs: Certs, sockdir: Path, stack: contextlib.AsyncExitStack, mode: str) -> None:
    server = await start_server(stack, certs, sockdir, mode, dial_timeout=0.5)
    async with manual_agent(certs, server) as call:
        dialing = asyncio.create_task(dial(server, "127.0.0.1", 4242))
        req = await call.read()
        async with asyncio.timeout(10):
            with pytest.raises(TunnelDialError) as ei:
                await dialing
            assert ei.value.status == 504
            cls = await call.read()  # the agent is told to give up too
        assert cls == P.close_dial(req.dialRequest.random)


async def test_reconnecting_agent_replaces_its_old_stream(certs: Certs, sockdir: Path,
                                                          stack: contextlib.AsyncExitStack) -> None:
    """kplane's agent says it holds no stream to this server: the new stream takes the dials at once."""
    server = await start_server(stack, certs, sockdir)
    async with manual_agent(certs, server):
        first = server.core.agents["n1"][0]
        async with manual_agent(certs, server, extra=(("kplane-held-servers", ""),)) as new:
            async with asyncio.timeout(10):
                await until(lambda: server.core.agents["n1"][0] is not first)
                dialing = asyncio.create_task(dial_http_connect(server.uds_path, "127.0.0.1", 4242))
                req = await new.read()
            assert req.type == PacketType.DIAL_REQ
            dialing.cancel()
        # a kplane agent that lists this server as held gets the headers and nothing else
        async with raw_channel(certs, server) as ch:
            call = pb_grpc.AgentServiceStub(ch).Connect(metadata=[
                ("agentid", "n1"), ("agentidentifiers", "ipv4=127.0.0.1"), ("kplane-held-servers", server.server_id)])
            assert dict(await call.initial_metadata())["serverid"] == server.server_id
            assert await call.code() == grpc.StatusCode.OK
        assert server.core.stats["agent_duplicate"] == 1


async def test_upstream_style_reconnect_retires_the_old_stream_after_the_grace(
        certs: Certs, sockdir: Path, stack: contextlib.AsyncExitStack) -> None:
    server = await start_server(stack, certs, sockdir, replace_grace=0.5)
    async with manual_agent(certs, server) as old, manual_agent(certs, server):
        async with asyncio.timeout(10):
            assert await old.code() == grpc.StatusCode.UNAVAILABLE
        assert "replaced" in (await old.details() or "")
        assert len(server.core.agents["n1"]) == 1


# --------------------------------------------------------------------------------------------------
# health, metrics, drain
# --------------------------------------------------------------------------------------------------


async def test_health_readiness_and_metrics(certs: Certs, sockdir: Path, stack: contextlib.AsyncExitStack) -> None:
    server = await start_server(stack, certs, sockdir)
    assert server._health is not None
    base = f"http://127.0.0.1:{server.health_port}"
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/healthz") as r:
            assert r.status == 200 and await r.text() == "ok"
        async with http.get(f"{base}/readyz") as r:
            assert r.status == 500 and "no connection to any proxy agent" in await r.text()
        agent = await start_agent(stack, certs, [server])
        async with http.get(f"{base}/readyz") as r:
            assert r.status == 200
        async with http.get(f"{base}/metrics") as r:
            text = await r.text()
        assert "konnectivity_network_proxy_server_ready_backends 1" in text
        agent.drain()
        async with asyncio.timeout(10):
            await until(lambda: server.core.gauges()["draining_backends"] == 1)
    # bound to loopback only
    with socket.socket() as s:
        s.settimeout(2)
        other = [a for a in _local_addresses() if not a.startswith("127.")]
        if other:
            assert s.connect_ex((other[0], server.health_port)) != 0


def _local_addresses() -> list[str]:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))
            return [s.getsockname()[0]]
    except OSError:
        return []


# --------------------------------------------------------------------------------------------------
# a node the control plane cannot reach: only the agent's outbound connection links them
# --------------------------------------------------------------------------------------------------

AGENT_IN_NETNS = """
import asyncio, sys
from kplane.tunnel.agent import KonnectivityAgent
from kplane.tunnel.clientset import Backoff
from kplane.tunnel.httpconnect import ESTABLISHED
from kplane.tunnel.outbox import MAX_DATA

async def echo(r, w):
    while data := await r.read(65536):
        w.write(data)
        await w.drain()
    w.close()

async def main():
    server_addr, ca, crt, key = sys.argv[1:5]
    srv = await asyncio.start_server(echo, "127.0.0.1", 0)
    agent = KonnectivityAgent([server_addr], ca, crt, key, agent_id="n1", identifiers="ipv4=127.0.0.1",
                              backoff=Backoff(0.05, 0.5))
    await agent.start()
    print(srv.sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@dataclass
class NetNS:
    name: str
    host_ip: str
    ns_ip: str


@pytest.fixture
def netns() -> Iterator[NetNS]:
    """A network namespace joined to the host by a veth /30; names unique to this run, removed at the end."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if shutil.which("ip") is None:
        pytest.skip("iproute2 (ip) is not installed")
    tag = f"{os.getpid() % 100000}{random.randrange(100):02d}"
    name, host_if, ns_if = f"kt-ns-{tag}", f"kth{tag}", f"ktn{tag}"
    used = subprocess.run(["ip", "-o", "-4", "addr"], capture_output=True, text=True).stdout
    a, b = next((a, b) for a, b in ((random.randrange(256), 4 * random.randrange(64)) for _ in range(100))
                if f"10.213.{a}.{b + 1}/" not in used and f"10.213.{a}.{b + 2}/" not in used)
    host_ip, ns_ip = f"10.213.{a}.{b + 1}", f"10.213.{a}.{b + 2}"
    try:
        _ip("netns", "add", name)
        _ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        _ip("link", "set", ns_if, "netns", name)
        _ip("addr", "add", f"{host_ip}/30", "dev", host_if)
        _ip("link", "set", host_if, "up")
        _ip("-n", name, "addr", "add", f"{ns_ip}/30", "dev", ns_if)
        _ip("-n", name, "link", "set", ns_if, "up")
        _ip("-n", name, "link", "set", "lo", "up")
        yield NetNS(name, host_ip, ns_ip)
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)


@pytest.mark.root
async def test_echo_reachable_only_through_the_agent_from_a_network_namespace(
        certs: Certs, sockdir: Path, stack: contextlib.AsyncExitStack, netns: NetNS) -> None:
    serving = pki.issue(certs.authority, common_name="konnectivity-server", server=True, ips=[netns.host_ip])
    _save(certs.dir, f"server-{netns.name}", serving)
    server = KonnectivityServer(0, sockdir / "k.sock", certs.ca, certs.p(f"server-{netns.name}.crt"),
                                certs.p(f"server-{netns.name}.key"), host=netns.host_ip, mode="http-connect",
                                health_port=None, authorizer=NodeAgentAuthorizer(node_addresses=_owned))
    await server.start()
    stack.push_async_callback(server.stop)
    proc = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", netns.name, sys.executable, "-c", AGENT_IN_NETNS,
        f"{netns.host_ip}:{server.agent_port}", str(certs.ca), str(certs.p("n1.crt")), str(certs.p("n1.key")),
        stdout=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})

    async def reap() -> None:
        proc.kill()
        await proc.wait()

    stack.push_async_callback(reap)
    assert proc.stdout is not None
    async with asyncio.timeout(30):
        port = int(await proc.stdout.readline())
        await until(lambda: server.core.ready)

    # the echo server listens on the namespace's loopback: nothing on the host reaches it directly
    for host in ("127.0.0.1", netns.ns_ip):
        with pytest.raises(OSError):
            async with asyncio.timeout(5):
                _, w = await asyncio.open_connection(host, port)
            w.close()
    await echo_roundtrip(server, port, os.urandom(1 << 20))
