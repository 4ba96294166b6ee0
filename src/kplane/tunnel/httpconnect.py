"""HTTP CONNECT for the apiserver side of the Konnectivity server, sans I/O.

The apiserver's egress dialer (HTTPConnect over a Unix socket) writes ``CONNECT host:port HTTP/1.1`` plus
headers, waits for ``200``, and from then on the connection carries the tunnelled bytes. This module parses the
request head (bounded in size; anything else is a clear HTTP error) and builds the responses; on the client
side it parses the response head so that not one byte after it is consumed.
"""

from __future__ import annotations

from dataclasses import dataclass

from kplane.tunnel.packets import join_host_port, split_host_port

MAX_HEAD = 16 * 1024
ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"

REASONS = {
    200: "Connection established",
    400: "Bad Request",
    403: "Forbidden",
    405: "Method Not Allowed",
    408: "Request Timeout",
    414: "URI Too Long",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    505: "HTTP Version Not Supported",
}


class HTTPError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class ConnectRequest:
    host: str
    port: int
    head_length: int  # bytes of the request head; anything after it is tunnel payload

    @property
    def address(self) -> str:
        return join_host_port(self.host, self.port)


def parse_connect(buf: bytes) -> ConnectRequest | None:
    """Parse a CONNECT request head from the start of ``buf``. None: the head is not complete yet.
    Raises :class:`HTTPError` for anything that is not a well-formed CONNECT we serve."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        first = buf.split(b"\r\n", 1)[0] if b"\r\n" in buf else buf
        if len(first) > MAX_HEAD // 2:
            raise HTTPError(414, "request line too long")
        if len(buf) > MAX_HEAD:
            raise HTTPError(431, f"request head larger than {MAX_HEAD} bytes")
        return None
    if end + 4 > MAX_HEAD:
        raise HTTPError(431, f"request head larger than {MAX_HEAD} bytes")
    try:
        head = buf[:end].decode("ascii")
    except UnicodeDecodeError:
        raise HTTPError(400, "request head is not ASCII") from None
    lines = head.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        raise HTTPError(400, "malformed request line")
    method, target, version = parts
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise HTTPError(505 if version.startswith("HTTP/") else 400, f"unsupported version {version[:20]!r}")
    if method != "CONNECT":
        raise HTTPError(405, "this proxy only supports CONNECT passthrough")
    for line in lines[1:]:
        name, sep, _ = line.partition(":")
        if not sep or not name or name != name.strip() or any(c in name for c in " \t"):
            raise HTTPError(400, "malformed header line")
    try:
        host, port = split_host_port(target)
    except ValueError as e:
        raise HTTPError(400, f"invalid CONNECT target: {e}") from None
    return ConnectRequest(host=host, port=port, head_length=end + 4)


def error_response(status: int, message: str) -> bytes:
    body = (message.replace("\r", " ").replace("\n", " ") + "\n").encode("utf-8", "replace")
    reason = REASONS.get(status, "Error")
    return (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode("ascii") + body


def connect_request(host: str, port: int) -> bytes:
    return f"CONNECT {join_host_port(host, port)} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode("ascii")


@dataclass(frozen=True)
class ConnectResponse:
    status: int
    reason: str
    head_length: int


def parse_response(buf: bytes, *, limit: int = MAX_HEAD) -> ConnectResponse | None:
    """Parse an HTTP/1.x response head at the start of ``buf``; None: not complete yet. Raises ValueError
    for a malformed or oversized head."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if len(buf) > limit:
            raise ValueError("response head too large")
        return None
    status_line = buf[: buf.find(b"\r\n")].decode("latin-1")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit() or len(parts[1]) != 3:
        raise ValueError(f"malformed status line {status_line[:80]!r}")
    return ConnectResponse(status=int(parts[1]), reason=parts[2] if len(parts) > 2 else "", head_length=end + 4)


def status_for_dial_error(error: str) -> int:
    """Map a dial failure's text to an HTTP status (timeouts 504, policy refusals 403, no agent 503, else 502)."""
    e = error.lower()
    if "timed out" in e or "timeout" in e or "deadline exceeded" in e:
        return 504
    if "not allowed" in e or "forbidden" in e:
        return 403
    if "no agent" in e or "too many" in e:
        return 503
    if "invalid address" in e or "unsupported protocol" in e:
        return 400
    return 502
