"""SSH tunnels from the apiserver to its nodes (``--egress ssh``), the path upstream deprecated in 1.9 and removed
in 1.22 in favour of konnectivity. kplane keeps it for clusters whose nodes run sshd and nothing else reachable.

One SSH connection per node, to the node's address on port 22 (asyncssh). A dial to ``host:port`` opens a
``direct-tcpip`` channel through the tunnel of the node that *owns* ``host`` (one of its addresses, or an address
in its pod CIDR; service VIPs through any live tunnel when configured), so the connection leaves from that node.
Where upstream picked a random node for an address no node owns, kplane refuses the dial.

Trust, both ways:
- The apiserver logs in as ``--ssh-user`` with ``--ssh-keyfile`` (public-key only; no agent, no password, no
  ``~/.ssh/config``). :func:`ensure_client_key` generates an ed25519 key and its ``.pub`` when the file is missing;
  the operator installs the ``.pub`` on the nodes.
- Every node's host key is CHECKED against a known_hosts file the operator provides (OpenSSH format: exact keys
  per host, ``[host]:port`` for other ports, or ``@cert-authority`` lines for host keys signed by an SSH CA). An
  unknown or changed host key is refused and the tunnel stays down with that error: there is no
  trust-on-first-use and no "accept any key" switch (upstream used ``InsecureIgnoreHostKey``). The file is read at
  every (re)connection, so adding a node's key needs no restart.

Health: SSH keepalives (a global request every ``keepalive_interval_s``; ``keepalive_count_max`` unanswered
closes the connection), and each tunnel's task reconnects a lost or failed connection with capped, jittered
exponential backoff. A dial while the tunnel is connecting waits for that attempt (bounded by the dial timeout);
a dial while it is down fails at once with the tunnel's last error (503).

Each dialled channel is bridged to a socketpair (:mod:`kplane.tunnel.bridge`) with flow control both ways, so
callers get a plain connected socket whatever the egress.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import ipaddress
import logging
import os
import random
import secrets
import socket
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncssh

from kplane.errors import StatusError
from kplane.tunnel.bridge import socket_for_stream

log = logging.getLogger(__name__)

DEPRECATION_WARNING = ("SSH tunnels (--egress ssh) are deprecated: upstream Kubernetes deprecated them in 1.9 and "
                       "removed them in 1.22; use --egress konnectivity")
ADDRESS_PREFERENCE = ("ExternalIP", "InternalIP", "ExternalDNS", "InternalDNS", "Hostname")


def ensure_client_key(path: str | Path) -> bool:
    """Generate an ed25519 private key (mode 0600) and ``path.pub`` if ``path`` does not exist. True if generated.
    A private key without its ``.pub`` gets the ``.pub`` rewritten from it."""
    p = Path(path)
    pub = p.with_name(p.name + ".pub")
    if p.exists():
        if not pub.exists():
            key = asyncssh.read_private_key(str(p))
            key.write_public_key(str(pub))
        return False
    p.parent.mkdir(parents=True, exist_ok=True)
    key = asyncssh.generate_private_key("ssh-ed25519", comment="kplane-apiserver")
    tmp = p.with_name(p.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.export_private_key("openssh"))
    os.replace(tmp, p)
    key.write_public_key(str(pub))
    return True


@dataclass(frozen=True, slots=True)
class SSHNode:
    """A node to keep a tunnel to: ``address`` is where its sshd listens; the node owns ``address``, every one of
    ``addresses`` and every address inside ``cidrs`` (its pod CIDRs)."""

    name: str
    address: str
    addresses: tuple[str, ...] = ()
    cidrs: tuple[str, ...] = ()


def nodes_from_api(nodes: Iterable[Mapping[str, Any]],
                   address_types: tuple[str, ...] = ADDRESS_PREFERENCE) -> list[SSHNode]:
    """SSHNodes from Node objects: the SSH address is the first address of the preferred types (upstream used the
    ExternalIP); the node owns all its status addresses and its spec.podCIDRs. Nodes without one are skipped."""
    out: list[SSHNode] = []
    for n in nodes:
        name = str((n.get("metadata") or {}).get("name") or "")
        addrs = [(a.get("type"), a.get("address")) for a in (n.get("status") or {}).get("addresses") or []
                 if isinstance(a, Mapping) and isinstance(a.get("address"), str) and a.get("address")]
        by_type: dict[str, str] = {}
        for t, a in addrs:
            by_type.setdefault(str(t), str(a))
        ssh_addr = next((by_type[t] for t in address_types if t in by_type), None)
        if not name or ssh_addr is None:
            continue
        spec = n.get("spec") or {}
        cidrs = [c for c in (spec.get("podCIDRs") or ([spec["podCIDR"]] if spec.get("podCIDR") else []))
                 if isinstance(c, str)]
        out.append(SSHNode(name, ssh_addr, tuple(str(a) for _, a in addrs), tuple(cidrs)))
    return out


class TunnelState(enum.Enum):
    CONNECTING = "Connecting"
    READY = "Ready"
    BACKOFF = "Backoff"  # the last attempt failed or the connection was lost; retrying later
    CLOSED = "Closed"


@dataclass
class TunnelStatus:
    node: str
    address: str
    port: int
    state: TunnelState
    last_error: str
    connected_since: float | None  # wall clock
    reconnects: int
    channels: int  # channels opened through this tunnel so far


class _Client(asyncssh.SSHClient):
    def __init__(self) -> None:
        self.lost: Exception | None = None

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc


@dataclass(eq=False)
class _Tunnel:
    node: SSHNode
    port: int
    state: TunnelState = TunnelState.CONNECTING
    conn: asyncssh.SSHClientConnection | None = None
    last_error: str = ""
    connected_since: float | None = None
    reconnects: int = 0
    channels: int = 0
    task: asyncio.Task[None] | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    def set_state(self, state: TunnelState) -> None:
        self.state = state
        old, self.changed = self.changed, asyncio.Event()
        old.set()

    def owns_exactly(self, host: str) -> bool:
        return host == self.node.address or host in self.node.addresses

    def status(self) -> TunnelStatus:
        return TunnelStatus(self.node.name, self.node.address, self.port, self.state, self.last_error,
                            self.connected_since, self.reconnects, self.channels)


def _networks(cidrs: Iterable[str]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    out = []
    for c in cidrs:
        try:
            out.append(ipaddress.ip_network(c, strict=False))
        except ValueError:
            log.warning("ignoring the invalid CIDR %r", c)
    return tuple(out)


class SSHTunneler:
    """Keeps one SSH tunnel per node and dials through them. Use as ``async with SSHTunneler(...) as t:`` (or
    ``await t.start()`` / ``await t.close()``), then :meth:`set_nodes` whenever the node list changes."""

    def __init__(self, *, user: str, key_file: str | Path, known_hosts: str | Path, port: int = 22,
                 shared_cidrs: Iterable[str] = (), keepalive_interval_s: float = 15.0, keepalive_count_max: int = 3,
                 connect_timeout_s: float = 10.0, dial_timeout_s: float = 5.0, backoff_initial_s: float = 0.5,
                 backoff_max_s: float = 30.0) -> None:
        if not user:
            raise ValueError("SSH tunnels need a user (--ssh-user)")
        self.user = user
        self.key_file = Path(key_file)
        self.known_hosts = Path(known_hosts)
        if not self.key_file.is_file():
            raise ValueError(f"SSH key {self.key_file} does not exist")
        if not self.known_hosts.is_file():
            raise ValueError(f"known_hosts file {self.known_hosts} does not exist: kplane checks every node's host "
                             "key and never trusts one it was not given")
        self.port = port
        self.shared = _networks(shared_cidrs)
        self.keepalive_interval_s = keepalive_interval_s
        self.keepalive_count_max = keepalive_count_max
        self.connect_timeout_s = connect_timeout_s
        self.dial_timeout_s = dial_timeout_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self._tunnels: dict[str, _Tunnel] = {}
        self._started = False
        self._rr = 0

    async def __aenter__(self) -> SSHTunneler:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        log.warning(DEPRECATION_WARNING)
        self._started = True

    async def close(self) -> None:
        tunnels = list(self._tunnels.values())
        self._tunnels.clear()
        await asyncio.gather(*(self._stop(t) for t in tunnels))
        self._started = False

    # ---- the node list

    def set_nodes(self, nodes: Iterable[SSHNode]) -> None:
        """Keep tunnels to exactly these nodes: new ones are connected, removed ones closed, a node whose SSH
        address changed is reconnected."""
        if not self._started:
            raise RuntimeError("SSHTunneler.set_nodes before start()")
        wanted = {n.name: n for n in nodes}
        for name in list(self._tunnels):
            t = self._tunnels[name]
            n = wanted.get(name)
            if n is None or n.address != t.node.address:
                del self._tunnels[name]
                asyncio.ensure_future(self._stop(t))
        for name, n in wanted.items():
            known = self._tunnels.get(name)
            if known is not None:
                known.node = n
                known.networks = _networks(n.cidrs)
                continue
            t = _Tunnel(n, self.port, networks=_networks(n.cidrs))
            t.task = asyncio.ensure_future(self._run(t))
            self._tunnels[name] = t

    def status(self) -> list[TunnelStatus]:
        return [t.status() for t in sorted(self._tunnels.values(), key=lambda t: t.node.name)]

    async def _stop(self, t: _Tunnel) -> None:
        conn = t.conn  # taken first: the task clears t.conn when it ends
        if t.task is not None:
            t.task.cancel()
            with contextlib.suppress(BaseException):
                await t.task
        if conn is not None:
            conn.close()
            with contextlib.suppress(Exception):
                await conn.wait_closed()
        t.conn = None
        t.set_state(TunnelState.CLOSED)

    # ---- one tunnel's life

    def _where(self, t: _Tunnel) -> str:
        return f'node "{t.node.name}" ({t.node.address}:{t.port})'

    def _explain(self, t: _Tunnel, exc: BaseException) -> str:
        if isinstance(exc, asyncssh.HostKeyNotVerifiable):
            return (f"the host key of {self._where(t)} is not trusted by {self.known_hosts} ({exc.reason}); kplane "
                    "never trusts an unknown host key: add the node's key to that file")
        if isinstance(exc, asyncssh.PermissionDenied):
            return (f"{self._where(t)} refused user {self.user!r} with key {self.key_file} ({exc.reason}): "
                    f"install {self.key_file}.pub in the user's authorized_keys on the node")
        if isinstance(exc, asyncssh.KeyImportError):
            return f"cannot load the SSH key {self.key_file}: {exc}"
        if isinstance(exc, asyncssh.DisconnectError):
            return f"{self._where(t)}: {exc.reason or type(exc).__name__}"
        if isinstance(exc, TimeoutError):
            return f"{self._where(t)}: timed out"
        if isinstance(exc, OSError):
            return f"{self._where(t)}: {exc.strerror or exc}"
        return f"{self._where(t)}: {exc or type(exc).__name__}"

    async def _connect(self, t: _Tunnel) -> tuple[asyncssh.SSHClientConnection, _Client]:
        client = _Client()
        conn = await asyncssh.connect(
            t.node.address, t.port, username=self.user, client_keys=[str(self.key_file)],
            known_hosts=str(self.known_hosts), client_factory=lambda: client, config=None, agent_path=None,
            password=None, kbdint_auth=False, gss_auth=False, gss_kex=False, host_based_auth=False,
            preferred_auth="publickey", x509_trusted_certs=None, connect_timeout=self.connect_timeout_s,
            login_timeout=self.connect_timeout_s, keepalive_interval=self.keepalive_interval_s,
            keepalive_count_max=self.keepalive_count_max)
        return conn, client

    async def _run(self, t: _Tunnel) -> None:
        delay = self.backoff_initial_s
        while True:
            t.set_state(TunnelState.CONNECTING)
            try:
                conn, client = await self._connect(t)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                t.last_error = self._explain(t, exc)
                wait = delay * random.uniform(0.8, 1.2)
                log.warning("SSH tunnel to %s failed, retrying in %.1fs: %s", self._where(t), wait, t.last_error)
                t.set_state(TunnelState.BACKOFF)
                await asyncio.sleep(wait)
                delay = min(delay * 2, self.backoff_max_s)
                continue
            t.conn = conn
            t.connected_since = time.time()
            t.last_error = ""
            delay = self.backoff_initial_s
            log.info("SSH tunnel to %s established as %r", self._where(t), self.user)
            t.set_state(TunnelState.READY)
            try:
                await conn.wait_closed()
            finally:
                t.conn = None
                t.connected_since = None
            reason = client.lost
            t.last_error = f"{self._where(t)}: the connection was lost" + (
                f": {reason}" if reason and str(reason) else "")
            t.reconnects += 1
            log.warning("SSH tunnel to %s lost, re-establishing: %s", self._where(t), t.last_error)
            t.set_state(TunnelState.BACKOFF)
            await asyncio.sleep(self.backoff_initial_s * random.uniform(0.8, 1.2))

    # ---- dialling

    def owner_of(self, host: str) -> str | None:
        """The name of the node whose tunnel carries connections to ``host`` (None: no node owns it)."""
        t = self._owner(host)
        return t.node.name if t else None

    def _owner(self, host: str) -> _Tunnel | None:
        tunnels = sorted(self._tunnels.values(), key=lambda t: t.node.name)
        for t in tunnels:
            if t.owns_exactly(host):
                return t
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return None
        for t in tunnels:
            if any(ip in net for net in t.networks):
                return t
        if any(ip in net for net in self.shared):
            ready = [t for t in tunnels if t.state is TunnelState.READY] or tunnels
            if ready:
                self._rr += 1
                return ready[self._rr % len(ready)]
        return None

    async def _ready(self, t: _Tunnel, egress: str, target: str) -> asyncssh.SSHClientConnection:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.dial_timeout_s
        while True:
            if t.state is TunnelState.READY and t.conn is not None:
                return t.conn
            if t.state is not TunnelState.CONNECTING:
                raise StatusError(503, f'egress "{egress}" (SSH tunnels) dialing {target}: the tunnel to '
                                       f"{self._where(t)} is down: {t.last_error or t.state.value}",
                                  reason="ServiceUnavailable")
            remaining = deadline - loop.time()
            try:
                async with asyncio.timeout(max(remaining, 0)):
                    await t.changed.wait()
            except TimeoutError:
                raise StatusError(503, f'egress "{egress}" (SSH tunnels) dialing {target}: the tunnel to '
                                       f"{self._where(t)} is still connecting", reason="ServiceUnavailable") from None

    async def dial(self, host: str, port: int, *, egress: str = "cluster") -> socket.socket:
        """A connected, non-blocking socket to ``host:port`` as seen from the node that owns ``host``."""
        target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        t = self._owner(host)
        if t is None:
            raise StatusError(503, f'egress "{egress}" (SSH tunnels) dialing {target}: no node owns {host}; kplane '
                                   "dials only through the tunnel of the node that owns the address",
                              reason="ServiceUnavailable")
        conn = await self._ready(t, egress, target)
        dial_id = secrets.token_hex(4)
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.dial_timeout_s):
                reader, writer = await conn.open_connection(host, port)
        except asyncssh.ChannelOpenError as exc:
            raise StatusError(502, f'egress "{egress}" (SSH tunnels) dialing {target}: {self._where(t)} could not '
                                   f"connect: {exc.reason}", reason="BadGateway") from exc
        except (asyncssh.Error, OSError, TimeoutError) as exc:
            what = "timed out" if isinstance(exc, TimeoutError) else str(exc) or type(exc).__name__
            raise StatusError(503, f'egress "{egress}" (SSH tunnels) dialing {target}: through {self._where(t)}: '
                                   f"{what}", reason="ServiceUnavailable") from exc
        t.channels += 1
        log.debug("ssh dial %s to %s through node %s: %.1f ms", dial_id, target, t.node.name,
                  (time.monotonic() - started) * 1000)
        return await socket_for_stream(reader, writer, name=f"ssh {dial_id} {target} via {t.node.name}")
