"""RFC 6455 server-side framing (kplane.streams.websocket) at the byte level, and the taken-over WebSocket tunnel
(kplane.streams.session.accept_websocket_tunnel) with aiohttp's client on a real socket."""

from __future__ import annotations

import asyncio
import os
import struct
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from kplane.httpupgrade import UPGRADE_RESPONSE
from kplane.streams import channels
from kplane.streams import websocket as ws
from kplane.streams.session import accept_websocket_tunnel, spdy_portforward

from .test_streams_session import SpdySession, dialer, echo_server, forward_once, serve  # noqa: F401  (fixture)

pytestmark = pytest.mark.timeout(20)


def client_frame(opcode: int, payload: bytes, *, fin: bool = True, key: bytes = b"\x11\x22\x33\x44",
                 masked: bool = True, rsv: int = 0) -> bytes:
    n = len(payload)
    first = (0x80 if fin else 0) | rsv | opcode
    mask_bit = 0x80 if masked else 0
    if n < 126:
        head = bytes((first, mask_bit | n))
    elif n < 1 << 16:
        head = bytes((first, mask_bit | 126)) + struct.pack(">H", n)
    else:
        head = bytes((first, mask_bit | 127)) + struct.pack(">Q", n)
    if not masked:
        return head + payload
    body = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return head + key + body


def test_accept_key_rfc_example_and_bad_keys() -> None:
    assert ws.accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="  # RFC 6455 1.3
    for bad in ("", "not base64!", "dGhlIHNhbXBsZQ=="):  # the last is base64 of 10 bytes
        with pytest.raises(ValueError):
            ws.accept_key(bad)


@given(st.binary(max_size=3000), st.binary(min_size=4, max_size=4))
@settings(max_examples=200, deadline=None)
def test_unmask_is_the_rfc_xor(data: bytes, key: bytes) -> None:
    buf = bytearray(data)
    ws.unmask(key, buf)
    assert bytes(buf) == bytes(b ^ key[i % 4] for i, b in enumerate(data))


@pytest.mark.parametrize("n", [0, 1, 125, 126, 65535, 65536, 70000])
def test_encode_header_lengths_and_roundtrip(n: int) -> None:
    payload = os.urandom(n)
    frame = ws.encode_frame(ws.OP_BINARY, payload)
    assert frame[0] == 0x82
    assert len(frame) - n == (2 if n < 126 else 4 if n < 65536 else 10)
    assert frame.endswith(payload)
    # a client frame of that size decodes back to the payload
    (f,) = ws.FrameDecoder().receive_data(client_frame(ws.OP_BINARY, payload))
    assert (f.opcode, bytes(f.payload), f.fin) == (ws.OP_BINARY, payload, True)


def stream_of_frames() -> tuple[bytes, list[tuple[int, bytes, bool]]]:
    parts = [(ws.OP_BINARY, b"a" * 10, True), (ws.OP_PING, b"p", True), (ws.OP_BINARY, os.urandom(300), False),
             (ws.OP_CONTINUATION, os.urandom(70000), False), (ws.OP_PONG, b"", True),
             (ws.OP_CONTINUATION, b"end", True), (ws.OP_TEXT, "hé".encode(), True), (ws.OP_CLOSE, b"\x03\xe8", True)]
    wire = b"".join(client_frame(op, p, fin=fin, key=os.urandom(4)) for op, p, fin in parts)
    expected = []
    message = None
    for op, p, fin in parts:
        if op == ws.OP_CONTINUATION:
            assert message is not None
            op = message
        elif op in (ws.OP_BINARY, ws.OP_TEXT):
            message = op
        expected.append((op, p, fin))
        if fin and op < 8:
            message = None
    return wire, expected


@given(st.lists(st.integers(min_value=0, max_value=71000), max_size=8))
@settings(max_examples=100, deadline=None)
def test_any_split_gives_the_same_frames(cuts: list[int]) -> None:
    wire, expected = stream_of_frames()
    dec = ws.FrameDecoder()
    got = []
    prev = 0
    for c in [*sorted({min(c, len(wire)) for c in cuts}), len(wire)]:
        got += dec.receive_data(wire[prev:c])
        prev = c
    assert [(f.opcode, bytes(f.payload), f.fin) for f in got] == expected


def test_one_byte_at_a_time() -> None:
    wire, expected = stream_of_frames()
    dec = ws.FrameDecoder()
    got = []
    for i in range(len(wire)):
        got += dec.receive_data(memoryview(wire)[i:i + 1])
    assert [(f.opcode, bytes(f.payload), f.fin) for f in got] == expected


@pytest.mark.parametrize(("wire", "code"), [
    (client_frame(ws.OP_BINARY, b"x", masked=False), ws.CLOSE_PROTOCOL_ERROR),
    (client_frame(ws.OP_BINARY, b"x", rsv=0x40), ws.CLOSE_PROTOCOL_ERROR),
    (client_frame(0x3, b"x"), ws.CLOSE_PROTOCOL_ERROR),
    (client_frame(0xB, b"x"), ws.CLOSE_PROTOCOL_ERROR),
    (client_frame(ws.OP_PING, b"x" * 126), ws.CLOSE_PROTOCOL_ERROR),
    (client_frame(ws.OP_PING, b"x", fin=False), ws.CLOSE_PROTOCOL_ERROR),
    (client_frame(ws.OP_CONTINUATION, b"x"), ws.CLOSE_PROTOCOL_ERROR),
    (client_frame(ws.OP_BINARY, b"x", fin=False) + client_frame(ws.OP_BINARY, b"y"), ws.CLOSE_PROTOCOL_ERROR),
    (bytes((0x82, 0xFF)) + b"\x80" + b"\x00" * 7 + b"\x00" * 4, ws.CLOSE_PROTOCOL_ERROR),  # 64-bit length, MSB
    (bytes((0x82, 0xFF)) + struct.pack(">Q", 17 << 20), ws.CLOSE_TOO_BIG),  # over max_frame, header only
])
def test_protocol_errors_carry_the_close_code(wire: bytes, code: int) -> None:
    dec = ws.FrameDecoder()
    with pytest.raises(ws.WebSocketError) as ei:
        dec.receive_data(wire)
    assert ei.value.code == code
    with pytest.raises(ws.WebSocketError):  # and the decoder stays failed
        dec.receive_data(client_frame(ws.OP_BINARY, b"ok"))


@given(st.binary(max_size=200))
@settings(max_examples=300, deadline=None)
def test_fuzz_only_websocket_errors(data: bytes) -> None:
    dec = ws.FrameDecoder(max_frame=1 << 16)
    try:
        dec.receive_data(data)
    except ws.WebSocketError:
        pass


@pytest.mark.parametrize(("payload", "ok"), [
    (b"", (None, "")), (b"\x03\xe8", (1000, "")), (b"\x0b\xb8bye", (3000, "bye")),
    (b"\x03", None), (b"\x03\xed", None), (b"\x00\x01", None), (b"\x03\xe8\xff", None),
])
def test_parse_close(payload: bytes, ok: tuple[int | None, str] | None) -> None:
    if ok is None:
        with pytest.raises(ws.WebSocketError):
            ws.parse_close(payload)
    else:
        assert ws.parse_close(payload) == ok


# --------------------------------------------------------------------------- the taken-over tunnel


def tunnel_routes(dial: Any) -> list[web.RouteDef]:
    async def pf(request: web.Request) -> web.StreamResponse:
        try:
            reader, writer = await accept_websocket_tunnel(request, channels.SPDY_TUNNEL_PORTFORWARD)
        except ValueError as exc:
            return web.Response(status=400, text=str(exc))
        await spdy_portforward(reader, writer, dial)
        return request[UPGRADE_RESPONSE]

    return [web.get("/pf", pf)]


class _ClientTunnel:
    """A SPDY client's byte streams over aiohttp's WebSocket client (what kubectl does)."""

    def __init__(self, conn: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = conn

    async def read(self, n: int = -1) -> bytes:
        msg = await self.ws.receive()
        return bytes(msg.data) if msg.type == aiohttp.WSMsgType.BINARY else b""

    def write(self, data: bytes) -> None:
        asyncio.get_running_loop().create_task(self.ws.send_bytes(data))

    async def drain(self) -> None:
        await asyncio.sleep(0)

    def close(self) -> None:
        asyncio.get_running_loop().create_task(self.ws.close())

    async def wait_closed(self) -> None:
        return None


async def test_tunnel_forwards_and_answers_ping(echo_server: int) -> None:  # noqa: F811
    async with serve(tunnel_routes(dialer({80: echo_server}))) as addr, aiohttp.ClientSession() as http:
        conn = await http.ws_connect(f"http://{addr}/pf", protocols=[channels.SPDY_TUNNEL_PORTFORWARD],
                                     autoping=False)
        assert conn.protocol == channels.SPDY_TUNNEL_PORTFORWARD
        await conn.ping(b"hello")
        msg = await conn.receive(5)
        assert msg.type == aiohttp.WSMsgType.PONG and msg.data == b"hello"
        client = SpdySession(_ClientTunnel(conn), _ClientTunnel(conn), server=False)
        client.start()
        payload = os.urandom(2 * 1024 * 1024)
        echoed, errtext = await asyncio.wait_for(forward_once(client, 0, 80, payload), 10)
        assert echoed == payload and errtext == b""
        await conn.close()


async def test_tunnel_text_message_closes_with_1003() -> None:
    async with serve(tunnel_routes(dialer({}))) as addr, aiohttp.ClientSession() as http:
        conn = await http.ws_connect(f"http://{addr}/pf", protocols=[channels.SPDY_TUNNEL_PORTFORWARD])
        await conn.send_str("not binary")
        msg = await conn.receive(5)
        assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == ws.CLOSE_UNSUPPORTED_DATA


@pytest.mark.parametrize(("headers", "why"), [
    ({"Sec-WebSocket-Version": "12"}, "Sec-WebSocket-Version"),
    ({"Sec-WebSocket-Key": "short"}, "Sec-WebSocket-Key"),
])
async def test_tunnel_bad_handshake_is_400(headers: dict[str, str], why: str) -> None:
    base = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Protocol": channels.SPDY_TUNNEL_PORTFORWARD}
    async with serve(tunnel_routes(dialer({}))) as addr, aiohttp.ClientSession() as http, \
            http.get(f"http://{addr}/pf", headers={**base, **headers}) as resp:
        assert resp.status == 400
        assert why in await resp.text()
