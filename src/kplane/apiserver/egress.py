"""The apiserver's egress selector: the one way the apiserver dials a node-side address.

Every connection the apiserver makes toward the node network (the kubelet on :10250 for logs, exec, attach and
port-forward; the proxy subresources of nodes, pods and services) goes through a :class:`Dialer` picked here.
A dialer returns a *connected, non-blocking* socket that the caller wraps itself: TLS to the kubelet with
``asyncio.open_connection(sock=s, ssl=ctx, server_hostname=...)`` (the kubelet's certificate is verified through
any tunnel), or plain for the HTTP proxy.

- :class:`DirectDialer`: a TCP connection from the apiserver host.
- :class:`HTTPConnectDialer`: konnectivity's HTTP-CONNECT mode. ``CONNECT host:port`` to the proxy over a Unix
  socket (or TCP/TLS); a ``200`` means the proxy (through an agent on the node) is connected to the target and
  pipes bytes from then on. Nothing past the response head is read, so bytes the target sends first stay in the
  socket for the caller.
- :class:`SSHDialer`: a ``direct-tcpip`` channel through the SSH tunnel of the node that owns the address
  (:mod:`kplane.tunnel.ssh`, deprecated upstream).

Which dialer serves which traffic is upstream's ``EgressSelectorConfiguration`` (``--egress-selector-config-file``,
``apiserver.k8s.io/v1beta1``): selections ``cluster`` (kubelet and proxy traffic), ``controlplane`` (webhooks by
URL, audit, tracing) and ``etcd``; a selection missing from the file dials directly. ``kplane server --egress
direct|ssh|konnectivity`` writes such a file into the data directory (:func:`prepare_egress`).

Failures are :class:`~kplane.errors.StatusError`: 503 when the egress itself is unusable (the proxy socket is
missing, no tunnel to the node), 502 when the egress answered but could not reach the target; the message names
the egress selection, its transport and the target.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import os
import re
import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

import orjson
import yaml

from kplane.errors import StatusError
from kplane.netutil import wait_readable as _wait_readable

if TYPE_CHECKING:
    from kplane.tunnel.ssh import SSHTunneler

log = logging.getLogger(__name__)

GROUP = "apiserver.k8s.io"
API_VERSIONS = (f"{GROUP}/v1beta1", f"{GROUP}/v1alpha1")
KIND = "EgressSelectorConfiguration"
SELECTIONS = ("cluster", "controlplane", "etcd")
PROTOCOLS = ("Direct", "HTTPConnect", "GRPC")
MAX_CONFIG_BYTES = 1 << 20
MAX_CONNECT_HEAD = 16 * 1024
DEFAULT_TIMEOUT_S = 5.0


class EgressConfigError(ValueError):
    """A bad EgressSelectorConfiguration file or bad ``--egress`` options."""


# --------------------------------------------------------------------------------------------------------------
# The configuration file (pure: bytes in, frozen objects out)


@dataclass(frozen=True, slots=True)
class TLSConfig:
    ca_bundle: str = ""  # empty: system trust roots
    client_cert: str = ""
    client_key: str = ""
    server_name: str = ""  # tlsServerName: overrides the name checked in the proxy's certificate


@dataclass(frozen=True, slots=True)
class TCPTransport:
    url: str
    tls: TLSConfig | None = None

    @property
    def scheme(self) -> str:
        return urlsplit(self.url).scheme

    @property
    def address(self) -> tuple[str, int]:
        u = urlsplit(self.url)
        assert u.hostname is not None and u.port is not None  # checked when parsed
        return u.hostname, u.port


@dataclass(frozen=True, slots=True)
class Connection:
    proxy_protocol: str  # one of PROTOCOLS
    tcp: TCPTransport | None = None
    uds: str | None = None  # socket path, no unix:// prefix

    def describe(self) -> str:
        if self.proxy_protocol == "Direct":
            return "Direct"
        if self.uds is not None:
            return f"{self.proxy_protocol} over uds {self.uds}"
        assert self.tcp is not None
        return f"{self.proxy_protocol} over tcp {self.tcp.url}"


@dataclass(frozen=True, slots=True)
class EgressSelectorConfiguration:
    api_version: str
    selections: Mapping[str, Connection]  # canonical (lower-case) name -> connection

    def connection(self, name: str) -> Connection | None:
        return self.selections.get(name)


def _err(source: str, path: str, msg: str) -> EgressConfigError:
    where = f"{source}: " if source else ""
    return EgressConfigError(f"{where}{path}: {msg}" if path else f"{where}{msg}")


def _check_keys(obj: Any, allowed: tuple[str, ...], source: str, path: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise _err(source, path, f"must be an object, not {type(obj).__name__}")
    unknown = sorted(str(k) for k in obj if k not in allowed)
    if unknown:
        raise _err(source, path, f"unknown field(s) {', '.join(repr(k) for k in unknown)} "
                                 f"(known: {', '.join(allowed)})")
    return obj


def _string(obj: dict[str, Any], key: str, source: str, path: str) -> str:
    v = obj.get(key, "")
    if v is None:
        return ""
    if not isinstance(v, str):
        raise _err(source, f"{path}.{key}", f"must be a string, not {type(v).__name__}")
    return v


def _parse_tls(obj: Any, source: str, path: str) -> TLSConfig:
    d = _check_keys(obj, ("caBundle", "clientKey", "clientCert", "tlsServerName"), source, path)
    return TLSConfig(ca_bundle=_string(d, "caBundle", source, path),
                     client_cert=_string(d, "clientCert", source, path),
                     client_key=_string(d, "clientKey", source, path),
                     server_name=_string(d, "tlsServerName", source, path))


def _parse_tcp(obj: Any, source: str, path: str) -> TCPTransport:
    d = _check_keys(obj, ("url", "tlsConfig"), source, path)
    url = _string(d, "url", source, path)
    if not url:
        raise _err(source, f"{path}.url", "required for a tcp transport (e.g. https://127.0.0.1:8131)")
    u = urlsplit(url)
    if u.scheme not in ("http", "https"):
        raise _err(source, f"{path}.url", f"{url!r}: supported schemes are http:// and https://")
    try:
        port = u.port
    except ValueError as exc:
        raise _err(source, f"{path}.url", f"{url!r}: {exc}") from None
    if not u.hostname or port is None:
        raise _err(source, f"{path}.url", f"{url!r}: needs a host and a port")
    if u.path not in ("", "/") or u.query or u.fragment or u.username or u.password:
        raise _err(source, f"{path}.url", f"{url!r}: only scheme://host:port is allowed")
    tls = _parse_tls(d["tlsConfig"], source, f"{path}.tlsConfig") if d.get("tlsConfig") is not None else None
    if u.scheme == "http" and tls is not None:
        raise _err(source, f"{path}.tlsConfig", "must be absent for an http:// url")
    if u.scheme == "https":
        if tls is None:
            raise _err(source, f"{path}.tlsConfig", "required for an https:// url (clientCert and clientKey)")
        if not tls.client_cert:
            raise _err(source, f"{path}.tlsConfig.clientCert", "required for an https:// url")
        if not tls.client_key:
            raise _err(source, f"{path}.tlsConfig.clientKey", "required for an https:// url")
    return TCPTransport(url=url, tls=tls)


def _parse_connection(obj: Any, source: str, path: str) -> Connection:
    d = _check_keys(obj, ("proxyProtocol", "transport"), source, path)
    proto = _string(d, "proxyProtocol", source, path)
    if proto not in PROTOCOLS:
        raise _err(source, f"{path}.proxyProtocol",
                   f"unsupported value {proto!r}: supported values are {', '.join(PROTOCOLS)}")
    transport = d.get("transport")
    if proto == "Direct":
        if transport is not None:
            raise _err(source, f"{path}.transport", "must be absent for Direct")
        return Connection("Direct")
    tpath = f"{path}.transport"
    if transport is None:
        raise _err(source, tpath, f"required for {proto}")
    t = _check_keys(transport, ("tcp", "uds"), source, tpath)
    tcp_obj, uds_obj = t.get("tcp"), t.get("uds")
    if tcp_obj is not None and uds_obj is not None:
        raise _err(source, tpath, "tcp and uds cannot both be set")
    if tcp_obj is None and uds_obj is None:
        raise _err(source, tpath, "one of tcp or uds must be set")
    if uds_obj is not None:
        u = _check_keys(uds_obj, ("udsName",), source, f"{tpath}.uds")
        name = _string(u, "udsName", source, f"{tpath}.uds")
        if not name:
            raise _err(source, f"{tpath}.uds.udsName", "required for a uds transport")
        if name.startswith("unix://"):
            raise _err(source, f"{tpath}.uds.udsName", f"{name!r}: give the socket path without unix://")
        return Connection(proto, uds=name)
    if proto == "GRPC":
        raise _err(source, f"{tpath}.tcp", "GRPC needs a uds transport (the apiserver has no GRPC over TCP)")
    return Connection(proto, tcp=_parse_tcp(tcp_obj, source, f"{tpath}.tcp"))


def parse_egress_config(data: bytes | str, source: str = "") -> EgressSelectorConfiguration:
    """Parse and validate an EgressSelectorConfiguration document (YAML or JSON), strictly as upstream does:
    unknown fields, unknown names and protocols, duplicates and impossible transports are errors."""
    raw = data.encode() if isinstance(data, str) else data
    if len(raw) > MAX_CONFIG_BYTES:
        raise _err(source, "", f"too large ({len(raw)} bytes, at most {MAX_CONFIG_BYTES})")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _err(source, "", f"not UTF-8 text: {exc}") from None
    try:
        doc = orjson.loads(raw) if text.lstrip().startswith("{") else yaml.safe_load(text)
    except (orjson.JSONDecodeError, yaml.YAMLError) as exc:
        raise _err(source, "", f"cannot parse as YAML or JSON: {exc}") from None
    if doc is None:
        raise _err(source, "", "empty document")
    d = _check_keys(doc, ("apiVersion", "kind", "egressSelections"), source, "")
    kind = d.get("kind")
    if kind != KIND:
        raise _err(source, "kind", f"{kind!r}: expected {KIND}")
    api_version = d.get("apiVersion")
    if api_version not in API_VERSIONS:
        hint = ""
        if isinstance(api_version, str) and api_version.endswith("/v1"):
            hint = f" (upstream has no v1 of {KIND}; its versions are v1beta1 and v1alpha1)"
        raise _err(source, "apiVersion", f"{api_version!r}: expected one of {', '.join(API_VERSIONS)}{hint}")
    items = d.get("egressSelections")
    if not isinstance(items, list):
        raise _err(source, "egressSelections", "required, a list")
    selections: dict[str, Connection] = {}
    for i, item in enumerate(items):
        path = f"egressSelections[{i}]"
        e = _check_keys(item, ("name", "connection"), source, path)
        name = _string(e, "name", source, path).lower()
        if name == "master":  # deprecated alias, rewritten by upstream's conversion
            log.warning("%s%s.name: \"master\" is deprecated, use \"controlplane\"", f"{source}: " if source else "",
                        path)
            name = "controlplane"
        if name not in SELECTIONS:
            raise _err(source, f"{path}.name", f"unsupported value {name!r}: supported values are "
                                               f"{', '.join(SELECTIONS)}")
        if name in selections:
            raise _err(source, f"{path}.name", f"duplicate selection {name!r}")
        if "connection" not in e:
            raise _err(source, f"{path}.connection", "required")
        selections[name] = _parse_connection(e["connection"], source, f"{path}.connection")
    return EgressSelectorConfiguration(api_version=str(api_version), selections=selections)


def load_egress_config(path: str | Path) -> EgressSelectorConfiguration:
    """Read, parse and validate a file; also checks that the TLS files it names exist (as upstream)."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise EgressConfigError(f"cannot read the egress selector configuration {str(p)!r}: "
                                f"{exc.strerror or exc}") from None
    cfg = parse_egress_config(data, source=str(p))
    for name, conn in cfg.selections.items():
        tls = conn.tcp.tls if conn.tcp else None
        if tls is None:
            continue
        for field, value in (("caBundle", tls.ca_bundle), ("clientCert", tls.client_cert),
                             ("clientKey", tls.client_key)):
            if value and not Path(value).is_file():
                raise EgressConfigError(f"{p}: selection {name!r}: tlsConfig.{field} {value!r} does not exist")
    return cfg


def render_egress_config(selections: Mapping[str, Connection], *, comment: str = "") -> str:
    """The YAML of an ``apiserver.k8s.io/v1beta1`` EgressSelectorConfiguration (what upstream reads)."""
    items: list[dict[str, Any]] = []
    for name, conn in selections.items():
        c: dict[str, Any] = {"proxyProtocol": conn.proxy_protocol}
        if conn.uds is not None:
            c["transport"] = {"uds": {"udsName": conn.uds}}
        elif conn.tcp is not None:
            tcp: dict[str, Any] = {"url": conn.tcp.url}
            if conn.tcp.tls is not None:
                t = conn.tcp.tls
                tcp["tlsConfig"] = {k: v for k, v in (("caBundle", t.ca_bundle), ("clientCert", t.client_cert),
                                                      ("clientKey", t.client_key), ("tlsServerName", t.server_name))
                                    if v}
            c["transport"] = {"tcp": tcp}
        items.append({"name": name, "connection": c})
    doc = {"apiVersion": API_VERSIONS[0], "kind": KIND, "egressSelections": items}
    head = "".join(f"# {line}\n" if line else "#\n" for line in comment.splitlines())
    return head + yaml.safe_dump(doc, sort_keys=False, default_flow_style=False)


# --------------------------------------------------------------------------------------------------------------
# Dialers


class Dialer(Protocol):
    async def dial(self, host: str, port: int) -> socket.socket:
        """A connected, non-blocking socket to ``host:port`` on the node side, or a 502/503 StatusError."""
        ...


_HOST_RE = re.compile(r"^[A-Za-z0-9._-]{1,253}$")


def check_target(host: str, port: int) -> str:
    """Validate a dial target; return it as ``host:port`` (IPv6 in brackets). Targets come from Node, Pod and
    Service objects, so nothing that could smuggle a header into a CONNECT line is accepted."""
    if not isinstance(port, int) or not 0 < port < 65536:
        raise StatusError(502, f"invalid dial target port {port!r}", reason="BadGateway")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        if not isinstance(host, str) or not _HOST_RE.match(host):
            raise StatusError(502, f"invalid dial target host {host!r}", reason="BadGateway") from None
        return f"{host}:{port}"
    return f"[{ip.compressed}]:{port}" if ip.version == 6 else f"{ip.compressed}:{port}"


def _bad_gateway(msg: str) -> StatusError:
    return StatusError(502, msg, reason="BadGateway")


def _unavailable(msg: str) -> StatusError:
    return StatusError(503, msg, reason="ServiceUnavailable")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


async def _connect(family: int, addr: Any, timeout_s: float) -> socket.socket:
    loop = asyncio.get_running_loop()
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        if family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        async with asyncio.timeout(timeout_s):
            await loop.sock_connect(sock, addr)
    except BaseException:
        sock.close()
        raise
    return sock


async def _tcp_connect(host: str, port: int, timeout_s: float) -> socket.socket:
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout_s):
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    if not infos:
        raise OSError(errno.EHOSTUNREACH, f"no address for {host}")
    last: BaseException | None = None
    for family, _, _, _, addr in infos:
        try:
            return await _connect(family, addr, timeout_s)
        except (OSError, TimeoutError) as exc:
            last = exc
    assert last is not None
    raise last


class DirectDialer:
    """Dial from the apiserver's own host."""

    def __init__(self, *, name: str = "cluster", timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.name = name
        self.timeout_s = timeout_s
        self.description = "Direct"

    def __repr__(self) -> str:
        return f"DirectDialer(name={self.name!r})"

    async def dial(self, host: str, port: int) -> socket.socket:
        target = check_target(host, port)
        try:
            return await _tcp_connect(host, port, self.timeout_s)
        except (OSError, TimeoutError) as exc:
            raise _bad_gateway(f'egress "{self.name}" (Direct): error dialing {target}: {_reason(exc)}') from exc




@dataclass(frozen=True, slots=True)
class ConnectResponse:
    status: int
    reason: str


def parse_connect_head(head: bytes) -> ConnectResponse:
    """Parse the status line of a proxy's answer to CONNECT (the head without its final blank line)."""
    line = head.split(b"\r\n", 1)[0]
    m = re.fullmatch(rb"HTTP/1\.[01] ([0-9]{3})(?: ([\x20-\x7e\t]*))?", line)
    if not m:
        shown = line[:80].decode("ascii", "backslashreplace")
        raise ValueError(f"not an HTTP response: {shown!r}")
    return ConnectResponse(int(m.group(1)), (m.group(2) or b"").decode("ascii").strip())


async def _read_head(sock: socket.socket, limit: int) -> bytes:
    """Read exactly up to and including the first CRLFCRLF, never a byte more: bytes after the head belong to
    the tunnelled connection. Peeks at what arrived, then consumes only the head's part of it."""
    buf = b""
    while True:
        await _wait_readable(sock)
        try:
            peeked = sock.recv(limit + 4 - len(buf), socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            continue
        if not peeked:
            raise ConnectionError("the proxy closed the connection before answering"
                                  + (f" (after {len(buf)} bytes)" if buf else ""))
        joined = buf + peeked
        idx = joined.find(b"\r\n\r\n")
        if idx >= 0:
            need = idx + 4 - len(buf)
            got = b""
            while len(got) < need:  # the bytes are already queued: recv returns them at once
                got += sock.recv(need - len(got))
            return (buf + got)[:-4]
        if len(joined) > limit:
            raise ValueError(f"the proxy's response head is larger than {limit} bytes")
        buf += sock.recv(len(peeked))


class GRPCDialer:
    """Konnectivity's gRPC mode on a Unix socket: one ``/ProxyService/Proxy`` stream per connection."""

    def __init__(self, uds_path: str | os.PathLike[str], *, name: str = "cluster",
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.uds_path = Path(uds_path)
        self.name = name
        self.timeout_s = timeout_s

    def _what(self, target: str) -> str:
        return f"egress {self.name!r} (GRPC over uds {self.uds_path}) dialing {target}"

    async def dial(self, host: str, port: int) -> socket.socket:
        from kplane.tunnel.client import TunnelDialError, dial_grpc

        target = check_target(host, port)
        if not self.uds_path.exists():
            raise _unavailable(f"{self._what(target)}: the konnectivity server's socket does not exist")
        try:
            return await dial_grpc(self.uds_path, host, port, dial_timeout=self.timeout_s)
        except TunnelDialError as exc:
            make = _unavailable if exc.status == 503 else _bad_gateway
            raise make(f"{self._what(target)}: {exc.message}") from None
        except OSError as exc:
            raise _unavailable(f"{self._what(target)}: {_reason(exc)}") from None


class HTTPConnectDialer:
    """konnectivity's HTTP-CONNECT mode: ``CONNECT host:port`` to the proxy, ``200`` means connected.

    The proxy is reached over a Unix socket (``uds_path``) or TCP (``url`` http:// or https://, with ``tls`` for
    https). Over a Unix socket or plain TCP the returned socket *is* the proxy connection, positioned after the
    response head; over TLS the plaintext is bridged to a socketpair (:mod:`kplane.tunnel.bridge`)."""

    def __init__(self, uds_path: str | Path | None = None, *, url: str | None = None,
                 tls: ssl.SSLContext | None = None, tls_server_name: str | None = None, name: str = "cluster",
                 timeout_s: float = DEFAULT_TIMEOUT_S, max_head: int = MAX_CONNECT_HEAD) -> None:
        if (uds_path is None) == (url is None):
            raise ValueError("HTTPConnectDialer needs exactly one of uds_path or url")
        self.uds_path = str(uds_path) if uds_path is not None else None
        self.url = url
        self.tls = tls
        self.tls_server_name = tls_server_name
        self.name = name
        self.timeout_s = timeout_s
        self.max_head = max_head
        if url is not None:
            u = urlsplit(url)
            if u.scheme not in ("http", "https") or not u.hostname or u.port is None:
                raise ValueError(f"HTTPConnectDialer url must be http(s)://host:port, not {url!r}")
            if u.scheme == "https" and tls is None:
                raise ValueError("an https:// proxy url needs a TLS context")
            self._proxy = (u.hostname, u.port)
            self.description = f"HTTPConnect over tcp {url}"
        else:
            self.description = f"HTTPConnect over uds {self.uds_path}"

    def __repr__(self) -> str:
        return f"HTTPConnectDialer(name={self.name!r}, {self.description})"

    def _request(self, target: str) -> bytes:
        return f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nUser-Agent: kplane-apiserver\r\n\r\n".encode()

    def _where(self, target: str) -> str:
        return f'egress "{self.name}" ({self.description}) dialing {target}'

    def _refused(self, target: str, resp: ConnectResponse, body: bytes) -> StatusError:
        text = body.decode("utf-8", "replace").strip()
        text = "".join(ch for ch in text if ch.isprintable())[:300]
        return _bad_gateway(f"{self._where(target)}: the proxy refused: {resp.status} {resp.reason}"
                            + (f": {text}" if text else ""))

    async def dial(self, host: str, port: int) -> socket.socket:
        target = check_target(host, port)
        if self.uds_path is None and self.tls is not None:
            return await self._dial_tls(target)
        try:
            if self.uds_path is not None:
                sock = await _connect(socket.AF_UNIX, self.uds_path, self.timeout_s)
            else:
                sock = await _tcp_connect(self._proxy[0], self._proxy[1], self.timeout_s)
        except (OSError, TimeoutError) as exc:
            raise _unavailable(f"{self._where(target)}: cannot reach the proxy: {_reason(exc)}") from exc
        try:
            loop = asyncio.get_running_loop()
            async with asyncio.timeout(self.timeout_s):
                await loop.sock_sendall(sock, self._request(target))
                head = await _read_head(sock, self.max_head)
            resp = parse_connect_head(head)
            if resp.status != 200:
                body = b""
                with contextlib.suppress(OSError):
                    body = sock.recv(512)
                raise self._refused(target, resp, body)
            return sock
        except StatusError:
            sock.close()
            raise
        except (OSError, TimeoutError, ValueError) as exc:
            sock.close()
            what = "no answer from the proxy in time" if isinstance(exc, TimeoutError) else _reason(exc)
            raise _bad_gateway(f"{self._where(target)}: {what}") from exc
        except BaseException:
            sock.close()
            raise

    async def _dial_tls(self, target: str) -> socket.socket:
        from kplane.tunnel.bridge import socket_for_stream

        host, port = self._proxy
        try:
            async with asyncio.timeout(self.timeout_s):
                reader, writer = await asyncio.open_connection(
                    host, port, ssl=self.tls, server_hostname=self.tls_server_name or host, limit=self.max_head)
        except ssl.SSLError as exc:
            raise _unavailable(f"{self._where(target)}: TLS with the proxy failed: {exc}") from exc
        except (OSError, TimeoutError) as exc:
            raise _unavailable(f"{self._where(target)}: cannot reach the proxy: {_reason(exc)}") from exc
        try:
            async with asyncio.timeout(self.timeout_s):
                writer.write(self._request(target))
                await writer.drain()
                head = (await reader.readuntil(b"\r\n\r\n"))[:-4]
            resp = parse_connect_head(head)
            if resp.status != 200:
                raise self._refused(target, resp, b"")
        except StatusError:
            writer.close()
            raise
        except asyncio.LimitOverrunError as exc:
            writer.close()
            raise _bad_gateway(f"{self._where(target)}: the proxy's response head is larger than "
                               f"{self.max_head} bytes") from exc
        except asyncio.IncompleteReadError as exc:
            writer.close()
            raise _bad_gateway(f"{self._where(target)}: the proxy closed the connection before answering") from exc
        except (OSError, TimeoutError, ValueError) as exc:
            writer.close()
            what = "no answer from the proxy in time" if isinstance(exc, TimeoutError) else _reason(exc)
            raise _bad_gateway(f"{self._where(target)}: {what}") from exc
        except BaseException:
            writer.close()
            raise
        return await socket_for_stream(reader, writer, name=f"egress {self.name} -> {target}")


class SSHDialer:
    """A ``direct-tcpip`` channel through the SSH tunnel of the node that owns the target address."""

    def __init__(self, tunneler: SSHTunneler, *, name: str = "cluster") -> None:
        self.tunneler = tunneler
        self.name = name
        self.description = f"SSH tunnels as {tunneler.user!r}"

    def __repr__(self) -> str:
        return f"SSHDialer(name={self.name!r})"

    async def dial(self, host: str, port: int) -> socket.socket:
        check_target(host, port)
        return await self.tunneler.dial(host, port, egress=self.name)


def _tls_context(tls: TLSConfig, name: str) -> ssl.SSLContext:
    try:
        ctx = ssl.create_default_context(cafile=tls.ca_bundle or None)
        ctx.load_cert_chain(tls.client_cert, tls.client_key)
    except (OSError, ssl.SSLError) as exc:
        raise EgressConfigError(f"egress {name!r}: cannot load its tlsConfig: {exc}") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def dialer_for(config: EgressSelectorConfiguration | None, selection: str = "cluster", *,
               default: Dialer | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> Dialer:
    """The dialer of one selection. No configuration, or a selection the file does not name, dials directly
    (``default``, else a :class:`DirectDialer`), as upstream."""
    name = selection.lower()
    if name not in SELECTIONS:
        raise EgressConfigError(f"unknown egress selection {selection!r}: expected one of {', '.join(SELECTIONS)}")
    conn = config.connection(name) if config is not None else None
    if conn is None:
        return default if default is not None else DirectDialer(name=name, timeout_s=timeout_s)
    if conn.proxy_protocol == "Direct":
        return DirectDialer(name=name, timeout_s=timeout_s)
    if conn.proxy_protocol == "GRPC":
        if conn.uds is None:
            raise EgressConfigError(f"egress {name!r}: proxyProtocol GRPC needs transport.uds in kplane (a konnectivity "
                                    f"server's socket); use HTTPConnect for a TCP proxy")
        return GRPCDialer(conn.uds, name=name, timeout_s=timeout_s)
    if conn.uds is not None:
        return HTTPConnectDialer(conn.uds, name=name, timeout_s=timeout_s)
    assert conn.tcp is not None
    tls_cfg = conn.tcp.tls if conn.tcp.scheme == "https" else None
    tls = _tls_context(tls_cfg, name) if tls_cfg is not None else None
    server_name = tls_cfg.server_name if tls_cfg is not None and tls_cfg.server_name else None
    return HTTPConnectDialer(url=conn.tcp.url, tls=tls, tls_server_name=server_name, name=name, timeout_s=timeout_s)


# --------------------------------------------------------------------------------------------------------------
# `kplane server --egress ...`: options -> a configuration file in the data directory

EGRESS_MODES = ("direct", "ssh", "konnectivity")
CONFIG_FILENAME = "egress-selector-configuration.yaml"
KONNECTIVITY_UDS = Path("konnectivity-server") / "konnectivity-server.socket"
_SSH_USER_RE = re.compile(r"^[a-z_][a-z0-9_.-]{0,31}\$?$", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class EgressOptions:
    """What the command line says (the flags are wired by the CLI)."""

    mode: str | None = None  # --egress direct|ssh|konnectivity (None: not given)
    config_file: Path | None = None  # --egress-selector-config-file
    konnectivity_uds: Path | None = None  # the konnectivity server's apiserver-side socket
    ssh_user: str | None = None  # --ssh-user
    ssh_keyfile: Path | None = None  # --ssh-keyfile (generated when missing, with its .pub)
    ssh_known_hosts: Path | None = None  # the nodes' host keys (default DATA/ssh/known_hosts)
    ssh_port: int = 22


@dataclass(frozen=True, slots=True)
class SSHSettings:
    user: str
    keyfile: Path
    known_hosts: Path
    port: int = 22


@dataclass(frozen=True, slots=True)
class EgressPlan:
    mode: str  # direct | ssh | konnectivity | file
    config_path: Path
    config: EgressSelectorConfiguration
    ssh: SSHSettings | None = None

    def dialer(self, selection: str = "cluster", *, ssh_tunneler: SSHTunneler | None = None,
               timeout_s: float = DEFAULT_TIMEOUT_S) -> Dialer:
        """The dialer for a selection; with ``--egress ssh`` the cluster selection needs the running tunneler."""
        if self.ssh is not None and selection.lower() == "cluster":
            if ssh_tunneler is None:
                raise EgressConfigError("--egress ssh: the cluster dialer needs the SSH tunneler")
            return SSHDialer(ssh_tunneler, name="cluster")
        return dialer_for(self.config, selection, timeout_s=timeout_s)


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def prepare_egress(opts: EgressOptions, data_dir: Path) -> EgressPlan:
    """Check ``--egress`` and its options, write ``DATA/egress-selector-configuration.yaml`` (an upstream
    ``apiserver.k8s.io/v1beta1`` file) and return the plan. ``--egress-selector-config-file`` is read and checked
    instead (nothing written). Raises :class:`EgressConfigError` with a message for the user."""
    ssh_flags = [f for f, v in (("--ssh-user", opts.ssh_user), ("--ssh-keyfile", opts.ssh_keyfile),
                                ("--ssh-known-hosts", opts.ssh_known_hosts)) if v]
    if opts.config_file is not None:
        if opts.mode is not None:
            raise EgressConfigError("give either --egress or --egress-selector-config-file, not both")
        if ssh_flags:
            raise EgressConfigError(f"{', '.join(ssh_flags)} only apply with --egress ssh")
        cfg = load_egress_config(opts.config_file)
        for selection in cfg.selections:
            dialer_for(cfg, selection)  # refuses what kplane cannot dial (GRPC), loads the TLS files
        return EgressPlan("file", Path(opts.config_file), cfg)
    mode = opts.mode or "direct"
    if mode not in EGRESS_MODES:
        raise EgressConfigError(f"--egress {mode!r}: expected one of {', '.join(EGRESS_MODES)}")
    if mode != "ssh" and ssh_flags:
        raise EgressConfigError(f"{', '.join(ssh_flags)} only apply with --egress ssh")
    if mode != "konnectivity" and opts.konnectivity_uds is not None:
        raise EgressConfigError("the konnectivity socket only applies with --egress konnectivity")
    direct = Connection("Direct")
    ssh: SSHSettings | None = None
    if mode == "direct":
        sel = {"cluster": direct, "controlplane": direct, "etcd": direct}
        comment = "kplane server --egress direct: the apiserver dials nodes, pods and services itself."
    elif mode == "konnectivity":
        uds = opts.konnectivity_uds or data_dir / KONNECTIVITY_UDS
        sel = {"cluster": Connection("HTTPConnect", uds=str(uds)), "controlplane": direct, "etcd": direct}
        comment = ("kplane server --egress konnectivity: traffic to nodes, pods and services (logs, exec, attach,\n"
                   "port-forward, proxy) goes through the konnectivity server in HTTP-CONNECT mode.")
    else:
        ssh = _ssh_settings(opts, data_dir)
        sel = {"controlplane": direct, "etcd": direct}
        comment = ("kplane server --egress ssh (deprecated upstream): no 'cluster' selection here, so traffic to\n"
                   f"nodes goes through kplane's SSH tunnels (user {ssh.user!r}, key {ssh.keyfile},\n"
                   f"host keys checked against {ssh.known_hosts}); the SSH settings come from the flags.")
    text = render_egress_config(sel, comment=comment)
    path = data_dir / CONFIG_FILENAME
    cfg = parse_egress_config(text, source=str(path))  # what we write must read back
    _write_atomic(path, text)
    return EgressPlan(mode, path, cfg, ssh)


def _ssh_settings(opts: EgressOptions, data_dir: Path) -> SSHSettings:
    from kplane.tunnel.ssh import ensure_client_key

    if not opts.ssh_user:
        raise EgressConfigError("--egress ssh needs --ssh-user (the user the apiserver logs in as on every node)")
    if not _SSH_USER_RE.match(opts.ssh_user):
        raise EgressConfigError(f"--ssh-user {opts.ssh_user!r}: not a valid user name (at most 32 characters)")
    if not opts.ssh_keyfile:
        raise EgressConfigError("--egress ssh needs --ssh-keyfile (the apiserver's private key; generated with "
                                "its .pub if missing)")
    if not 0 < opts.ssh_port < 65536:
        raise EgressConfigError(f"SSH port {opts.ssh_port} out of range")
    known = opts.ssh_known_hosts or data_dir / "ssh" / "known_hosts"
    if not known.is_file():
        raise EgressConfigError(
            f"--egress ssh checks every node's host key and trusts none by itself: {known} does not exist. Put "
            f"the nodes' keys there in known_hosts format (check the fingerprints of `ssh-keyscan -p "
            f"{opts.ssh_port} NODE`), or one '@cert-authority * KEY' line for host keys signed by your SSH CA.")
    try:
        generated = ensure_client_key(opts.ssh_keyfile)
    except (ValueError, OSError) as exc:  # unreadable, encrypted, not a key
        raise EgressConfigError(f"--ssh-keyfile {opts.ssh_keyfile}: {exc}") from None
    if generated:
        log.warning("generated the apiserver's SSH key %s; install %s.pub in %s's authorized_keys on every node",
                    opts.ssh_keyfile, opts.ssh_keyfile, opts.ssh_user)
    return SSHSettings(opts.ssh_user, Path(opts.ssh_keyfile), known, opts.ssh_port)
