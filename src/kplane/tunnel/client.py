"""The apiserver side: open a TCP connection to a node through the Konnectivity server's Unix socket.

Both helpers return a *connected, non-blocking socket* whose next byte is the first byte from the target, ready
for ``asyncio.open_connection(sock=s, ssl=ctx, server_hostname=...)``:

- :func:`dial_http_connect`: ``CONNECT host:port HTTP/1.1`` on a fresh socket; the response head is read exactly
  (never a byte past it), a non-200 answer raises :class:`TunnelDialError` carrying the status.
- :func:`dial_grpc`: a single-use ``/ProxyService/Proxy`` stream (what upstream's konnectivity-client does for
  kube-apiserver); the bytes are carried by a socket pair whose other end is pumped to and from the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
from typing import Any

import grpc

from kplane.netutil import wait_readable as _wait_readable
from kplane.tunnel import konnectivity_pb2_grpc as pb_grpc
from kplane.tunnel import packets as P
from kplane.tunnel.httpconnect import connect_request, parse_response, status_for_dial_error
from kplane.tunnel.packets import PacketType

CLOSE_TIMEOUT = 10.0
CHUNK = 64 << 10  # what dial_grpc's pump reads from its socket pair per DATA packet

_TASKS: set[asyncio.Task[None]] = set()


class TunnelDialError(OSError):
    """The tunnel could not be opened; ``status`` is the HTTP status (502 when not from HTTP)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def __str__(self) -> str:
        return f"konnectivity dial failed ({self.status}): {self.message}"




async def dial_http_connect(uds_path: str | os.PathLike[str], host: str, port: int, *,
                            dial_timeout: float = 30.0) -> socket.socket:
    """``CONNECT host:port`` through the server's HTTP-CONNECT socket; returns the tunnelled socket."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        async with asyncio.timeout(dial_timeout):
            await loop.sock_connect(sock, os.fspath(uds_path))
            await loop.sock_sendall(sock, connect_request(host, port))
            while True:
                await _wait_readable(sock)
                try:
                    peek = sock.recv(16384, socket.MSG_PEEK)
                except BlockingIOError:
                    continue
                if not peek:
                    raise TunnelDialError(502, "the konnectivity server closed the connection")
                try:
                    rsp = parse_response(peek)
                except ValueError as e:
                    raise TunnelDialError(502, f"bad answer from the konnectivity server: {e}") from None
                if rsp is not None:
                    break
                if len(peek) >= 16384:
                    raise TunnelDialError(502, "oversized answer from the konnectivity server")
            if rsp.status != 200:
                body = peek[rsp.head_length:].decode("utf-8", "replace").strip()
                raise TunnelDialError(rsp.status, body or rsp.reason)
            sock.recv(rsp.head_length)  # consume exactly the head
    except TimeoutError:
        sock.close()
        raise TunnelDialError(504, f"timed out connecting to {host}:{port} through konnectivity") from None
    except BaseException:
        sock.close()
        raise
    return sock


async def dial_grpc(uds_path: str | os.PathLike[str], host: str, port: int, *,
                    dial_timeout: float = 30.0) -> socket.socket:
    """Dial through the server's gRPC socket (a single-use Proxy stream); returns the tunnelled socket."""
    channel = grpc.aio.insecure_channel(f"unix:{os.fspath(uds_path)}", options=[
        ("grpc.max_receive_message_length", 4 << 20 | 1024),
        ("grpc.enable_retries", 0),
        ("grpc.use_local_subchannel_pool", 1),
    ])
    call: Any = None
    rnd = random.getrandbits(62) + 1
    try:
        call = pb_grpc.ProxyServiceStub(channel).Proxy()
        try:
            async with asyncio.timeout(dial_timeout):
                await call.write(P.dial_request(P.join_host_port(host, port), rnd))
                while True:
                    pkt = await call.read()
                    if pkt is grpc.aio.EOF:
                        raise TunnelDialError(502, "the konnectivity server ended the stream")
                    if pkt.type == PacketType.DIAL_RSP and pkt.dialResponse.random == rnd:
                        break
        except TimeoutError:
            with contextlib.suppress(Exception):
                await call.write(P.close_dial(rnd))
            raise TunnelDialError(504, f"timed out connecting to {host}:{port} through konnectivity") from None
        except grpc.aio.AioRpcError as e:
            raise TunnelDialError(502, f"{e.code().name}: {e.details()}") from None
        rsp = pkt.dialResponse
        if rsp.error:
            raise TunnelDialError(status_for_dial_error(rsp.error), rsp.error)
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        theirs.setblocking(False)
        task = asyncio.create_task(_pump(channel, call, rsp.connectID, ours))
        _TASKS.add(task)
        task.add_done_callback(_TASKS.discard)
        return theirs
    except BaseException:
        if call is not None:
            call.cancel()
        await channel.close(grace=None)
        raise


async def _pump(channel: grpc.aio.Channel, call: Any, cid: int, sock: socket.socket) -> None:
    reader, writer = await asyncio.open_connection(sock=sock, limit=CHUNK)
    closed_by_peer = asyncio.Event()

    async def down() -> None:
        try:
            while True:
                pkt = await call.read()
                if pkt is grpc.aio.EOF:
                    return
                if pkt.type == PacketType.DATA and pkt.data.connectID == cid:
                    writer.write(pkt.data.data)
                    await writer.drain()
                elif pkt.type == PacketType.CLOSE_RSP and pkt.closeResponse.connectID == cid:
                    return
        finally:
            closed_by_peer.set()

    async def up() -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while True:
                chunk = await reader.read(CHUNK)
                if not chunk:
                    break
                await call.write(P.data(cid, chunk))
        await call.write(P.close_request(cid))
        # wait (bounded) for the CLOSE_RSP before tearing the stream down
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await closed_by_peer.wait()

    down_t = asyncio.create_task(down())
    up_t = asyncio.create_task(up())
    try:
        await asyncio.wait({down_t, up_t}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        pass
    finally:
        for t in (down_t, up_t):
            t.cancel()
        writer.close()  # the synchronous teardown first: a second cancel may land in an await below
        call.cancel()
        await asyncio.gather(down_t, up_t, return_exceptions=True)
        await channel.close(grace=None)
