"""The copy-free paths of the streaming data plane: the SPDY-in-WebSocket tunnel reader and the apiserver's
upgrade forwarding (:func:`kplane.httpupgrade.hijack_into`), on real loopback sockets."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from kplane import httpupgrade
from kplane.streams import channels
from kplane.streams.session import tunnel_spdy_over_websocket

pytestmark = pytest.mark.timeout(30)


@contextlib.asynccontextmanager
async def serve(handler: object, method: str = "GET") -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_route(method, "/x", handler)  # type: ignore[arg-type]
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
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
