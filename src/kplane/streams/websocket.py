"""Server side of RFC 6455 WebSocket framing, sans-I/O: the handshake answer, a frame decoder fed any slicing of
the received bytes, and frame encoding.

Used where a WebSocket only carries a byte stream (``SPDY/3.1+portforward.k8s.io``, kubectl's default port-forward):
the kubelet takes the connection over after the ``101`` and pushes each decoded payload straight into the SPDY
session, instead of going through a message queue and a reader task per message.

Rules enforced on client frames (a violation raises :class:`WebSocketError` with the close code to send): every
frame is masked; no RSV bits (no extension is ever negotiated); known opcodes only; control frames are final and at
most 125 bytes; a continuation frame needs a message to continue and a new data frame needs the last one finished;
a 64-bit length has its top bit clear; a frame's payload is at most ``max_frame`` bytes (1009).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct
from collections.abc import Callable
from dataclasses import dataclass

_mask_in_place: Callable[[bytes, bytearray], None] | None
try:  # aiohttp's compiled masking (what its own WebSocket reader uses); the same XOR in Python otherwise
    from aiohttp._websocket.helpers import websocket_mask as _mask_in_place
except ImportError:  # pragma: no cover - depends on the aiohttp build
    _mask_in_place = None

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_CONTINUATION, OP_TEXT, OP_BINARY = 0x0, 0x1, 0x2
OP_CLOSE, OP_PING, OP_PONG = 0x8, 0x9, 0xA
CLOSE_NORMAL, CLOSE_PROTOCOL_ERROR, CLOSE_UNSUPPORTED_DATA, CLOSE_TOO_BIG = 1000, 1002, 1003, 1009
DEFAULT_MAX_FRAME = 16 << 20
_U16 = struct.Struct(">H")
_U64 = struct.Struct(">Q")


class WebSocketError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def accept_key(key: str) -> str:
    """``Sec-WebSocket-Accept`` for a client's ``Sec-WebSocket-Key``; ValueError unless the key is the base64 of
    16 bytes (RFC 6455 4.1)."""
    try:
        raw = base64.b64decode(key.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("Sec-WebSocket-Key is not base64") from None
    if len(raw) != 16:
        raise ValueError("Sec-WebSocket-Key is not 16 bytes")
    return base64.b64encode(hashlib.sha1(key.strip().encode() + GUID).digest()).decode()


def unmask(key: bytes, data: bytearray) -> None:
    """XOR ``data`` in place with the 4-byte ``key`` repeated (RFC 6455 5.3)."""
    if _mask_in_place is not None:
        _mask_in_place(key, data)
        return
    for lane in range(4):  # pragma: no cover - depends on the aiohttp build
        data[lane::4] = bytes(b ^ key[lane] for b in data[lane::4])


def encode_frame(opcode: int, payload: bytes = b"", *, fin: bool = True) -> bytes:
    """A server frame's header followed by ``payload`` (server frames are not masked)."""
    return frame_header(opcode, len(payload), fin=fin) + payload


def frame_header(opcode: int, length: int, *, fin: bool = True) -> bytes:
    first = (0x80 if fin else 0) | opcode
    if length < 126:
        return bytes((first, length))
    if length < 1 << 16:
        return bytes((first, 126)) + _U16.pack(length)
    return bytes((first, 127)) + _U64.pack(length)


def close_payload(code: int, reason: str = "") -> bytes:
    return _U16.pack(code) + reason.encode()[:123]


@dataclass(frozen=True)
class Frame:
    opcode: int  # for a continuation frame, the opcode of the message it continues
    payload: bytes | bytearray
    fin: bool


class FrameDecoder:
    """Decodes client frames from bytes fed in any slicing. A frame cut off at the end of a chunk waits in a
    buffer, topped up by the next chunk with just the bytes it lacks."""

    def __init__(self, *, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()
        self._message: int | None = None  # opcode of the data message in progress
        self._broken = False

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        if self._broken:
            raise WebSocketError(CLOSE_PROTOCOL_ERROR, "connection already failed")
        frames: list[Frame] = []
        try:
            with memoryview(data) as view:
                pos, end = 0, len(view)
                buf = self._buf
                if buf:
                    while True:  # top the pending frame up: first its header, then its payload
                        need = self._frame_size(buf)
                        if need is None:  # header still incomplete: one more byte at a time is rare and cheap
                            if pos == end:
                                return frames
                            buf += view[pos:pos + 1]
                            pos += 1
                            continue
                        take = min(need - len(buf), end - pos)
                        buf += view[pos:pos + take]
                        pos += take
                        if len(buf) < need:
                            return frames
                        frames.append(self._frame(buf, 0))
                        buf.clear()
                        break
                while pos < end:
                    need = self._frame_size(view[pos:])
                    if need is None or end - pos < need:
                        break
                    frames.append(self._frame(view, pos))
                    pos += need
                if pos < end:
                    buf += view[pos:]
        except WebSocketError:
            self._broken = True
            raise
        return frames

    def _frame_size(self, b: bytes | bytearray | memoryview) -> int | None:
        """Header + payload length of the frame starting ``b``, None if its header is not complete yet."""
        if len(b) < 2:
            return None
        n = b[1] & 0x7F
        if n == 126:
            if len(b) < 4:
                return None
            n, head = _U16.unpack_from(b, 2)[0], 4
        elif n == 127:
            if len(b) < 10:
                return None
            n, head = _U64.unpack_from(b, 2)[0], 10
            if n >> 63:
                raise WebSocketError(CLOSE_PROTOCOL_ERROR, "frame length has its most significant bit set")
        else:
            head = 2
        if n > self.max_frame:
            raise WebSocketError(CLOSE_TOO_BIG, f"frame of {n} bytes is over the {self.max_frame} byte limit")
        return head + (4 if b[1] & 0x80 else 0) + n

    def _frame(self, b: bytes | bytearray | memoryview, pos: int) -> Frame:
        first, second = b[pos], b[pos + 1]
        fin, opcode = bool(first & 0x80), first & 0x0F
        if first & 0x70:
            raise WebSocketError(CLOSE_PROTOCOL_ERROR, "RSV bits set without a negotiated extension")
        if not second & 0x80:
            raise WebSocketError(CLOSE_PROTOCOL_ERROR, "client frame is not masked")
        n = second & 0x7F
        head = pos + 2 + (2 if n == 126 else 8 if n == 127 else 0)
        if n >= 126:
            n = _U16.unpack_from(b, pos + 2)[0] if n == 126 else _U64.unpack_from(b, pos + 2)[0]
        key = bytes(b[head:head + 4])
        payload = bytearray(b[head + 4:head + 4 + n])
        if payload:
            unmask(key, payload)
        if opcode >= OP_CLOSE:
            if opcode not in (OP_CLOSE, OP_PING, OP_PONG):
                raise WebSocketError(CLOSE_PROTOCOL_ERROR, f"unknown control opcode {opcode:#x}")
            if not fin or n > 125:
                raise WebSocketError(CLOSE_PROTOCOL_ERROR, "control frame fragmented or over 125 bytes")
            return Frame(opcode, payload, True)
        if opcode == OP_CONTINUATION:
            if self._message is None:
                raise WebSocketError(CLOSE_PROTOCOL_ERROR, "continuation frame without a message to continue")
            opcode = self._message
        elif opcode in (OP_TEXT, OP_BINARY):
            if self._message is not None:
                raise WebSocketError(CLOSE_PROTOCOL_ERROR, "new message before the last one finished")
        else:
            raise WebSocketError(CLOSE_PROTOCOL_ERROR, f"unknown data opcode {opcode:#x}")
        self._message = None if fin else opcode
        return Frame(opcode, payload, fin)


def parse_close(payload: bytes | bytearray) -> tuple[int | None, str]:
    """(code, reason) of a close frame's payload; WebSocketError if it is malformed."""
    if not payload:
        return None, ""
    if len(payload) == 1:
        raise WebSocketError(CLOSE_PROTOCOL_ERROR, "close frame with a 1-byte payload")
    code = _U16.unpack_from(payload, 0)[0]
    if code < 1000 or 1004 <= code <= 1006 or 1015 <= code < 3000 or code >= 5000:
        raise WebSocketError(CLOSE_PROTOCOL_ERROR, f"invalid close code {code}")
    try:
        return code, bytes(payload[2:]).decode()
    except UnicodeDecodeError:
        raise WebSocketError(CLOSE_PROTOCOL_ERROR, "close reason is not UTF-8") from None
