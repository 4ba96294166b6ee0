"""SSH tunnels (--egress ssh) against a REAL OpenSSH sshd started for the test: its own host key, an
authorized_keys with a key made for the test, on a free port of 127.0.0.1 and 127.0.0.2 (two "nodes").

Shows: dials through the tunnel of the node that owns the address (many at once, a large transfer, flow control
with a reader that stops), a wrong host key and an unknown one refused (then accepted once the operator adds the key,
without a restart), a wrong user key refused, sshd killed and restarted -> the tunnel comes back, a frozen session
(SIGSTOP) detected by keepalives and replaced, and the deprecation warning at start."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pwd
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, TypeVar, cast

import asyncssh
import pytest

from kplane import pki
from kplane.apiserver.egress import SSHDialer
from kplane.errors import StatusError
from kplane.tunnel.ssh import (
    DEPRECATION_WARNING,
    SSHNode,
    SSHTunneler,
    TunnelState,
    ensure_client_key,
    nodes_from_api,
)

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
IS_ROOT = os.geteuid() == 0
USER = pwd.getpwuid(os.geteuid()).pw_name
F = TypeVar("F")



def needs_sshd(fn: F) -> F:
    marked: Any = fn
    for mark in (pytest.mark.root,
                 pytest.mark.skipif(not IS_ROOT, reason="the test sshd runs as root (privilege separation)"),
                 pytest.mark.skipif(not os.access(SSHD, os.X_OK), reason=f"OpenSSH server not installed ({SSHD})")):
        marked = mark(marked)
    return cast(F, marked)


def _children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (sshd forks a process tree per connection), read from /proc."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parents.items() if pp == p]
        out.extend(kids)
        todo.extend(kids)
    return out


def _write_key(key: asyncssh.SSHKey, path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.export_private_key("openssh"))


class Sshd:
    """A real sshd on ``port``, listening on 127.0.0.1 and 127.0.0.2, in its own temp directory."""

    def __init__(self, root: Path, port: int, client_pub: bytes) -> None:
        self.root = root
        self.port = port
        self.host_key = asyncssh.generate_private_key("ssh-ed25519")
        _write_key(self.host_key, root / "ssh_host_ed25519_key")
        (root / "authorized_keys").write_bytes(client_pub)
        (root / "sshd_config").write_text(f"""\
Port {port}
ListenAddress 127.0.0.1
ListenAddress 127.0.0.2
HostKey {root}/ssh_host_ed25519_key
PidFile {root}/sshd.pid
AuthorizedKeysFile {root}/authorized_keys
StrictModes no
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
PermitRootLogin prohibit-password
AllowUsers {USER}
AllowTcpForwarding yes
MaxStartups 100:30:200
LogLevel VERBOSE
""")
        self.proc: subprocess.Popen[bytes] | None = None
        self.stopped: list[int] = []

    def known_hosts_line(self, host: str = "127.0.0.1") -> str:
        return f"[{host}]:{self.port} {self.host_key.export_public_key().decode().strip()}\n"

    def start(self) -> None:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation directory
        log = (self.root / "sshd.log").open("ab")
        self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(self.root / "sshd_config")],
                                     stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited: {(self.root / 'sshd.log').read_text()[-2000:]}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.2", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError("sshd did not start listening")

    def kill(self) -> None:
        """SIGKILL the listener and every session process (what a crashed or rebooted node looks like)."""
        if self.proc is None:
            return
        for pid in [*_children(self.proc.pid), self.proc.pid, *self.stopped]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        self.proc.wait(10)
        self.proc = None
        self.stopped = []

    def freeze_sessions(self) -> list[int]:
        """SIGSTOP the per-connection processes, leaving the listener accepting: a tunnel that hangs silently."""
        assert self.proc is not None
        pids = _children(self.proc.pid)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        self.stopped.extend(pids)
        return pids

    def reap_frozen(self) -> None:
        for pid in self.stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        self.stopped = []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def env() -> Iterator[tuple[Sshd, Path]]:
    root = Path(tempfile.mkdtemp(prefix="kplane-sshd-", dir="/tmp"))
    os.chmod(root, 0o755)
    key = root / "id_apiserver"
    ensure_client_key(key)
    sshd = Sshd(root, _free_port(), Path(str(key) + ".pub").read_bytes())
    sshd.start()
    (root / "known_hosts").write_text(sshd.known_hosts_line("127.0.0.1") + sshd.known_hosts_line("127.0.0.2"))
    try:
        yield sshd, key
    finally:
        sshd.kill()
        shutil.rmtree(root, ignore_errors=True)


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
    except OSError:
        pass
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def echo_servers() -> AsyncIterator[int]:
    """An echo server on the same port of 127.0.0.1 and 127.0.0.2 (one per "node")."""
    a = await asyncio.start_server(_echo, "127.0.0.1", 0)
    port = a.sockets[0].getsockname()[1]
    b = await asyncio.start_server(_echo, "127.0.0.2", port)
    try:
        yield port
    finally:
        for s in (a, b):
            s.close()
            await s.wait_closed()


async def roundtrip(sock: socket.socket, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(sock=sock)

    async def send() -> None:
        writer.write(payload)
        await writer.drain()
        writer.write_eof()

    sender = asyncio.ensure_future(send())
    try:
        data = await asyncio.wait_for(reader.read(), 60)
        await sender
    finally:
        sender.cancel()
        writer.close()
    return data


def tunneler(sshd: Sshd, key: Path, **kw: Any) -> SSHTunneler:
    opts: dict[str, Any] = {"user": USER, "key_file": key, "known_hosts": sshd.root / "known_hosts",
                               "port": sshd.port, "backoff_initial_s": 0.2, "backoff_max_s": 1.0,
                               "dial_timeout_s": 10.0, "connect_timeout_s": 10.0}
    opts.update(kw)
    return SSHTunneler(**opts)


NODES = [SSHNode("node-a", "127.0.0.1", ("127.0.0.1", "node-a"), ("10.250.1.0/24",)),
         SSHNode("node-b", "127.0.0.2", ("127.0.0.2",), ("10.250.2.0/24",))]


async def wait_state(t: SSHTunneler, node: str, state: TunnelState, within_s: float = 30) -> None:
    deadline = asyncio.get_running_loop().time() + within_s
    while True:
        st = {s.node: s for s in t.status()}[node]
        if st.state is state:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{node} never became {state}: {st}")
        await asyncio.sleep(0.05)


async def dial_until_ok(d: SSHDialer, host: str, port: int, within_s: float = 30) -> socket.socket:
    deadline = asyncio.get_running_loop().time() + within_s
    while True:
        try:
            return await d.dial(host, port)
        except StatusError:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.1)


async def _tls_through(d: SSHDialer, tmp: Path) -> None:
    ca = pki.new_ca("ssh-tunnel-test-ca")
    pair = pki.issue(ca, common_name="node-b", server=True, ips=["127.0.0.2"])
    pki.save_pair(pair, tmp / "node.crt", tmp / "node.key")
    (tmp / "ca.crt").write_bytes(ca.cert_pem())
    sctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    sctx.load_cert_chain(str(tmp / "node.crt"), str(tmp / "node.key"))
    server = await asyncio.start_server(_echo, "127.0.0.2", 0, ssl=sctx)
    port = server.sockets[0].getsockname()[1]
    cctx = ssl.create_default_context(cafile=str(tmp / "ca.crt"))
    try:
        reader, writer = await asyncio.open_connection(sock=await d.dial("127.0.0.2", port), ssl=cctx,
                                                       server_hostname="127.0.0.2")
        writer.write(b"over tls over ssh")
        assert await asyncio.wait_for(reader.readexactly(17), 10) == b"over tls over ssh"
        writer.close()
        with pytest.raises(ssl.SSLCertVerificationError):
            await asyncio.open_connection(sock=await d.dial("127.0.0.2", port), ssl=cctx,
                                          server_hostname="127.0.0.9")
    finally:
        server.close()
        await server.wait_closed()


@needs_sshd
async def test_tunnels_many_connections_large_transfer(env: tuple[Sshd, Path], tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    sshd, key = env
    caplog.set_level(logging.INFO, logger="kplane.tunnel.ssh")
    async with echo_servers() as port, tunneler(sshd, key) as t:
        assert DEPRECATION_WARNING in caplog.text
        assert any(r.levelno == logging.WARNING and "deprecated" in r.getMessage() for r in caplog.records)
        t.set_nodes(NODES)
        d = SSHDialer(t)
        s = await d.dial("127.0.0.1", port)  # waits for the first connection attempt
        assert not s.getblocking()
        assert await roundtrip(s, b"hello through ssh") == b"hello through ssh"
        assert {st.node: st.state for st in t.status()} == {"node-a": TunnelState.READY, "node-b": TunnelState.READY}

        # 40 connections at once over the two tunnels, each to "its" node
        payloads = [f"conn {i} ".encode() * (1000 + i) for i in range(40)]
        hosts = ["127.0.0.1" if i % 2 else "127.0.0.2" for i in range(40)]
        socks = await asyncio.gather(*(d.dial(h, port) for h in hosts))
        assert await asyncio.gather(*(roundtrip(s, p) for s, p in zip(socks, payloads, strict=True))) == payloads
        channels = {st.node: st.channels for st in t.status()}
        assert channels == {"node-a": 21, "node-b": 20}

        # TLS end to end through the tunnel, the far certificate verified (the kubelet case)
        await _tls_through(d, tmp_path)

        # a large transfer both ways
        big = os.urandom(1 << 20) * 24
        assert await roundtrip(await d.dial("127.0.0.2", port), big) == big

        # ownership: pod CIDRs route to their node; unknown addresses are refused, not sent to a random node
        assert t.owner_of("10.250.2.17") == "node-b" and t.owner_of("node-a") == "node-a"
        with pytest.raises(StatusError, match=r"no node owns 192\.0\.2\.1; kplane dials only through") as e:
            await d.dial("192.0.2.1", port)
        assert e.value.code == 503
        # the node cannot connect to the target: 502 naming the node
        closed = await asyncio.start_server(_echo, "127.0.0.1", 0)
        cport = closed.sockets[0].getsockname()[1]
        closed.close()
        await closed.wait_closed()
        with pytest.raises(StatusError, match=r'node "node-a" \(127.0.0.1:\d+\) could not connect') as e:
            await d.dial("127.0.0.1", cport)
        assert e.value.code == 502

        # a node leaving closes its tunnel
        t.set_nodes(NODES[:1])
        assert [st.node for st in t.status()] == ["node-a"]
        with pytest.raises(StatusError, match=r"no node owns 127\.0\.0\.2"):
            await d.dial("127.0.0.2", port)
    assert t.status() == []


@needs_sshd
async def test_flow_control_slow_reader(env: tuple[Sshd, Path]) -> None:
    """A node-side server sends as fast as it may while the apiserver side does not read: what it manages to hand
    over stays bounded (windows and socket buffers), then everything arrives once the reader reads."""
    sshd, key = env
    total = 96 << 20
    sent = 0

    async def firehose(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        chunk = b"\xab" * 65536
        try:
            while sent < total:
                writer.write(chunk)
                await writer.drain()
                sent += len(chunk)
            writer.write_eof()
        except OSError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(firehose, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with tunneler(sshd, key) as t:
            t.set_nodes(NODES[:1])
            s = await SSHDialer(t).dial("127.0.0.1", port)
            last, stable = -1, 0
            while stable < 10:  # wait until the sender is blocked
                await asyncio.sleep(0.1)
                stable = stable + 1 if sent == last else 0
                last = sent
            assert sent < total // 2, f"{sent} bytes accepted without a reader: no back-pressure"
            reader, writer = await asyncio.open_connection(sock=s)
            got = 0
            while data := await asyncio.wait_for(reader.read(1 << 20), 60):
                got += len(data)
            writer.close()
            assert got == total
    finally:
        server.close()
        await server.wait_closed()


@needs_sshd
async def test_wrong_host_key_refused_then_added(env: tuple[Sshd, Path]) -> None:
    sshd, key = env
    known = sshd.root / "known_hosts"
    other = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()
    known.write_text(f"[127.0.0.1]:{sshd.port} {other}\n")  # a different key for this node
    async with echo_servers() as port, tunneler(sshd, key) as t:
        t.set_nodes(NODES[:1])
        d = SSHDialer(t)
        with pytest.raises(StatusError, match=r'host key of node "node-a" \(127.0.0.1:\d+\) is not trusted by') as e:
            await d.dial("127.0.0.1", port)
        assert e.value.code == 503 and "never trusts an unknown host key" in e.value.message
        known.write_text("")  # no key at all: refused too (no trust on first use)
        await wait_state(t, "node-a", TunnelState.CONNECTING)
        await wait_state(t, "node-a", TunnelState.BACKOFF)
        with pytest.raises(StatusError, match="is not trusted by"):
            await d.dial("127.0.0.1", port)
        assert t.status()[0].state is TunnelState.BACKOFF
        known.write_text(sshd.known_hosts_line())  # the operator adds the right key: no restart needed
        s = await dial_until_ok(d, "127.0.0.1", port)
        assert await roundtrip(s, b"trusted now") == b"trusted now"


@needs_sshd
async def test_wrong_user_key_refused(env: tuple[Sshd, Path]) -> None:
    sshd, _ = env
    stranger = sshd.root / "id_stranger"
    ensure_client_key(stranger)
    async with echo_servers() as port, tunneler(sshd, stranger) as t:
        t.set_nodes(NODES[:1])
        with pytest.raises(StatusError, match=rf"refused user '{USER}' with key .*id_stranger") as e:
            await SSHDialer(t).dial("127.0.0.1", port)
        assert e.value.code == 503
    with pytest.raises(ValueError, match="does not exist"):
        tunneler(sshd, sshd.root / "no-such-key")
    with pytest.raises(ValueError, match="never trusts one it was not given"):
        tunneler(sshd, stranger, known_hosts=sshd.root / "no-known-hosts")


@needs_sshd
async def test_sshd_killed_and_restarted(env: tuple[Sshd, Path]) -> None:
    sshd, key = env
    async with echo_servers() as port, tunneler(sshd, key) as t:
        t.set_nodes(NODES[:1])
        d = SSHDialer(t)
        open_sock = await d.dial("127.0.0.1", port)
        assert await roundtrip(await d.dial("127.0.0.1", port), b"before") == b"before"
        reader, writer = await asyncio.open_connection(sock=open_sock)

        sshd.kill()
        # a connection open through the dead tunnel ends (EOF or reset), it does not hang
        with contextlib.suppress(ConnectionError):
            assert await asyncio.wait_for(reader.read(), 30) == b""
        writer.close()
        await wait_state(t, "node-a", TunnelState.BACKOFF)
        with pytest.raises(StatusError, match=r'tunnel to node "node-a" .* is down') as e:
            await d.dial("127.0.0.1", port)
        assert e.value.code == 503

        sshd.start()
        s = await dial_until_ok(d, "127.0.0.1", port)
        assert await roundtrip(s, b"after restart") == b"after restart"
        assert t.status()[0].reconnects >= 1 and t.status()[0].state is TunnelState.READY


@needs_sshd
async def test_keepalive_replaces_a_frozen_tunnel(env: tuple[Sshd, Path]) -> None:
    sshd, key = env
    async with echo_servers() as port, tunneler(sshd, key, keepalive_interval_s=0.5, keepalive_count_max=2) as t:
        t.set_nodes(NODES[:1])
        d = SSHDialer(t)
        assert await roundtrip(await d.dial("127.0.0.1", port), b"alive") == b"alive"
        assert sshd.freeze_sessions()  # the connection's processes stop answering; no FIN, no RST
        try:
            await wait_state(t, "node-a", TunnelState.BACKOFF)  # keepalives unanswered: closed
            s = await dial_until_ok(d, "127.0.0.1", port)  # a new connection (a new session process)
            assert await roundtrip(s, b"replaced") == b"replaced"
            assert t.status()[0].reconnects == 1
        finally:
            sshd.reap_frozen()


def test_nodes_from_api() -> None:
    nodes: list[dict[str, Any]] = [
        {"metadata": {"name": "n1"}, "spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24"]},
         "status": {"addresses": [{"type": "InternalIP", "address": "192.168.1.10"},
                                  {"type": "Hostname", "address": "n1"},
                                  {"type": "ExternalIP", "address": "203.0.113.10"}]}},
        {"metadata": {"name": "n2"}, "status": {"addresses": [{"type": "Hostname", "address": "n2"}]}},
        {"metadata": {"name": "n3"}, "status": {}},  # no address: skipped
        {"metadata": {}, "status": {"addresses": [{"type": "InternalIP", "address": "1.2.3.4"}]}},
    ]
    assert nodes_from_api(nodes) == [
        SSHNode("n1", "203.0.113.10", ("192.168.1.10", "n1", "203.0.113.10"), ("10.244.1.0/24",)),
        SSHNode("n2", "n2", ("n2",), ()),
    ]
    assert nodes_from_api(nodes, ("InternalIP",))[0].address == "192.168.1.10"


def test_ensure_client_key(tmp_path: Path) -> None:
    key = tmp_path / "k" / "id"
    assert ensure_client_key(key) is True
    assert (key.stat().st_mode & 0o777) == 0o600
    pub = Path(str(key) + ".pub")
    first = pub.read_text()
    pub.unlink()
    assert ensure_client_key(key) is False  # kept; the .pub is rewritten from it
    assert pub.read_text().split()[:2] == first.split()[:2]


async def test_garbage_or_silent_ssh_port(tmp_path: Path) -> None:
    """A node whose port 22 speaks something else, or nothing: the tunnel fails with a clear error, no hang."""
    key = tmp_path / "id"
    ensure_client_key(key)
    (tmp_path / "known_hosts").write_text("")
    stop = asyncio.Event()

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 400 Bad Request\r\n\r\n" + b"\x00\xff" * 40000)
        with contextlib.suppress(OSError):
            await writer.drain()
        await stop.wait()
        writer.close()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await stop.wait()
        writer.close()

    servers = [await asyncio.start_server(garbage, "127.0.0.1", 0), await asyncio.start_server(silent, "127.0.0.1", 0)]
    try:
        for server, expect in zip(servers, (r"is down: node \"node-x\" .*: Banner line too long", r"is down: .*: timed out"), strict=True):
            port = server.sockets[0].getsockname()[1]
            t = SSHTunneler(user="kube", key_file=key, known_hosts=tmp_path / "known_hosts", port=port,
                            connect_timeout_s=1.0, dial_timeout_s=10.0, backoff_initial_s=0.2)
            async with t:
                t.set_nodes([SSHNode("node-x", "127.0.0.1")])
                with pytest.raises(StatusError, match=expect) as e:
                    await asyncio.wait_for(SSHDialer(t).dial("127.0.0.1", 10250), 20)
                assert e.value.code == 503 and "the tunnel to node" in e.value.message
    finally:
        stop.set()
        for server in servers:
            server.close()
            await server.wait_closed()


async def test_set_nodes_needs_start(tmp_path: Path) -> None:
    key = tmp_path / "id"
    ensure_client_key(key)
    (tmp_path / "known_hosts").write_text("")
    t = SSHTunneler(user="kube", key_file=key, known_hosts=tmp_path / "known_hosts")
    with pytest.raises(RuntimeError, match="before start"):
        t.set_nodes([SSHNode("n", "127.0.0.1")])
    with pytest.raises(ValueError, match="need a user"):
        SSHTunneler(user="", key_file=key, known_hosts=tmp_path / "known_hosts")
