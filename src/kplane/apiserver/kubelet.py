"""The apiserver's client for kubelets: pods/log, exec, attach and portforward.

The apiserver dials the node's kubelet over TLS as ``kube-apiserver-kubelet-client`` and verifies the kubelet's
serving certificate against ``--kubelet-certificate-authority`` (the cluster CA by default) and the node address.
For upgrades it replays the client's handshake, and pipes bytes only after the kubelet answered ``101``; any other
answer is returned as an error and the connection closed, never followed (CVE-2018-1002105, CVE-2020-8559).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import orjson
from aiohttp import web

from kplane.apiserver.backend import copy_body, read_response_head, splice
from kplane.errors import StatusError

log = logging.getLogger(__name__)

ADDRESS_PREFERENCE = ("InternalIP", "ExternalIP", "InternalDNS", "ExternalDNS", "Hostname")
_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
        "transfer-encoding", "upgrade", "host", "content-length", "authorization"}
_UPGRADE_COPY = ("sec-websocket-key", "sec-websocket-version", "sec-websocket-protocol",
                 "sec-websocket-extensions", "x-stream-protocol-version")
_RESPONSE_COPY = ("upgrade", "connection", "sec-websocket-accept", "sec-websocket-protocol",
                  "x-stream-protocol-version")


@dataclass
class KubeletTarget:
    node: str
    host: str
    port: int


def node_target(node: dict[str, Any]) -> KubeletTarget:
    name = node.get("metadata", {}).get("name", "")
    st = node.get("status") or {}
    addrs = {a.get("type"): a.get("address") for a in st.get("addresses") or []}
    host = next((addrs[t] for t in ADDRESS_PREFERENCE if addrs.get(t)), None)
    if not host:
        raise StatusError(503, f'node "{name}" has no address to reach its kubelet', reason="ServiceUnavailable")
    port = ((st.get("daemonEndpoints") or {}).get("kubeletEndpoint") or {}).get("Port") or 10250
    if not isinstance(port, int) or not 0 < port < 65536:
        raise StatusError(503, f'node "{name}" reports an invalid kubelet port {port!r}')
    return KubeletTarget(name, str(host), int(port))


class KubeletConnector:
    def __init__(self, *, client_cert: Path, client_key: Path, ca_file: Path | None, timeout_s: float = 5.0) -> None:
        ctx = ssl.create_default_context(cafile=str(ca_file)) if ca_file else ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        if ca_file is None:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            log.warning("kubelet serving certificates are NOT verified (--kubelet-insecure-tls): a host that "
                        "answers on a node's address can impersonate its kubelet")
        ctx.load_cert_chain(str(client_cert), str(client_key))
        ctx.set_alpn_protocols(["http/1.1"])
        self.ctx = ctx
        self.verified = ca_file is not None
        self.timeout_s = timeout_s
        self.dialer: Any = None  # the egress selector's Dialer for the "cluster" selection (None: dial directly)

    async def open(self, target: KubeletTarget) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        server_hostname = target.host
        try:
            ipaddress.ip_address(target.host)
        except ValueError:
            pass
        try:
            if self.dialer is not None:
                # through the egress (konnectivity or SSH): TLS to the kubelet is still ours, end to end
                sock = await asyncio.wait_for(self.dialer.dial(target.host, target.port), self.timeout_s)
                opened: tuple[asyncio.StreamReader, asyncio.StreamWriter] = await asyncio.wait_for(
                    asyncio.open_connection(sock=sock, ssl=self.ctx, server_hostname=server_hostname, limit=1 << 20),
                    self.timeout_s)
                return opened
            return await asyncio.wait_for(
                asyncio.open_connection(target.host, target.port, ssl=self.ctx, server_hostname=server_hostname,
                                        limit=1 << 20),
                self.timeout_s)
        except ssl.SSLCertVerificationError as exc:
            raise StatusError(502, f'error dialing the kubelet of node "{target.node}": its serving certificate '
                                   f"failed verification: {exc.verify_message}", reason="BadGateway") from exc
        except (OSError, TimeoutError) as exc:
            raise StatusError(502, f'error dialing the kubelet of node "{target.node}" at '
                                   f"{target.host}:{target.port}: {exc or type(exc).__name__}",
                              reason="BadGateway") from exc

    async def request(self, target: KubeletTarget, method: str, path: str, headers: dict[str, str],
                      ) -> tuple[int, dict[str, str], asyncio.StreamReader, asyncio.StreamWriter]:
        """Send one request; return (status, headers, reader positioned at the body, writer)."""
        reader, writer = await self.open(target)
        lines = [f"{method} {path} HTTP/1.1", f"Host: {target.host}:{target.port}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        await writer.drain()
        try:
            status, head = await read_response_head(reader, f'the kubelet of node "{target.node}"')
        except BaseException:
            writer.close()
            raise
        rh: dict[str, str] = {}
        for k, v in head:
            key = k.lower()
            rh[key] = f"{rh[key]}, {v}" if key in rh else v
        return status, rh, reader, writer


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str], limit: int = 1 << 20) -> bytes:
    if "content-length" in headers:
        with contextlib.suppress(ValueError, asyncio.IncompleteReadError, OSError):
            n = min(int(headers["content-length"]), limit)
            return await asyncio.wait_for(reader.readexactly(n), 5)
        return b""
    with contextlib.suppress(OSError, TimeoutError):
        return await asyncio.wait_for(reader.read(limit), 5)
    return b""


def _error_from(status: int, headers: dict[str, str], body: bytes, what: str) -> StatusError:
    msg = body.decode(errors="replace").strip()
    with contextlib.suppress(orjson.JSONDecodeError, AttributeError):
        doc = orjson.loads(body)
        if isinstance(doc, dict):
            msg = str(doc.get("message") or msg)
    if 300 <= status < 400:
        return StatusError(502, f"{what}: the kubelet answered with a redirect ({status}), which is not followed",
                           reason="BadGateway")
    if status < 400:
        return StatusError(502, f"{what}: unexpected answer {status} from the kubelet", reason="BadGateway")
    return StatusError(status, f"{what}: {msg}" if msg else what)


def kubelet_path(sub: str, ns: str, pod: str, container: str, query: dict[str, str]) -> str:
    """Translate the API's query into the kubelet's (as upstream's LogLocation/ExecLocation do)."""
    base = {"log": "containerLogs", "exec": "exec", "attach": "attach", "portforward": "portForward"}[sub]
    path = f"/{base}/{quote(ns, safe='')}/{quote(pod, safe='')}"
    params: list[tuple[str, str]] = []
    if sub == "log":
        path += f"/{quote(container, safe='')}"
        for k in ("follow", "previous", "timestamps"):
            if query.get(k) in ("true", "1"):
                params.append((k, "true"))
        for k in ("sinceSeconds", "sinceTime", "tailLines", "limitBytes", "stream"):
            if query.get(k):
                params.append((k, query[k]))
    elif sub in ("exec", "attach"):
        path += f"/{quote(container, safe='')}"
        if sub == "exec":
            params += [("command", c) for c in query.get("__commands__", "").split("\x00") if c]
        for api, kub in (("stdin", "input"), ("stdout", "output"), ("stderr", "error"), ("tty", "tty")):
            if query.get(api) in ("true", "1"):
                params.append((kub, "1"))
    else:
        for p in query.get("__ports__", "").split(","):
            if p:
                params.append(("port", p))
    return path + ("?" + urlencode(params) if params else "")


def pick_container(pod: dict[str, Any], requested: str) -> str:
    name = pod.get("metadata", {}).get("name", "")
    containers = [c.get("name") for c in pod.get("spec", {}).get("containers") or []]
    inits = [c.get("name") for c in pod.get("spec", {}).get("initContainers") or []]
    if not requested:
        if len(containers) == 1:
            return str(containers[0])
        raise StatusError(400, f"a container name must be specified for pod {name}, choose one of: "
                               f"[{' '.join(str(c) for c in containers)}]")
    if requested not in containers and requested not in inits:
        raise StatusError(400, f"container {requested} is not valid for pod {name}")
    return requested


async def proxy_logs(connector: KubeletConnector, target: KubeletTarget, path: str, req: web.Request,
                     ) -> web.StreamResponse:
    status, headers, reader, writer = await connector.request(
        target, "GET", path, {"Accept": "*/*", "Connection": "close", "User-Agent": "kplane-apiserver"})
    try:
        if status != 200:
            raise _error_from(status, headers, await _read_body(reader, headers), "error getting logs")
        resp = web.StreamResponse(status=200, headers={"Content-Type": "text/plain"})
        resp.enable_chunked_encoding()
        await resp.prepare(req)
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        try:
            await copy_body(reader, resp, chunked=chunked, length=None)
        except (asyncio.IncompleteReadError, ValueError, OSError):
            pass
        with contextlib.suppress(ConnectionResetError):
            await resp.write_eof()
        return resp
    finally:
        writer.close()


async def proxy_upgrade(connector: KubeletConnector, target: KubeletTarget, path: str, req: web.Request,
                        ) -> web.StreamResponse:
    if "upgrade" not in req.headers.get("Connection", "").lower() or not req.headers.get("Upgrade"):
        raise StatusError(400, "Upgrade request required")
    headers = {"Connection": "Upgrade", "Upgrade": req.headers["Upgrade"], "Content-Length": "0",
               "User-Agent": req.headers.get("User-Agent", "kplane-apiserver")}
    for name in _UPGRADE_COPY:
        values = req.headers.getall(name, [])
        if not values:
            continue
        if name == "sec-websocket-protocol":
            protos = [p.strip() for v in values for p in v.split(",") if p.strip()]
            protos = [p for p in protos if not p.startswith("base64url.bearer.authorization.k8s.io.")]
            if protos:
                headers["Sec-WebSocket-Protocol"] = ", ".join(protos)
            continue
        headers[name.title() if name != "x-stream-protocol-version" else "X-Stream-Protocol-Version"] = \
            ", ".join(values)
    peer = req.remote or ""
    xff = req.headers.get("X-Forwarded-For")
    headers["X-Forwarded-For"] = f"{xff}, {peer}" if xff else peer
    status, rh, reader, writer = await connector.request(target, req.method, path, headers)
    if status != 101:
        body = await _read_body(reader, rh)
        writer.close()
        raise _error_from(status, rh, body, "unable to upgrade connection")
    out = {k.title() if not k.startswith("x-") else "X-Stream-Protocol-Version": v for k, v in rh.items()
           if k in _RESPONSE_COPY}
    return await splice(req, out, reader, writer)
