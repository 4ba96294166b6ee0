"""The copy-free paths of the streaming data plane: the SPDY-in-WebSocket tunnel reader and the connection take-over
after an upgrade (:mod:`kplane.httpupgrade`: the apiserver's forwarding, the kubelet's pushed SPDY), on real loopback
sockets, plain and TLS."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from kplane import httpupgrade
from kplane.streams import channels
from kplane.streams.session import tunnel_spdy_over_websocket

from .test_streams_session import collecting_server

pytestmark = pytest.mark.timeout(30)


@contextlib.asynccontextmanager
async def serve(handler: object, method: str = "GET", ssl_context: ssl.SSLContext | None = None,
                ) -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_route(method, "/x", handler)  # type: ignore[arg-type]
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await site.start()
    try:
        yield f"127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def tunnel_reads(messages: list[bytes | str], close: bool) -> tuple[bytes, BaseException | None]:
    """What the server's tunnel reader gives for ``messages`` sent by a client (then a close, if ``close``)."""
    got = bytearray()
    result: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()

    async def handler(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(protocols=[channels.SPDY_TUNNEL_PORTFORWARD])
        await ws.prepare(request)
        reader, _writer = tunnel_spdy_over_websocket(ws)
        try:
            while data := await reader.read(65536):
                got.extend(data)
            result.set_result(None)
        except ConnectionError as exc:
            result.set_result(exc)
        return ws

    async with serve(handler) as addr, aiohttp.ClientSession() as http:
        ws = await http.ws_connect(f"http://{addr}/x", protocols=[channels.SPDY_TUNNEL_PORTFORWARD])
        for m in messages:
            await (ws.send_str(m) if isinstance(m, str) else ws.send_bytes(m))
        if close:
            await ws.close()
        err = await asyncio.wait_for(result, 10)
        await ws.close()
    return bytes(got), err


async def test_tunnel_reader_concatenates_binary_messages_and_skips_empty_ones() -> None:
    data, err = await tunnel_reads([b"ab", b"", b"c", b"", b"", b"d" * 100_000], close=True)
    assert data == b"abc" + b"d" * 100_000 and err is None


async def test_tunnel_reader_text_message_is_an_error() -> None:
    data, err = await tunnel_reads([b"ab", "text is not allowed", b"cd"], close=False)
    assert data == b"ab"
    assert isinstance(err, ConnectionError) and "invalid message type" in str(err)


async def test_hijack_into_forwards_everything_and_holds_back_a_fast_client() -> None:
    """16 MiB from a client that sends as fast as it can to a destination that reads slowly: every byte arrives
    in order, and the forwarding never holds much more than its high-water mark unsent."""
    total = 16 << 20
    received = hashlib.sha256()
    count = [0]
    sink_done = asyncio.Event()

    async def slow_sink(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while data := await r.read(65536):
            received.update(data)
            count[0] += len(data)
            await asyncio.sleep(0.001)
        sink_done.set()
        w.close()

    sink = await asyncio.start_server(slow_sink, "127.0.0.1", 0)
    sink_port = sink.sockets[0].getsockname()[1]
    peak = [0]

    async def handler(request: web.Request) -> web.StreamResponse:
        _r, dst = await asyncio.open_connection("127.0.0.1", sink_port)
        resp, done, _back = await httpupgrade.hijack_into(request, {"Connection": "Upgrade", "Upgrade": "x-test"},
                                                          dst)

        async def watch() -> None:
            while True:
                peak[0] = max(peak[0], dst.transport.get_write_buffer_size())
                await asyncio.sleep(0.0005)

        w = asyncio.create_task(watch())
        await done
        await dst.drain()
        w.cancel()
        dst.close()
        return resp

    payload = os.urandom(1 << 20)
    sent = hashlib.sha256()
    async with serve(handler) as addr:
        host, port = addr.split(":")
        r, w = await asyncio.open_connection(host, int(port))
        w.write(b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: x-test\r\n\r\n")
        head = await r.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101")
        for _ in range(total // len(payload)):
            w.write(payload)
            sent.update(payload)
            await w.drain()
        w.write_eof()
        await asyncio.wait_for(sink_done.wait(), 20)
        w.close()
    sink.close()
    assert count[0] == total and received.digest() == sent.digest()
    assert peak[0] <= httpupgrade.FORWARD_HIGH_WATER + (1 << 20), peak[0]


def tls_contexts(d: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", str(d / "k.pem"), "-out", str(d / "c.pem"), "-subj", "/CN=localhost", "-days", "1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(d / "c.pem", d / "k.pem")
    client = ssl.create_default_context(cafile=str(d / "c.pem"))
    return server, client


async def test_take_over_over_tls_keeps_bytes_sent_with_the_request_first_and_ends_on_disconnect(
        tmp_path: Path) -> None:
    """Over TLS: bytes the client sent in the same write as a WebSocket upgrade request (the one upgrade after which
    aiohttp keeps such bytes: for any other it would parse them as the next request) reach the destination first,
    then 4 MiB in order; when the client goes away without a close_notify, the forwarding ends and the handler
    returns (no hang)."""
    server_ctx, client_ctx = tls_contexts(tmp_path)
    handler_done = asyncio.Event()
    sink_port = 0

    async def handler(request: web.Request) -> web.StreamResponse:
        _r, dst = await asyncio.open_connection("127.0.0.1", sink_port)
        resp, done, _back = await httpupgrade.hijack_into(request, {"Connection": "Upgrade",
                                                                    "Upgrade": "websocket"}, dst)
        await done
        dst.close()
        handler_done.set()
        return resp

    first = b"sent-with-the-request:" + os.urandom(1000)
    rest = os.urandom(4 << 20)
    async with collecting_server() as sink, serve(handler, ssl_context=server_ctx) as addr:
        sink_port = sink.port
        got = sink.data
        host, port = addr.split(":")
        r, w = await asyncio.open_connection(host, int(port), ssl=client_ctx, server_hostname="127.0.0.1")
        w.write(b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n" + first)
        head = await r.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101")
        w.write(rest)
        await w.drain()
        for _ in range(1000):
            if len(got) >= len(first) + len(rest):
                break
            await asyncio.sleep(0.01)
        w.transport.abort()  # gone, no close_notify
        await asyncio.wait_for(sink.eof.wait(), 10)
        await asyncio.wait_for(handler_done.wait(), 10)
    assert bytes(got) == first + rest
