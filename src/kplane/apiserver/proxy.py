"""The proxy subresources: ``nodes/{id}/proxy``, ``pods/{id}/proxy`` and ``services/{id}/proxy``.

``id`` is ``[scheme:]name[:port]`` (scheme ``http`` or ``https``; a two-part id is ``name:port``). The target is
always the named object's own address — the pod's IP, a ready endpoint of the Service, or the node's address — and
never anything the caller spells out: the name only looks up an object. Before dialling, the address is checked
(no loopback, link-local, multicast or unspecified address: CVE-2022-3294), a node's DNS name is resolved once and
the checked address is the one dialled (CVE-2020-8562). ``https:`` targets are not verified, as upstream, and the
response says so in a ``Warning`` header; the node's kubelet port is reached through the verified kubelet
connection. Redirects are passed back, never followed; upgrades are piped only after a ``101``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import random
import socket
import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from kplane.apiserver import kubelet as kc
from kplane.apiserver.backend import copy_body, read_response_head, splice
from kplane.errors import StatusError

log = logging.getLogger(__name__)

Obj = dict[str, Any]

MAX_REQUEST_BODY = 3 * 1024 * 1024
_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "trailers",
        "transfer-encoding", "upgrade", "host", "content-length", "authorization", "proxy-connection"}
_NEVER_FORWARD_PREFIXES = ("impersonate-", "x-remote-")
UNVERIFIED_WARNING = ('299 - "the https backend\'s serving certificate was not verified (proxy subresources do '
                      'not verify pods, services or non-kubelet node ports, as upstream)"')


@dataclass(frozen=True)
class ProxyId:
    scheme: str  # "" | "http" | "https"
    name: str
    port: str  # "" or as given (a number, or a service port name)


@dataclass
class Target:
    scheme: str  # http | https
    host: str  # an IP literal that passed check_address
    port: int
    kind: str  # what is reached, for errors: 'pod "x"', 'service "y"', 'node "z"'
    kubelet: bool = False  # the node's kubelet port: the verified kubelet connection
    node: str = ""


def split_id(raw: str) -> ProxyId:
    """``name``, ``name:port`` or ``scheme:name:port`` (upstream's SplitSchemeNamePort)."""
    parts = raw.split(":")
    if len(parts) == 1:
        scheme, name, port = "", parts[0], ""
    elif len(parts) == 2:
        scheme, name, port = "", parts[0], parts[1]
    elif len(parts) == 3:
        scheme, name, port = parts
    else:
        raise StatusError(400, f"invalid proxy request: {raw!r} is not [scheme:]name[:port]")
    if scheme not in ("", "http", "https") or not name:
        raise StatusError(400, f"invalid proxy request: {raw!r} is not [scheme:]name[:port] with scheme http or https")
    return ProxyId(scheme, name, port)


def port_number(text: str, what: str) -> int:
    if not text.isdigit() or len(text) > 5 or not 0 < int(text) < 65536:
        raise StatusError(400, f"invalid port {text!r} for {what}: must be a number between 1 and 65535")
    return int(text)


def check_address(ip: str, what: str) -> str:
    """Only global unicast addresses are proxied to (Go's IsGlobalUnicast, with IPv4-mapped IPv6 unwrapped)."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        raise StatusError(400, f"address not allowed: {what} has no valid IP address ({ip!r})") from None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    bad = (addr.is_loopback or addr.is_link_local or addr.is_multicast or addr.is_unspecified
           or (isinstance(addr, ipaddress.IPv4Address) and addr == ipaddress.IPv4Address("255.255.255.255")))
    if bad:
        raise StatusError(400, f"address not allowed: {what} has address {ip}, which is loopback, link-local, "
                               f"multicast or unspecified")
    return str(addr)


async def resolve_once(host: str, what: str) -> str:
    """An IP literal is checked as is; a DNS name is resolved once and every answer must pass the check; the first
    checked answer is the address dialled."""
    try:
        ipaddress.ip_address(host)
        return check_address(host, what)
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(loop.getaddrinfo(host, None, type=socket.SOCK_STREAM), 5)
    except (OSError, TimeoutError) as exc:
        raise StatusError(503, f"{what}: cannot resolve {host!r}: {exc}") from exc
    ips = [str(i[4][0]) for i in infos]
    if not ips:
        raise StatusError(503, f"{what}: {host!r} has no address")
    for ip in ips:
        check_address(ip, what)
    return ips[0]


# --- target resolution ---------------------------------------------------------------------------------------------

def pod_target(pod: Obj, pid: ProxyId) -> Target:
    name = pod["metadata"]["name"]
    what = f'pod "{name}"'
    port = pid.port
    if not port:
        for c in (pod.get("spec") or {}).get("containers") or []:
            if c.get("ports"):
                port = str(c["ports"][0].get("containerPort", ""))
                break
    scheme = pid.scheme or "http"
    number = port_number(port, what) if port else (443 if scheme == "https" else 80)
    ip = (pod.get("status") or {}).get("podIP")
    if not ip:
        raise StatusError(503, f"{what} has no IP address yet")
    return Target(scheme, check_address(str(ip), what), number, what)


def service_target(svc: Obj, endpoints: Obj | None, pid: ProxyId) -> Target:
    name = svc["metadata"]["name"]
    what = f'service "{name}"'
    ports = (svc.get("spec") or {}).get("ports") or []
    if pid.port and pid.port.isdigit():
        number = port_number(pid.port, what)
        match = [p for p in ports if p.get("port") == number]
    else:
        match = [p for p in ports if (p.get("name") or "") == pid.port]
    if not match:
        if pid.port:
            raise StatusError(503, f'no service port "{pid.port}" found for service "{name}"',
                              reason="ServiceUnavailable")
        raise StatusError(503, f'no service port "" found for service "{name}": name the port '
                               f"(services/[scheme:]{name}:<port name or number>/proxy)", reason="ServiceUnavailable")
    port_name = match[0].get("name") or ""
    candidates: list[tuple[str, int]] = []
    for subset in (endpoints or {}).get("subsets") or []:
        eport = next((p.get("port") for p in subset.get("ports") or [] if (p.get("name") or "") == port_name), None)
        if not isinstance(eport, int):
            continue
        for a in subset.get("addresses") or []:
            if a.get("ip"):
                candidates.append((str(a["ip"]), eport))
    if not candidates:
        raise StatusError(503, f'no endpoints available for service "{name}"', reason="ServiceUnavailable")
    ip, eport = random.choice(candidates)
    return Target(pid.scheme or "http", check_address(ip, f"an endpoint of {what}"), eport, what)


async def node_target(node: Obj, pid: ProxyId) -> Target:
    base = kc.node_target(node)  # preferred address and the kubelet port the node reports
    what = f'node "{base.node}"'
    port = port_number(pid.port, what) if pid.port else base.port
    host = await resolve_once(base.host, what)
    kubelet = port == base.port and pid.scheme in ("", "https")
    scheme = "https" if kubelet else (pid.scheme or "http")
    return Target(scheme, host, port, what, kubelet=kubelet, node=base.node)


# --- forwarding ---------------------------------------------------------------------------------------------------

_INSECURE = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
_INSECURE.check_hostname = False
_INSECURE.verify_mode = ssl.CERT_NONE
_INSECURE.set_alpn_protocols(["http/1.1"])


async def open_target(server: Any, t: Target) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if t.kubelet:
        if server.kubelets is None:
            raise StatusError(503, "this apiserver has no kubelet client configured")
        opened: tuple[asyncio.StreamReader, asyncio.StreamWriter] = await server.kubelets.open(
            kc.KubeletTarget(t.node, t.host, t.port))
        return opened
    ctx = _INSECURE if t.scheme == "https" else None
    dialer = getattr(server, "dialer", None)
    try:
        if dialer is not None:
            sock = await dialer.dial(t.host, t.port)
            return await asyncio.wait_for(asyncio.open_connection(sock=sock, ssl=ctx, limit=1 << 20,
                                                                  server_hostname="" if ctx else None), 10)
        return await asyncio.wait_for(asyncio.open_connection(t.host, t.port, ssl=ctx, limit=1 << 20), 10)
    except (OSError, TimeoutError, ssl.SSLError) as exc:
        raise StatusError(503, f"error trying to reach {t.kind} at {t.scheme}://{t.host}:{t.port}: "
                               f"{exc or type(exc).__name__}", reason="ServiceUnavailable") from exc


def _host_header(t: Target) -> str:
    host = f"[{t.host}]" if ":" in t.host else t.host
    default = 443 if t.scheme == "https" else 80
    return host if t.port == default else f"{host}:{t.port}"


def _forward_headers(req: web.Request, t: Target) -> list[tuple[str, str]]:
    out = [("Host", _host_header(t))]
    for k, v in req.headers.items():
        lk = k.lower()
        if lk in _HOP or lk.startswith(_NEVER_FORWARD_PREFIXES):
            continue
        out.append((k, v))
    peer = req.remote or ""
    xff = req.headers.get("X-Forwarded-For")
    out.append(("X-Forwarded-For", f"{xff}, {peer}" if xff else peer))
    out.append(("X-Forwarded-Proto", "https"))
    out.append(("X-Forwarded-Host", req.host))
    out.append(("X-Forwarded-Uri", req.path_qs))
    return out


def _request_path(rest: str, query_string: str) -> str:
    path = rest or "/"
    return path + (f"?{query_string}" if query_string else "")


def rewrite_location(location: str, t: Target, prefix: str) -> str:
    """A redirect to the backend itself points back through the proxy; anything else is passed on as is (never
    followed here)."""
    parts = urlsplit(location)
    if parts.scheme in ("http", "https") and parts.hostname:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        if parts.hostname == t.host and port == t.port:
            q = f"?{parts.query}" if parts.query else ""
            return prefix.rstrip("/") + (parts.path or "/") + q
        return location
    if location.startswith("/") and not location.startswith("//"):
        return prefix.rstrip("/") + location
    return location


async def forward(server: Any, req: web.Request, t: Target, rest: str, prefix: str) -> web.StreamResponse:
    upgrade = "upgrade" in req.headers.get("Connection", "").lower() and bool(req.headers.get("Upgrade"))
    if upgrade:
        return await _forward_upgrade(server, req, t, rest)
    body = await req.content.read(MAX_REQUEST_BODY + 1)
    if len(body) > MAX_REQUEST_BODY:
        raise StatusError(413, f"Request entity too large: limit is {MAX_REQUEST_BODY}")
    reader, writer = await open_target(server, t)
    try:
        head = [f"{req.method} {_request_path(rest, req.query_string)} HTTP/1.1"]
        head += [f"{k}: {v}" for k, v in _forward_headers(req, t)]
        head += ["Connection: close"]
        if body or req.method in ("POST", "PUT", "PATCH"):
            head.append(f"Content-Length: {len(body)}")
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1", errors="replace") + body)
        await writer.drain()
        status, headers = await read_response_head(reader, t.kind)
        resp = web.StreamResponse(status=status)
        for k, v in headers:
            lk = k.lower()
            if lk in _HOP:
                continue
            if lk == "location":
                v = rewrite_location(v, t, prefix)
            resp.headers.add(k, v)
        if t.scheme == "https" and not t.kubelet:
            resp.headers.add("Warning", UNVERIFIED_WARNING)
        hmap = {k.lower(): v for k, v in headers}
        no_body = req.method == "HEAD" or status in (204, 304) or 100 <= status < 200
        length = hmap.get("content-length")
        chunked = "chunked" in hmap.get("transfer-encoding", "").lower()
        if no_body:
            if length is not None:
                resp.headers["Content-Length"] = length
            await resp.prepare(req)
            await resp.write_eof()
            return resp
        if length is not None and length.isdigit() and not chunked:
            resp.content_length = int(length)
        else:
            resp.enable_chunked_encoding()
        await resp.prepare(req)
        try:
            await copy_body(reader, resp, chunked=chunked, idle_timeout_s=300,
                            length=int(length) if length and length.isdigit() and not chunked else None)
        except (asyncio.IncompleteReadError, ValueError, OSError, TimeoutError):
            pass  # the backend stopped mid-body: the client sees a short response, as with any proxy
        with contextlib.suppress(ConnectionResetError):
            await resp.write_eof()
        return resp
    finally:
        writer.close()


async def _forward_upgrade(server: Any, req: web.Request, t: Target, rest: str) -> web.StreamResponse:
    reader, writer = await open_target(server, t)
    try:
        head = [f"{req.method} {_request_path(rest, req.query_string)} HTTP/1.1"]
        head += [f"{k}: {v}" for k, v in _forward_headers(req, t)]
        head += ["Connection: Upgrade", f"Upgrade: {req.headers['Upgrade']}"]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1", errors="replace"))
        await writer.drain()
        status, headers = await read_response_head(reader, t.kind)
    except BaseException:
        writer.close()
        raise
    if status != 101:
        writer.close()
        if 300 <= status < 400:
            raise StatusError(502, f"{t.kind} answered the upgrade with a redirect ({status}), which is not "
                                   f"followed", reason="BadGateway")
        raise StatusError(502 if status < 400 else status, f"{t.kind} refused the upgrade ({status})")
    out = {k: v for k, v in headers if k.lower() not in ("content-length", "transfer-encoding")}
    return await splice(req, out, reader, writer)
