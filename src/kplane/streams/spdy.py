"""Sans-I/O SPDY/3.1, the dialect Kubernetes clients (moby/spdystream) speak.

Theory of operation
===================

:class:`SpdyConnection` is a pure state machine: it never touches a socket.  The owner
feeds it whatever bytes arrived with :meth:`SpdyConnection.receive_data`, which returns
the list of complete frames as frozen event dataclasses, and asks it to emit frames with
the sender methods (:meth:`~SpdyConnection.syn_reply`, :meth:`~SpdyConnection.data`, ...).
Every byte the connection wants on the wire -- including bytes it decides to send on its
own, such as ping echoes and ``RST_STREAM PROTOCOL_ERROR`` for bad stream ids -- is
appended to an outbound buffer that the owner empties with
:meth:`SpdyConnection.data_to_send`.

Wire format (all big-endian, 8-byte frame header)::

    control: 1 | version(15)=3 | type(16) | flags(8) | length(24) | payload
    data:    0 | stream-id(31)           | flags(8) | length(24) | payload

Header blocks (SYN_STREAM, SYN_REPLY, HEADERS) are ``u32 count`` then ``u32 len, name,
u32 len, value`` pairs; several values of one name are joined by NUL.  Blocks are
compressed with a single zlib stream per direction using the SPDY/3 preset dictionary
(level 9, ``Z_SYNC_FLUSH`` after every block), so the compressor and decompressor live as
long as the connection and a dropped frame would desynchronise them: we therefore always
decompress a header block, even for frames we then ignore.

State kept per connection:

* the receive buffer (only whole frames are parsed, so feeding one byte at a time yields
  exactly the same events; a frame is at most 2^24 - 1 + 8 bytes, which bounds it);
* the next locally created stream id (server: 2, 4, ...; client: 1, 3, ...), the lowest
  acceptable peer stream id, and the next local ping id (server 2, 4, ...; client 1, 3, ...);
* per stream: whether it is replied (SYN_REPLY seen/sent), and whether each half is closed.
  Streams are forgotten once both halves are closed or either side reset them.
* whether GOAWAY was sent/received.

Kubernetes-specific rules implemented here: a PING whose id has the peer's parity is echoed
unchanged; DATA for a locally created stream that has not seen its SYN_REPLY is discarded
(spdystream does the same); DATA for unknown or remote-closed streams is dropped; a
SYN_STREAM with a bad id gets ``RST_STREAM PROTOCOL_ERROR``; a SYN_STREAM after GOAWAY is
ignored.  There is no flow control (spdystream has none): SETTINGS and WINDOW_UPDATE are
parsed and reported, never acted on.

Anything malformed from the peer raises :class:`SpdyProtocolError` (and only that); after
that the connection object must be discarded.  Misuse by the local owner (sending on a
closed stream, DATA before replying, ...) raises :class:`SpdyLocalError`.
"""

from __future__ import annotations

import importlib.resources
import struct
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache

__all__ = [
    "CONTROL_TYPES",
    "FLAG_FIN",
    "FLAG_UNIDIRECTIONAL",
    "MAX_FRAME_PAYLOAD",
    "MAX_STREAM_ID",
    "RST_CANCEL",
    "RST_FLOW_CONTROL_ERROR",
    "RST_INTERNAL_ERROR",
    "RST_INVALID_STREAM",
    "RST_PROTOCOL_ERROR",
    "RST_REFUSED_STREAM",
    "Data",
    "Event",
    "GoAway",
    "Headers",
    "Ping",
    "RstStream",
    "Settings",
    "SpdyConnection",
    "SpdyLocalError",
    "SpdyProtocolError",
    "SynReply",
    "SynStream",
    "WindowUpdate",
    "spdy3_dictionary",
]

VERSION = 3
FLAG_FIN = 0x01
FLAG_UNIDIRECTIONAL = 0x02
MAX_FRAME_PAYLOAD = (1 << 24) - 1
MAX_STREAM_ID = 0x7FFFFFFF

TYPE_SYN_STREAM = 1
TYPE_SYN_REPLY = 2
TYPE_RST_STREAM = 3
TYPE_SETTINGS = 4
TYPE_PING = 6
TYPE_GOAWAY = 7
TYPE_HEADERS = 8
TYPE_WINDOW_UPDATE = 9
CONTROL_TYPES = frozenset(
    {TYPE_SYN_STREAM, TYPE_SYN_REPLY, TYPE_RST_STREAM, TYPE_SETTINGS, TYPE_PING, TYPE_GOAWAY,
     TYPE_HEADERS, TYPE_WINDOW_UPDATE}
)

RST_PROTOCOL_ERROR = 1
RST_INVALID_STREAM = 2
RST_REFUSED_STREAM = 3
RST_UNSUPPORTED_VERSION = 4
RST_CANCEL = 5
RST_INTERNAL_ERROR = 6
RST_FLOW_CONTROL_ERROR = 7
RST_STREAM_IN_USE = 8
RST_STREAM_ALREADY_CLOSED = 9
RST_FRAME_TOO_LARGE = 11

GOAWAY_OK = 0
GOAWAY_PROTOCOL_ERROR = 1
GOAWAY_INTERNAL_ERROR = 2

#: Largest decompressed header block we accept (guards against zlib bombs).
MAX_HEADER_BLOCK = 256 * 1024

_HDR = struct.Struct(">II")
_U32 = struct.Struct(">I")
_U32x2 = struct.Struct(">II")


class SpdyProtocolError(Exception):
    """The peer sent something that is not valid SPDY/3.1; drop the connection."""


class SpdyLocalError(RuntimeError):
    """The local owner tried to do something the protocol state does not allow."""


@cache
def spdy3_dictionary() -> bytes:
    """The 1423-byte SPDY/3 header-compression dictionary (zlib DICTID 0xE3C6A7C2)."""
    data = importlib.resources.files(__package__).joinpath("spdy3_dictionary.bin").read_bytes()
    if len(data) != 1423 or zlib.adler32(data) != 0xE3C6A7C2:
        raise RuntimeError("corrupt spdy3_dictionary.bin")
    return data


HeaderMap = dict[str, list[str]]
HeaderInput = Mapping[str, str | Sequence[str]]


# --------------------------------------------------------------------------- events


@dataclass(frozen=True)
class Event:
    """Base class of everything :meth:`SpdyConnection.receive_data` returns."""


@dataclass(frozen=True)
class SynStream(Event):
    stream_id: int
    headers: HeaderMap = field(hash=False)
    fin: bool = False
    unidirectional: bool = False
    associated_to: int = 0
    priority: int = 0


@dataclass(frozen=True)
class SynReply(Event):
    stream_id: int
    headers: HeaderMap = field(hash=False)
    fin: bool = False


@dataclass(frozen=True)
class Headers(Event):
    stream_id: int
    headers: HeaderMap = field(hash=False)
    fin: bool = False


@dataclass(frozen=True)
class Data(Event):
    stream_id: int
    data: bytes
    fin: bool = False


@dataclass(frozen=True)
class RstStream(Event):
    stream_id: int
    status: int


@dataclass(frozen=True)
class Ping(Event):
    """A PING; ``reply`` is True when it answers one of our own pings (same parity)."""

    id: int
    reply: bool = False


@dataclass(frozen=True)
class GoAway(Event):
    last_stream_id: int
    status: int


@dataclass(frozen=True)
class Settings(Event):
    """SETTINGS entries as ``(flags, id, value)``; reported only, never acted on."""

    entries: tuple[tuple[int, int, int], ...]
    clear: bool = False


@dataclass(frozen=True)
class WindowUpdate(Event):
    stream_id: int
    delta: int


# --------------------------------------------------------------------------- header blocks


def encode_header_block(headers: HeaderInput) -> bytes:
    """Uncompressed SPDY/3 header block; names lower-cased, multiple values NUL-joined."""
    merged: dict[str, list[str]] = {}
    for name, value in headers.items():
        values = [value] if isinstance(value, str) else list(value)
        merged.setdefault(name.lower(), []).extend(values)
    out = [_U32.pack(len(merged))]
    for name, values in merged.items():
        n = name.encode()
        v = "\x00".join(values).encode()
        out += [_U32.pack(len(n)), n, _U32.pack(len(v)), v]
    return b"".join(out)


def decode_header_block(raw: bytes) -> HeaderMap:
    """Parse an uncompressed header block; names are lower-cased, duplicates merged."""
    try:
        pos = 4
        (count,) = _U32.unpack_from(raw, 0)
        if count > len(raw) // 8:
            raise SpdyProtocolError("header count larger than block")
        headers: HeaderMap = {}
        for _ in range(count):
            (nlen,) = _U32.unpack_from(raw, pos)
            pos += 4
            if nlen == 0 or pos + nlen > len(raw):
                raise SpdyProtocolError("bad header name length")
            name = raw[pos:pos + nlen].decode().lower()
            pos += nlen
            (vlen,) = _U32.unpack_from(raw, pos)
            pos += 4
            if pos + vlen > len(raw):
                raise SpdyProtocolError("bad header value length")
            value = raw[pos:pos + vlen].decode()
            pos += vlen
            headers.setdefault(name, []).extend(value.split("\x00"))
    except (struct.error, UnicodeDecodeError) as e:
        raise SpdyProtocolError(f"malformed header block: {e}") from None
    if pos != len(raw):
        raise SpdyProtocolError("trailing bytes after header block")
    return headers


# --------------------------------------------------------------------------- connection


@dataclass
class _Stream:
    local: bool  # created by us
    replied: bool = False  # SYN_REPLY sent (peer stream) / received (local stream)
    local_closed: bool = False
    remote_closed: bool = False


class SpdyConnection:
    """One SPDY/3.1 connection, either side.  See the module docstring."""

    def __init__(self, server: bool) -> None:
        self.server = server
        self._inbuf = bytearray()
        self._outbuf = bytearray()
        self._compressor = zlib.compressobj(
            9, zlib.DEFLATED, 15, 8, zlib.Z_DEFAULT_STRATEGY, zdict=spdy3_dictionary()
        )
        self._decompressor = zlib.decompressobj(zdict=spdy3_dictionary())
        self._next_stream_id = 2 if server else 1
        self._next_peer_stream_id = 1 if server else 2
        self._last_peer_stream_id = 0
        self._next_ping_id = 2 if server else 1
        self._streams: dict[int, _Stream] = {}
        self.goaway_received = False
        self.goaway_sent = False
        self._broken = False

    # ----------------------------------------------------------------- introspection

    def open_streams(self) -> list[int]:
        return sorted(self._streams)

    def is_replied(self, stream_id: int) -> bool:
        s = self._streams.get(stream_id)
        return s is not None and s.replied

    def data_to_send(self) -> bytes:
        out = bytes(self._outbuf)
        self._outbuf.clear()
        return out

    # ----------------------------------------------------------------- receiving

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Event]:
        if self._broken:
            raise SpdyProtocolError("connection already failed")
        # Frames are cut straight out of ``data`` (one copy per payload; none when a payload comes alone, as bytes,
        # as over kubectl's WebSocket tunnel, which sends each header and payload apart). Only a frame cut off at
        # the end waits in ``_inbuf``; the next call tops it up with just the bytes that frame still lacks, so the
        # bytes after it are never copied into the buffer.
        events: list[Event] = []
        pos, end = 0, len(data)
        try:
            with memoryview(data) as view:
                inbuf = self._inbuf
                if inbuf:
                    if len(inbuf) < 8:
                        pos = min(8 - len(inbuf), end)
                        inbuf += view[:pos]
                        if len(inbuf) < 8:
                            return events
                    word, flags_len = _HDR.unpack_from(inbuf, 0)
                    length = flags_len & 0xFFFFFF
                    if len(inbuf) == 8 and end - pos >= length:  # only the header waited: payload straight from data
                        payload = (data if pos == 0 and length == end and type(data) is bytes
                                   else bytes(view[pos:pos + length]))
                        pos += length
                    else:
                        take = min(8 + length - len(inbuf), end - pos)
                        inbuf += view[pos:pos + take]
                        pos += take
                        if len(inbuf) < 8 + length:
                            return events
                        payload = bytes(inbuf[8:])
                    inbuf.clear()
                    ev = self._frame(word, flags_len >> 24, payload)
                    if ev is not None:
                        events.append(ev)
                while end - pos >= 8:
                    word, flags_len = _HDR.unpack_from(data, pos)
                    length = flags_len & 0xFFFFFF
                    if end - pos < 8 + length:
                        break
                    payload = bytes(view[pos + 8:pos + 8 + length])
                    pos += 8 + length
                    ev = self._frame(word, flags_len >> 24, payload)
                    if ev is not None:
                        events.append(ev)
                if pos < end:
                    inbuf += view[pos:]
        except SpdyProtocolError:
            self._broken = True
            raise
        return events

    def _frame(self, word: int, flags: int, payload: bytes) -> Event | None:
        if word & 0x80000000:
            version = (word >> 16) & 0x7FFF
            if version != VERSION:
                raise SpdyProtocolError(f"unsupported SPDY version {version}")
            return self._control(word & 0xFFFF, flags, payload)
        return self._data(word & 0x7FFFFFFF, flags, payload)

    def _data(self, stream_id: int, flags: int, payload: bytes) -> Event | None:
        if stream_id == 0:
            raise SpdyProtocolError("DATA frame on stream 0")
        if flags & ~FLAG_FIN:
            raise SpdyProtocolError(f"invalid DATA flags {flags:#x}")
        s = self._streams.get(stream_id)
        if s is None or s.remote_closed or (s.local and not s.replied):
            return None  # unknown, finished, or not yet replied: spdystream drops it
        fin = bool(flags & FLAG_FIN)
        if fin:
            s.remote_closed = True
            self._maybe_forget(stream_id)
        return Data(stream_id, payload, fin)

    def _headers_from(self, block: bytes) -> HeaderMap:
        try:
            raw = self._decompressor.decompress(block, MAX_HEADER_BLOCK)
        except zlib.error as e:
            raise SpdyProtocolError(f"header decompression failed: {e}") from None
        if self._decompressor.unconsumed_tail:
            raise SpdyProtocolError("header block too large")
        if self._decompressor.eof:
            raise SpdyProtocolError("header compression stream ended")
        return decode_header_block(raw)

    def _control(self, ftype: int, flags: int, p: bytes) -> Event | None:
        n = len(p)
        if ftype == TYPE_SYN_STREAM:
            if n < 10:
                raise SpdyProtocolError("short SYN_STREAM")
            if flags & ~(FLAG_FIN | FLAG_UNIDIRECTIONAL):
                raise SpdyProtocolError(f"invalid SYN_STREAM flags {flags:#x}")
            sid, assoc = _U32x2.unpack_from(p, 0)
            sid &= 0x7FFFFFFF
            headers = self._headers_from(p[10:])
            fin = bool(flags & FLAG_FIN)
            if self.goaway_received or self.goaway_sent:
                return None
            peer_parity = 1 if self.server else 0
            if (sid == 0 or sid % 2 != peer_parity or sid < self._next_peer_stream_id
                    or sid in self._streams):
                self._send_rst(sid, RST_PROTOCOL_ERROR)
                return None
            self._next_peer_stream_id = sid + 2
            self._last_peer_stream_id = sid
            self._streams[sid] = _Stream(local=False, remote_closed=fin)
            return SynStream(sid, headers, fin, bool(flags & FLAG_UNIDIRECTIONAL),
                             assoc & 0x7FFFFFFF, p[8] >> 5)
        if ftype in (TYPE_SYN_REPLY, TYPE_HEADERS):
            if n < 4:
                raise SpdyProtocolError("short SYN_REPLY/HEADERS")
            if flags & ~FLAG_FIN:
                raise SpdyProtocolError(f"invalid flags {flags:#x}")
            (sid,) = _U32.unpack_from(p, 0)
            sid &= 0x7FFFFFFF
            headers = self._headers_from(p[4:])
            fin = bool(flags & FLAG_FIN)
            s = self._streams.get(sid)
            if ftype == TYPE_SYN_REPLY:
                if s is None or not s.local:
                    return None  # reply for a stream we do not know (e.g. already reset)
                if s.replied:
                    raise SpdyProtocolError(f"duplicate SYN_REPLY for stream {sid}")
                s.replied = True
                if fin:
                    s.remote_closed = True
                    self._maybe_forget(sid)
                return SynReply(sid, headers, fin)
            if s is None:
                return None
            if fin:
                s.remote_closed = True
                self._maybe_forget(sid)
            return Headers(sid, headers, fin)
        if ftype == TYPE_RST_STREAM:
            if n != 8 or flags:
                raise SpdyProtocolError("malformed RST_STREAM")
            sid, status = _U32x2.unpack(p)
            if status == 0:
                raise SpdyProtocolError("RST_STREAM with status 0")
            sid &= 0x7FFFFFFF
            self._streams.pop(sid, None)
            return RstStream(sid, status)
        if ftype == TYPE_SETTINGS:
            if n < 4:
                raise SpdyProtocolError("short SETTINGS")
            (count,) = _U32.unpack_from(p, 0)
            if n != 4 + 8 * count:
                raise SpdyProtocolError("SETTINGS length mismatch")
            entries = []
            for i in range(count):
                fid, value = _U32x2.unpack_from(p, 4 + 8 * i)
                entries.append((fid >> 24, fid & 0xFFFFFF, value))
            return Settings(tuple(entries), bool(flags & 0x01))
        if ftype == TYPE_PING:
            if n != 4 or flags:
                raise SpdyProtocolError("malformed PING")
            (pid,) = _U32.unpack(p)
            if pid == 0:
                raise SpdyProtocolError("PING with id 0")
            own_parity = 0 if self.server else 1
            if pid % 2 != own_parity:
                self._outbuf += _control_frame(TYPE_PING, 0, p)
                return Ping(pid, reply=False)
            return Ping(pid, reply=True)
        if ftype == TYPE_GOAWAY:
            if n != 8 or flags:
                raise SpdyProtocolError("malformed GOAWAY")
            last, status = _U32x2.unpack(p)
            self.goaway_received = True
            return GoAway(last & 0x7FFFFFFF, status)
        if ftype == TYPE_WINDOW_UPDATE:
            if n != 8:
                raise SpdyProtocolError("malformed WINDOW_UPDATE")
            sid, delta = _U32x2.unpack(p)
            return WindowUpdate(sid & 0x7FFFFFFF, delta & 0x7FFFFFFF)
        raise SpdyProtocolError(f"unknown control frame type {ftype}")

    def _maybe_forget(self, sid: int) -> None:
        s = self._streams.get(sid)
        if s is not None and s.local_closed and s.remote_closed:
            del self._streams[sid]

    # ----------------------------------------------------------------- sending

    def _compress(self, headers: HeaderInput) -> bytes:
        raw = encode_header_block(headers)
        return self._compressor.compress(raw) + self._compressor.flush(zlib.Z_SYNC_FLUSH)

    def _send_rst(self, sid: int, status: int) -> None:
        self._outbuf += _control_frame(TYPE_RST_STREAM, 0, _U32x2.pack(sid & MAX_STREAM_ID, status))

    def syn_stream(self, headers: HeaderInput, fin: bool = False, *, priority: int = 0) -> int:
        """Open a stream (server: even ids, client: odd ids); returns its id."""
        if self.goaway_sent or self.goaway_received:
            raise SpdyLocalError("connection is going away")
        sid = self._next_stream_id
        if sid > MAX_STREAM_ID:
            raise SpdyLocalError("stream ids exhausted")
        self._next_stream_id += 2
        block = self._compress(headers)
        payload = _U32x2.pack(sid, 0) + bytes([(priority & 7) << 5, 0]) + block
        self._outbuf += _control_frame(TYPE_SYN_STREAM, FLAG_FIN if fin else 0, payload)
        self._streams[sid] = _Stream(local=True, local_closed=fin)
        return sid

    def syn_reply(self, stream_id: int, headers: HeaderInput | None = None, fin: bool = False) -> None:
        s = self._streams.get(stream_id)
        if s is None or s.local:
            raise SpdyLocalError(f"no peer stream {stream_id} to reply to")
        if s.replied:
            raise SpdyLocalError(f"stream {stream_id} already replied")
        block = self._compress(headers or {})
        self._outbuf += _control_frame(TYPE_SYN_REPLY, FLAG_FIN if fin else 0,
                                       _U32.pack(stream_id) + block)
        s.replied = True
        if fin:
            s.local_closed = True
            self._maybe_forget(stream_id)

    def headers(self, stream_id: int, headers: HeaderInput, fin: bool = False) -> None:
        s = self._require_writable(stream_id)
        self._outbuf += _control_frame(TYPE_HEADERS, FLAG_FIN if fin else 0,
                                       _U32.pack(stream_id) + self._compress(headers))
        if fin:
            s.local_closed = True
            self._maybe_forget(stream_id)

    def _require_writable(self, stream_id: int) -> _Stream:
        s = self._streams.get(stream_id)
        if s is None or s.local_closed:
            raise SpdyLocalError(f"stream {stream_id} is not open for sending")
        if not s.local and not s.replied:
            raise SpdyLocalError(f"stream {stream_id}: SYN_REPLY must be sent before DATA")
        return s

    def data(self, stream_id: int, payload: bytes, fin: bool = False) -> None:
        """Send DATA, split into frames of at most 2^24-1 bytes; FIN goes on the last."""
        s = self._require_writable(stream_id)
        view = memoryview(payload)
        while True:
            chunk = view[:MAX_FRAME_PAYLOAD]
            view = view[MAX_FRAME_PAYLOAD:]
            last = len(view) == 0
            flags = FLAG_FIN if (fin and last) else 0
            self._outbuf += _HDR.pack(stream_id & MAX_STREAM_ID, (flags << 24) | len(chunk))
            self._outbuf += chunk
            if last:
                break
        if fin:
            s.local_closed = True
            self._maybe_forget(stream_id)

    def can_send(self, stream_id: int) -> bool:
        s = self._streams.get(stream_id)
        return s is not None and not s.local_closed and (s.local or s.replied)

    def rst(self, stream_id: int, status: int = RST_CANCEL) -> None:
        if status == 0:
            raise SpdyLocalError("RST_STREAM status must be non-zero")
        self._streams.pop(stream_id, None)
        self._send_rst(stream_id, status)

    def ping(self, ping_id: int | None = None) -> int:
        """Send a PING (own parity ids by default); returns the id used."""
        if ping_id is None:
            ping_id = self._next_ping_id
            self._next_ping_id = (self._next_ping_id + 2) & 0xFFFFFFFF or (2 if self.server else 1)
        if not 0 < ping_id <= 0xFFFFFFFF:
            raise SpdyLocalError("ping id must be a non-zero u32")
        self._outbuf += _control_frame(TYPE_PING, 0, _U32.pack(ping_id))
        return ping_id

    def goaway(self, status: int = GOAWAY_OK) -> None:
        self.goaway_sent = True
        self._outbuf += _control_frame(TYPE_GOAWAY, 0, _U32x2.pack(self._last_peer_stream_id, status))

    def settings(self, entries: Sequence[tuple[int, int, int]] = ()) -> None:
        payload = _U32.pack(len(entries)) + b"".join(
            _U32x2.pack((f << 24) | (i & 0xFFFFFF), v) for f, i, v in entries)
        self._outbuf += _control_frame(TYPE_SETTINGS, 0, payload)

    def window_update(self, stream_id: int, delta: int) -> None:
        self._outbuf += _control_frame(TYPE_WINDOW_UPDATE, 0, _U32x2.pack(stream_id, delta))


def _control_frame(ftype: int, flags: int, payload: bytes) -> bytes:
    if len(payload) > MAX_FRAME_PAYLOAD:
        raise SpdyLocalError("control frame too large")
    return _HDR.pack(0x80000000 | (VERSION << 16) | ftype, (flags << 24) | len(payload)) + payload
