"""Loopback tests of the asyncio stream sessions (kplane.streams.session).

The server side runs in a local aiohttp app exactly as the kubelet would use it; the
client side is our own sans-I/O SpdyConnection(server=False) (through SpdySession) or
aiohttp's WebSocket client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict

from kplane.streams import channels
from kplane.streams.session import (
    SpdySession,
    SpdyStream,
    accept_spdy_upgrade,
    negotiate_spdy,
    spdy_portforward,
    spdy_remotecommand,
    tunnel_spdy_over_websocket,
    websocket_portforward,
    websocket_remotecommand,
)

pytestmark = pytest.mark.timeout(10)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
async def echo_server() -> AsyncIterator[int]:
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
        finally:
            w.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    yield port
    srv.close()
    await srv.wait_closed()


class Collected:
    """What :func:`collecting_server` received: every byte of every connection, in order, and its EOF."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.eof = asyncio.Event()
        self.port = 0


@contextlib.asynccontextmanager
async def collecting_server() -> AsyncIterator[Collected]:
    """A TCP server on 127.0.0.1 that keeps everything it is sent (a pod or backend that only reads)."""
    got = Collected()

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while data := await r.read(65536):
            got.data.extend(data)
        got.eof.set()
        w.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    got.port = srv.sockets[0].getsockname()[1]
    try:
        yield got
    finally:
        srv.close()
        await srv.wait_closed()


async def run_app(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"127.0.0.1:{port}"


@contextlib.asynccontextmanager
async def serve(routes: list[web.RouteDef]) -> AsyncIterator[str]:
    app = web.Application()
    app.add_routes(routes)
    runner, addr = await run_app(app)
    try:
        yield addr
    finally:
        await runner.cleanup()


async def spdy_client(addr: str, path: str, protocols: list[str]) -> tuple[SpdySession, dict[str, str]]:
    """Raw HTTP/1.1 SPDY upgrade, then a client-side SpdySession on the socket."""
    host, port = addr.split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    req = (f"POST {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n"
           + "".join(f"X-Stream-Protocol-Version: {p}\r\n" for p in protocols)
           + "Content-Length: 0\r\n\r\n")
    writer.write(req.encode())
    head = (await reader.readuntil(b"\r\n\r\n")).decode()
    status_line, *lines = head.strip().split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines)}
    assert status_line.startswith("HTTP/1.1 101"), head
    sess = SpdySession(reader, writer, server=False)
    sess.start()
    return sess, headers


async def read_all(st: SpdyStream) -> bytes:
    return await st.reader.read()


# --------------------------------------------------------------------------- handshake


def test_negotiate_spdy() -> None:
    base = {"Connection": "Upgrade", "Upgrade": "SPDY/3.1"}
    h = CIMultiDict(base)
    for p in ("v5.channel.k8s.io", "v4.channel.k8s.io", "channel.k8s.io"):
        h.add("X-Stream-Protocol-Version", p)
    assert negotiate_spdy(h) == ("v4.channel.k8s.io", None)
    # comma-separated form
    h = CIMultiDict(base, **{"X-Stream-Protocol-Version": "v9.x, v2.channel.k8s.io"})
    assert negotiate_spdy(h)[0] == "v2.channel.k8s.io"
    proto, resp = negotiate_spdy(CIMultiDict(base))
    assert proto is None and resp is not None and resp.status == 400
    proto, resp = negotiate_spdy(CIMultiDict(base, **{"X-Stream-Protocol-Version": "v9"}))
    assert resp is not None and resp.status == 403
    assert resp.headers.getall("X-Accepted-Stream-Protocol-Versions") == list(
        channels.REMOTECOMMAND_SPDY_PROTOCOLS)
    proto, resp = negotiate_spdy(CIMultiDict({"X-Stream-Protocol-Version": "v4.channel.k8s.io"}))
    assert resp is not None and resp.status == 400
    h = CIMultiDict(base, **{"X-Stream-Protocol-Version": "portforward.k8s.io"})
    assert negotiate_spdy(h, channels.PORTFORWARD_SPDY_PROTOCOLS)[0] == "portforward.k8s.io"


# --------------------------------------------------------------------------- exec


async def fake_exec(sess: Any) -> None:
    """Echo stdin to stdout, say something on stderr, exit 3."""
    assert sess.stdin is not None
    while data := await sess.stdin.read(65536):
        await sess.write_stdout(data)
    await sess.write_stderr(b"bye\n")
    await sess.finish(3, None)


def exec_routes(done: list[Any]) -> list[web.RouteDef]:
    async def spdy_exec(request: web.Request) -> web.StreamResponse:
        proto, err = negotiate_spdy(request.headers)
        if err is not None:
            return err
        assert proto is not None
        reader, writer = await accept_spdy_upgrade(request, proto)
        expect = {k for k in ("stdin", "stdout", "stderr", "tty") if request.query.get(k) == "1"}
        sess = await spdy_remotecommand(reader, writer, proto, expect=expect, linger=5)
        await fake_exec(sess)
        done.append(sess)
        return web.Response()

    async def ws_exec(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(protocols=channels.REMOTECOMMAND_WS_PROTOCOLS)
        await ws.prepare(request)
        expect = {k for k in ("stdin", "stdout", "stderr", "tty") if request.query.get(k) == "1"}
        sess = await websocket_remotecommand(ws, expect=expect)
        if "tty" in expect:
            assert sess.resize is not None
            size = await sess.resize.get()
            await sess.write_stdout(json.dumps(size).encode())
        await fake_exec(sess)
        done.append(sess)
        return ws

    return [web.post("/exec", spdy_exec), web.get("/ws", ws_exec)]


async def test_spdy_exec_echo_exit_code() -> None:
    done: list[Any] = []
    async with serve(exec_routes(done)) as addr:
        client, headers = await spdy_client(addr, "/exec?stdin=1&stdout=1&stderr=1", [
            "v5.channel.k8s.io", "v4.channel.k8s.io", "v3.channel.k8s.io", "v2.channel.k8s.io",
            "channel.k8s.io"])
        assert headers["x-stream-protocol-version"] == "v4.channel.k8s.io"
        err = await client.open_stream({"streamType": "error"})
        stdin = await client.open_stream({"streamType": "stdin"})
        stdout = await client.open_stream({"streamType": "stdout"})
        stderr = await client.open_stream({"streamType": "stderr"})
        assert (err.id, stdin.id, stdout.id, stderr.id) == (1, 3, 5, 7)
        client.conn.ping()
        payload = os.urandom(200_000)
        stdin.write(payload)
        stdin.write_eof()
        await stdin.drain()
        out, errout, status = await asyncio.gather(read_all(stdout), read_all(stderr), read_all(err))
        assert out == payload
        assert errout == b"bye\n"
        st = json.loads(status)
        assert st["status"] == "Failure" and st["reason"] == "NonZeroExitCode"
        assert st["details"]["causes"][0] == {"reason": "ExitCode", "message": "3"}
        await client.close()  # like kubectl: GOAWAY and hang up; the server's finish() returns
        for _ in range(100):
            if done:
                break
            await asyncio.sleep(0.05)
        assert done


async def test_spdy_exec_rejects_unknown_protocol() -> None:
    async with serve(exec_routes([])) as addr, aiohttp.ClientSession() as http:
        r = await http.post(f"http://{addr}/exec", headers={
            "Connection": "Upgrade", "Upgrade": "SPDY/3.1", "X-Stream-Protocol-Version": "v9"})
        assert r.status == 403
        assert "v4.channel.k8s.io" in r.headers.getall("X-Accepted-Stream-Protocol-Versions")


async def test_spdy_exec_stream_creation_timeout() -> None:
    result: list[BaseException] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        reader, writer = await accept_spdy_upgrade(request, "v4.channel.k8s.io")
        try:
            await spdy_remotecommand(reader, writer, "v4.channel.k8s.io", expect={"stdout"},
                                     creation_timeout=0.3)
        except (TimeoutError, ConnectionError) as e:
            result.append(e)
        return web.Response()

    async with serve([web.post("/exec", handler)]) as addr:
        client, _ = await spdy_client(addr, "/exec", ["v4.channel.k8s.io"])
        await client.open_stream({"streamType": "error"})  # never creates stdout
        await asyncio.wait_for(client.closed.wait(), 5)
        for _ in range(100):
            if result:
                break
            await asyncio.sleep(0.02)
        assert result and isinstance(result[0], TimeoutError)


@pytest.mark.parametrize("proto", ["v5.channel.k8s.io", "v4.channel.k8s.io", "v4.base64.channel.k8s.io",
                                   "channel.k8s.io"])
async def test_websocket_exec(proto: str) -> None:
    done: list[Any] = []
    b64 = "base64" in proto
    async with serve(exec_routes(done)) as addr, aiohttp.ClientSession() as http:
        ws = await http.ws_connect(f"http://{addr}/ws?stdin=1&stdout=1&stderr=1", protocols=[proto])
        assert ws.protocol == proto
        first = await ws.receive()
        assert channels.decode(first.data, base64=b64) == (1, b"")  # connection-established notice

        async def send(ch: int, data: bytes) -> None:
            msg = channels.encode(ch, data, base64=b64)
            await (ws.send_str(msg) if isinstance(msg, str) else ws.send_bytes(msg))

        await send(0, b"")  # empty payloads are fine
        await send(0, b"hello ")
        await send(0, b"world")
        if proto == "v5.channel.k8s.io":
            await ws.send_bytes(channels.close_message(0))
        else:
            # no close signal before v5: the server's stdin ends when the socket closes,
            # so just collect stdout and hang up
            pass
        got: dict[int, bytes] = {}
        while True:
            msg = await ws.receive()
            if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
                break
            assert msg.type == (aiohttp.WSMsgType.TEXT if b64 else aiohttp.WSMsgType.BINARY)
            ch, data = channels.decode(msg.data, base64=b64)
            got[ch] = got.get(ch, b"") + data
            if proto != "v5.channel.k8s.io" and got.get(1) == b"hello world":
                await ws.close()
                break
        assert got[1] == b"hello world"
        if proto == "v5.channel.k8s.io":
            assert ws.close_code == 1000
            assert got[2] == b"bye\n"
            st = json.loads(got[3])
            assert st["details"]["causes"][0]["message"] == "3"
        await ws.close()


async def test_websocket_exec_tty_resize() -> None:
    async with serve(exec_routes([])) as addr, aiohttp.ClientSession() as http:
        ws = await http.ws_connect(f"http://{addr}/ws?stdin=1&stdout=1&tty=1",
                                   protocols=["v5.channel.k8s.io"])
        await ws.receive()
        await ws.send_bytes(b"\x04" + b'{"Width":100,"Height":30}\n')
        msg = await ws.receive()
        assert msg.data == b"\x01[100, 30]"
        await ws.send_bytes(b"\xff\x00")
        rest = []
        async for m in ws:
            rest.append(m.data)
        status = [d for d in rest if d[:1] == b"\x03"]
        assert json.loads(status[0][1:])["reason"] == "NonZeroExitCode"


# --------------------------------------------------------------------------- port-forward


def dialer(port_map: dict[int, int]) -> Callable[[int], Awaitable[tuple[asyncio.StreamReader,
                                                                          asyncio.StreamWriter]]]:
    async def dial(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if port not in port_map:
            raise ConnectionRefusedError(f"nothing listens on {port}")
        return await asyncio.open_connection("127.0.0.1", port_map[port])
    return dial


def pf_routes(dial: Any) -> list[web.RouteDef]:
    async def spdy_pf(request: web.Request) -> web.StreamResponse:
        proto, err = negotiate_spdy(request.headers, channels.PORTFORWARD_SPDY_PROTOCOLS)
        if err is not None:
            return err
        assert proto is not None
        reader, writer = await accept_spdy_upgrade(request, proto)
        await spdy_portforward(reader, writer, dial)
        return web.Response()

    async def ws_pf(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(protocols=[channels.SPDY_TUNNEL_PORTFORWARD,
                                              *channels.PORTFORWARD_WS_PROTOCOLS])
        await ws.prepare(request)
        if ws.ws_protocol == channels.SPDY_TUNNEL_PORTFORWARD:
            reader, writer = tunnel_spdy_over_websocket(ws)
            await spdy_portforward(reader, writer, dial)
        else:
            ports = [int(p) for v in request.query.getall("port", []) for p in v.split(",")]
            await websocket_portforward(ws, ports, dial)
        return ws

    return [web.post("/pf", spdy_pf), web.get("/pf", ws_pf)]


async def forward_once(client: SpdySession, request_id: int, port: int, payload: bytes) -> tuple[bytes, bytes]:
    """What kubectl does for one local connection."""
    hdr = {"port": str(port), "requestID": str(request_id)}
    err = await client.open_stream({"streamType": "error", **hdr})
    err.write_eof()
    data = await client.open_stream({"streamType": "data", **hdr})

    async def send() -> None:
        view = memoryview(payload)
        for i in range(0, len(payload), 32 * 1024):
            data.write(bytes(view[i:i + 32 * 1024]))
            await data.drain()
        data.write_eof()

    sender = asyncio.create_task(send())
    echoed = await data.reader.read()
    await sender
    errtext = await err.reader.read()
    data.reset()
    return echoed, errtext


async def test_spdy_portforward_parallel_and_5mb(echo_server: int) -> None:
    async with serve(pf_routes(dialer({80: echo_server}))) as addr:
        client, headers = await spdy_client(addr, "/pf", ["portforward.k8s.io"])
        assert headers["x-stream-protocol-version"] == "portforward.k8s.io"
        payloads = [os.urandom(1000 + i * 37) for i in range(30)] + [os.urandom(5 * 1024 * 1024)]
        results = await asyncio.gather(*(forward_once(client, i, 80, p) for i, p in enumerate(payloads)))
        for (echoed, errtext), p in zip(results, payloads, strict=True):
            assert errtext == b""
            assert echoed == p
        await client.close()


async def test_spdy_portforward_dial_error_and_bad_streams(echo_server: int) -> None:
    async with serve(pf_routes(dialer({80: echo_server}))) as addr:
        client, _ = await spdy_client(addr, "/pf", ["portforward.k8s.io"])
        echoed, errtext = await forward_once(client, 0, 81, b"x")
        assert echoed == b"" and b"error forwarding port 81" in errtext
        # missing port header -> reset, never replied
        with pytest.raises(ConnectionResetError):
            await client.open_stream({"streamType": "data"})
        # the connection still works afterwards
        echoed, errtext = await forward_once(client, 1, 80, b"still fine")
        assert echoed == b"still fine" and errtext == b""
        await client.close()


async def test_spdy_portforward_stalled_stream_does_not_block_others(echo_server: int) -> None:
    blocked = asyncio.Event()

    class Handler:
        async def handle(self, port: int, reader: asyncio.StreamReader, writer: Any,
                         send_error: Any) -> None:
            if port == 1:  # never reads: a stalled consumer
                await blocked.wait()
                return
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.write_eof()

    async def spdy_pf(request: web.Request) -> web.StreamResponse:
        reader, writer = await accept_spdy_upgrade(request, "portforward.k8s.io")
        await spdy_portforward(reader, writer, handler=Handler(), stream_limit=64 * 1024, stall_timeout=0.5)
        return web.Response()

    async with serve([web.post("/pf", spdy_pf)]) as addr:
        client, _ = await spdy_client(addr, "/pf", ["portforward.k8s.io"])
        hdr = {"port": "1", "requestID": "0"}
        err = await client.open_stream({"streamType": "error", **hdr})
        stalled = await client.open_stream({"streamType": "data", **hdr})
        for _ in range(40):  # 1.25 MB the handler never reads
            stalled.write(b"z" * 32768)
        await stalled.drain()
        echoed, _errtext = await forward_once(client, 1, 2, b"ok" * 50000)
        assert echoed == b"ok" * 50000
        # the stalled stream was reset by the server
        await asyncio.wait_for(stalled.reader.read(), 5)
        assert stalled.reset_by_peer
        blocked.set()
        del err
        await client.close()


@pytest.mark.parametrize("all_before_dial", [False, True])
async def test_spdy_portforward_data_before_dial_keeps_order_and_fin(all_before_dial: bool) -> None:
    """The pod's end is dialled after the client already sent data (or all of it and its FIN): what waited in the
    stream's reader goes first, then the frames written straight to the pod (pipe_to), in order; the client's FIN
    becomes the pod's EOF."""
    may_dial = asyncio.Event()
    payload = os.urandom(200 * 1024 + 123 if all_before_dial else 3 * 1024 * 1024 + 123)
    async with collecting_server() as pod:
        async def slow_dial(_: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            await may_dial.wait()
            return await asyncio.open_connection("127.0.0.1", pod.port)

        async with serve(pf_routes(slow_dial)) as addr:
            client, _ = await spdy_client(addr, "/pf", ["portforward.k8s.io"])
            hdr = {"port": "80", "requestID": "0"}
            await client.open_stream({"streamType": "error", **hdr})
            data = await client.open_stream({"streamType": "data", **hdr})
            view = memoryview(payload)
            for i in range(0, 256 * 1024, 32 * 1024):  # before the dial
                data.write(bytes(view[i:i + 32 * 1024]))
            if all_before_dial:
                data.write_eof()
            await data.drain()
            await asyncio.sleep(0.2)
            may_dial.set()
            for i in range(256 * 1024, len(payload), 32 * 1024):
                data.write(bytes(view[i:i + 32 * 1024]))
                await data.drain()
            data.write_eof()
            await asyncio.wait_for(pod.eof.wait(), 5)
            assert bytes(pod.data) == payload
            await client.close()


async def test_spdy_portforward_pod_not_reading_is_reset_not_buffered(echo_server: int) -> None:
    """A pod that stops reading: at most ~1 MiB waits in the kubelet for it, then the connection stops being read
    and after the stall timeout only that stream is reset; another forward on the same connection still works."""
    conns: list[asyncio.StreamWriter] = []

    async def deaf(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        conns.append(w)  # never reads
        await asyncio.sleep(30)

    srv = await asyncio.start_server(deaf, "127.0.0.1", 0)
    deaf_port = srv.sockets[0].getsockname()[1]

    async def spdy_pf(request: web.Request) -> web.StreamResponse:
        reader, writer = await accept_spdy_upgrade(request, "portforward.k8s.io")
        await spdy_portforward(reader, writer, dialer({1: deaf_port, 2: echo_server}), stall_timeout=0.5)
        return web.Response()

    try:
        async with serve([web.post("/pf", spdy_pf)]) as addr:
            client, _ = await spdy_client(addr, "/pf", ["portforward.k8s.io"])
            hdr = {"port": "1", "requestID": "0"}
            await client.open_stream({"streamType": "error", **hdr})
            stalled = await client.open_stream({"streamType": "data", **hdr})
            chunk = b"z" * 32768
            with contextlib.suppress(ConnectionResetError):
                for _ in range(2000):  # 64 MB: far more than the socket buffers and the 1 MiB high-water mark
                    if stalled.reset_by_peer:
                        break
                    stalled.write(chunk)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(client.drain(), 2)
            await asyncio.wait_for(stalled.reader.read(), 5)
            assert stalled.reset_by_peer
            echoed, errtext = await forward_once(client, 1, 2, b"ok" * 50000)
            assert echoed == b"ok" * 50000 and errtext == b""
            await client.close()
    finally:
        for w in conns:
            w.close()
        srv.close()
        await srv.wait_closed()


async def test_websocket_portforward_v4(echo_server: int) -> None:
    async with serve(pf_routes(dialer({80: echo_server, 8080: echo_server}))) as addr, \
            aiohttp.ClientSession() as http:
        ws = await http.ws_connect(f"http://{addr}/pf?port=80,8080",
                                   protocols=["v5.channel.k8s.io", "v4.channel.k8s.io"])
        assert ws.protocol == "v4.channel.k8s.io"
        prefixes = [(await ws.receive()).data for _ in range(4)]
        assert prefixes == [b"\x00\x50\x00", b"\x01\x50\x00", b"\x02\x90\x1f", b"\x03\x90\x1f"]
        big = os.urandom(1024 * 1024)
        await ws.send_bytes(b"\x00" + big)
        await ws.send_bytes(b"\x02" + b"second port")
        got: dict[int, bytes] = {0: b"", 2: b""}
        while len(got[0]) < len(big) or got[2] != b"second port":
            msg = await ws.receive()
            assert msg.type == aiohttp.WSMsgType.BINARY
            got[msg.data[0]] += msg.data[1:]
        assert got[0] == big
        await ws.close()


async def test_websocket_portforward_dial_error() -> None:
    async with serve(pf_routes(dialer({}))) as addr, aiohttp.ClientSession() as http:
        ws = await http.ws_connect(f"http://{addr}/pf?port=81", protocols=["v4.channel.k8s.io"])
        msgs = []
        async for m in ws:
            msgs.append(m.data)
        assert msgs[:2] == [b"\x00\x51\x00", b"\x01\x51\x00"]
        assert msgs[2][:1] == b"\x01" and b"error forwarding port 81" in msgs[2]
        assert ws.close_code == 1000


class GoLikeTunnelWriter:
    """Client-side tunnel writer mimicking Go: tiny messages and empty ones."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.buf = bytearray()

    def write(self, data: bytes) -> None:
        self.buf += data

    async def drain(self) -> None:
        while self.buf:
            n = 2 if len(self.buf) > 4 and self.buf[0] & 0x80 else 65536
            chunk = bytes(self.buf[:n])
            del self.buf[:n]
            await self.ws.send_bytes(chunk)
            await self.ws.send_bytes(b"")

    def close(self) -> None:
        asyncio.ensure_future(self.ws.close())

    async def wait_closed(self) -> None:
        return None


async def test_spdy_tunnelled_in_websocket(echo_server: int) -> None:
    async with serve(pf_routes(dialer({80: echo_server}))) as addr, aiohttp.ClientSession() as http:
        ws = await http.ws_connect(f"http://{addr}/pf", protocols=[channels.SPDY_TUNNEL_PORTFORWARD])
        assert ws.protocol == channels.SPDY_TUNNEL_PORTFORWARD
        reader, _ = tunnel_spdy_over_websocket(ws)  # type: ignore[arg-type]
        writer = GoLikeTunnelWriter(ws)
        client = SpdySession(reader, writer, server=False)
        client.start()

        async def flusher() -> None:  # SpdySession only drains on data writes
            while True:
                await writer.drain()
                await asyncio.sleep(0.01)

        f = asyncio.create_task(flusher())
        payloads = [os.urandom(70_000) for _ in range(8)]
        results = await asyncio.gather(*(forward_once(client, i, 80, p) for i, p in enumerate(payloads)))
        assert [r[0] for r in results] == payloads
        assert all(r[1] == b"" for r in results)
        f.cancel()
        await client.close()
