"""Sans-I/O pieces of the Kubernetes remotecommand / port-forward channel protocols.

Theory of operation
===================

exec, attach and port-forward multiplex several byte streams ("channels") over one
connection.  Over WebSocket every message carries exactly one channel:

* binary protocols (``channel.k8s.io``, ``v2``..``v5.channel.k8s.io``, ``v4.channel.k8s.io``
  for port-forward, and the empty protocol): a binary message ``[channel] + data``;
* base64 protocols (``base64.channel.k8s.io``, ``v4.base64.channel.k8s.io``): a text message
  ``chr(ord('0') + channel) + base64(data)`` (standard alphabet, padded).

Channel numbers for remotecommand: 0 stdin, 1 stdout, 2 stderr, 3 error (status), 4 resize;
255 is the v5 CLOSE signal: the message ``[255, n]`` half-closes client channel ``n``.

Over SPDY the same roles are separate streams named by the ``streamType`` header; this
module only knows their names (:data:`STREAM_TYPES`).

The error channel/stream is written once at the end of a session.  v1-v3 carry plain
text (empty = success); v4 and v5 carry a JSON ``metav1.Status`` whose non-zero exit code
sits in ``details.causes[0].message`` (:func:`exit_status`, :func:`status_payload`).

Resize requests are a stream of JSON objects ``{"Width": w, "Height": h}`` (one per
message, newline-terminated, but SPDY gives no message boundaries), decoded incrementally
by :class:`ResizeDecoder`.

Everything here is pure: bytes/str in, values out, :class:`ChannelError` on bad input.
"""

from __future__ import annotations

import base64 as _b64
import binascii
import json
from dataclasses import dataclass

__all__ = [
    "CLOSE",
    "ERROR",
    "PORTFORWARD_WS_PROTOCOLS",
    "PROTOCOLS",
    "REMOTECOMMAND_SPDY_PROTOCOLS",
    "REMOTECOMMAND_WS_PROTOCOLS",
    "RESIZE",
    "STDERR",
    "STDIN",
    "STDOUT",
    "STREAM_TYPES",
    "ChannelError",
    "ProtocolInfo",
    "ResizeDecoder",
    "close_message",
    "decode",
    "encode",
    "error_status",
    "exit_status",
    "parse_close",
    "parse_resize",
    "port_prefix",
    "protocol_info",
    "status_payload",
]

STDIN, STDOUT, STDERR, ERROR, RESIZE = 0, 1, 2, 3, 4
CLOSE = 255
STREAM_TYPES = {"stdin": STDIN, "stdout": STDOUT, "stderr": STDERR, "error": ERROR, "resize": RESIZE}

NON_ZERO_EXIT_CODE_REASON = "NonZeroExitCode"
EXIT_CODE_CAUSE_TYPE = "ExitCode"


class ChannelError(ValueError):
    """A malformed channel message, resize request, or unknown protocol."""


@dataclass(frozen=True)
class ProtocolInfo:
    """What one remotecommand subprotocol means."""

    name: str
    version: int  # 1..5
    base64: bool = False  # text frames with base64 payloads (WebSocket only)
    spdy: bool = False  # usable over SPDY
    websocket: bool = True  # usable over WebSocket

    @property
    def status_json(self) -> bool:
        """The error channel carries a JSON Status (v4+) rather than plain text."""
        return self.version >= 4

    @property
    def spdy_resize(self) -> bool:
        """SPDY grew the ``resize`` stream in v3 (WebSocket always has channel 4)."""
        return self.version >= 3

    @property
    def supports_close(self) -> bool:
        """The ``[255, n]`` half-close signal (exactly ``v5.channel.k8s.io``)."""
        return self.name == "v5.channel.k8s.io"


PROTOCOLS: dict[str, ProtocolInfo] = {
    p.name: p
    for p in (
        ProtocolInfo("v5.channel.k8s.io", 5, spdy=False, websocket=True),
        ProtocolInfo("v4.channel.k8s.io", 4, spdy=True, websocket=True),
        ProtocolInfo("v4.base64.channel.k8s.io", 4, base64=True, websocket=True),
        ProtocolInfo("v3.channel.k8s.io", 3, spdy=True, websocket=False),
        ProtocolInfo("v2.channel.k8s.io", 2, spdy=True, websocket=False),
        ProtocolInfo("channel.k8s.io", 1, spdy=True, websocket=True),
        ProtocolInfo("base64.channel.k8s.io", 1, base64=True, websocket=True),
        ProtocolInfo("", 1, websocket=True),
    )
}

#: SPDY exec/attach protocols we accept, best first.  Like the upstream kubelet we do not
#: offer v5 over SPDY; kubectl treats v5 and v4 identically there, so v4 is chosen.
REMOTECOMMAND_SPDY_PROTOCOLS = ("v4.channel.k8s.io", "v3.channel.k8s.io", "v2.channel.k8s.io",
                                "channel.k8s.io")
#: WebSocket exec/attach subprotocols (the client's order decides).
REMOTECOMMAND_WS_PROTOCOLS = ("v5.channel.k8s.io", "v4.channel.k8s.io", "v4.base64.channel.k8s.io",
                              "channel.k8s.io", "base64.channel.k8s.io")
#: WebSocket port-forward subprotocols (not v5, as upstream).
PORTFORWARD_WS_PROTOCOLS = ("v4.channel.k8s.io", "v4.base64.channel.k8s.io")
PORTFORWARD_SPDY_PROTOCOLS = ("portforward.k8s.io",)
SPDY_TUNNEL_PORTFORWARD = "SPDY/3.1+portforward.k8s.io"


def protocol_info(name: str | None) -> ProtocolInfo:
    """Look up a remotecommand protocol; ``None``/"" is the v1 binary protocol."""
    try:
        return PROTOCOLS[name or ""]
    except KeyError:
        raise ChannelError(f"unknown remotecommand protocol {name!r}") from None


# --------------------------------------------------------------------------- framing


def encode(channel: int, data: bytes, *, base64: bool) -> bytes | str:
    """One WebSocket message for ``channel``: bytes (binary) or str (base64 text)."""
    if base64:
        if not 0 <= channel <= 9:
            raise ChannelError(f"channel {channel} cannot be sent in base64 mode")
        return chr(0x30 + channel) + _b64.b64encode(data).decode("ascii")
    if not 0 <= channel <= 255:
        raise ChannelError(f"channel {channel} out of range")
    return bytes([channel]) + data


def decode(message: bytes | str, *, base64: bool) -> tuple[int, bytes]:
    """Split one WebSocket message into ``(channel, data)``.  Empty messages are an error
    here; callers skip them (the protocol says they are ignored)."""
    if not message:
        raise ChannelError("empty message")
    if base64:
        try:
            raw = message.encode("ascii") if isinstance(message, str) else bytes(message)
        except UnicodeEncodeError:
            raise ChannelError("base64 message is not ASCII") from None
        ch = raw[0] - 0x30
        if not 0 <= ch <= 9:
            raise ChannelError(f"invalid base64 channel byte {raw[0]:#x}")
        try:
            return ch, _b64.b64decode(raw[1:], validate=True)
        except (binascii.Error, ValueError) as e:
            raise ChannelError(f"invalid base64 payload: {e}") from None
    # text frames in a binary protocol (the Python client sends str data that way)
    raw = message.encode("utf-8", "surrogatepass") if isinstance(message, str) else bytes(message)
    return raw[0], raw[1:]


def close_message(channel: int) -> bytes:
    """The v5 CLOSE signal for ``channel``."""
    return bytes([CLOSE, channel])


def parse_close(data: bytes) -> int:
    """Payload of a channel-255 message (after the 255 byte) -> the channel to close."""
    if len(data) != 1:
        raise ChannelError(f"invalid CLOSE message of length {len(data) + 1}")
    return data[0]


def port_prefix(port: int) -> bytes:
    """First payload on every port-forward WebSocket channel: the port, u16 little-endian."""
    if not 0 < port <= 0xFFFF:
        raise ChannelError(f"invalid port {port}")
    return port.to_bytes(2, "little")


# --------------------------------------------------------------------------- resize


def _size(obj: object) -> tuple[int, int]:
    if not isinstance(obj, dict):
        raise ChannelError("resize message is not a JSON object")
    out = []
    for key in ("Width", "Height"):
        v = obj.get(key, 0)
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 0xFFFF:
            raise ChannelError(f"resize {key} must be an integer in 0..65535")
        out.append(v)
    return out[0], out[1]


def parse_resize(data: bytes | str) -> tuple[int, int]:
    """Parse exactly one ``{"Width":w,"Height":h}`` object into ``(w, h)``."""
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise ChannelError(f"invalid resize JSON: {e}") from None
    return _size(obj)


class ResizeDecoder:
    """Incremental decoder for a byte stream of concatenated resize JSON objects."""

    MAX_BUFFER = 4096

    def __init__(self) -> None:
        self._buf = ""
        self._pending = b""
        self._decoder = json.JSONDecoder()

    def feed(self, data: bytes) -> list[tuple[int, int]]:
        raw = self._pending + data
        try:
            text = raw.decode()
            self._pending = b""
        except UnicodeDecodeError as e:
            if e.start < len(raw) - 3 or e.reason != "unexpected end of data":
                raise ChannelError("resize stream is not UTF-8") from None
            text, self._pending = raw[:e.start].decode(), raw[e.start:]
        self._buf += text
        out: list[tuple[int, int]] = []
        while True:
            s = self._buf.lstrip()
            if not s:
                self._buf = ""
                break
            if s[0] != "{":
                raise ChannelError("resize stream: expected a JSON object")
            try:
                obj, end = self._decoder.raw_decode(s)
            except ValueError:
                self._buf = s
                if len(s) > self.MAX_BUFFER:
                    raise ChannelError("resize message too long") from None
                break  # incomplete (or invalid, detected once MAX_BUFFER is exceeded)
            out.append(_size(obj))
            self._buf = s[end:]
        return out


# --------------------------------------------------------------------------- status


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def exit_status(code: int) -> bytes:
    """v4+ error-channel Status for a process exit code (0 = Success)."""
    if code == 0:
        return _dumps({"metadata": {}, "status": "Success"})
    return _dumps({
        "metadata": {},
        "status": "Failure",
        "message": f"command terminated with non-zero exit code: exit status {code}",
        "reason": NON_ZERO_EXIT_CODE_REASON,
        "details": {"causes": [{"reason": EXIT_CODE_CAUSE_TYPE, "message": str(code)}]},
    })


def error_status(message: str) -> bytes:
    """v4+ error-channel Status for a failure that is not an exit code."""
    return _dumps({
        "metadata": {},
        "status": "Failure",
        "message": f"Internal error occurred: {message}",
        "reason": "InternalError",
        "code": 500,
    })


def status_payload(protocol: str | ProtocolInfo | None, exit_code: int | None,
                   error: str | None) -> bytes:
    """What to write on the error channel when a session ends.

    ``error`` (if given) wins over ``exit_code``.  v1-v3 get plain text, which is empty on
    success; v4+ get a JSON Status.
    """
    info = protocol if isinstance(protocol, ProtocolInfo) else protocol_info(protocol)
    if info.status_json:
        if error is not None:
            return error_status(error)
        return exit_status(exit_code or 0)
    if error is not None:
        return error.encode()
    if exit_code:
        return f"command terminated with non-zero exit code: exit status {exit_code}".encode()
    return b""
