"""The HTTP/1.1 client pieces the apiserver uses toward the backends it forwards to (kubelets, pods, services,
nodes): reading a response head, copying a response body, and splicing an upgraded connection to the client.

One implementation for every forwarding path, so the checks (head size, status line, header syntax) and the
upgrade rules (pipe only after a 101, the backend's end ends the splice) are the same everywhere."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping

from aiohttp import web

from kplane.errors import StatusError
from kplane.httpupgrade import hijack_into, pipe

MAX_HEAD = 64 * 1024


async def read_response_head(reader: asyncio.StreamReader, what: str, *, timeout_s: float = 30.0,
                             ) -> tuple[int, list[tuple[str, str]]]:
    """(status, headers in order) of the response ``what`` (e.g. 'the kubelet of node "n"') sent; a 502 Status
    for anything that is not a well-formed HTTP/1.x head within ``timeout_s`` and :data:`MAX_HEAD` bytes."""
    try:
        raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout_s)
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, OSError) as exc:
        raise StatusError(502, f"{what} sent no valid HTTP response", reason="BadGateway") from exc
    if len(raw) > MAX_HEAD:
        raise StatusError(502, f"{what} sent a response head larger than {MAX_HEAD} bytes", reason="BadGateway")
    line, *lines = raw.decode("latin-1").split("\r\n")
    bits = line.split(" ", 2)
    if len(bits) < 2 or not bits[0].startswith("HTTP/1.") or not bits[1].isdigit() or len(bits[1]) != 3:
        raise StatusError(502, f"{what} sent a bad status line: {line[:80]!r}", reason="BadGateway")
    headers = []
    for h in lines:
        if not h:
            continue
        k, sep, v = h.partition(":")
        if not sep or not k or k != k.strip():
            raise StatusError(502, f"{what} sent a malformed header line", reason="BadGateway")
        headers.append((k, v.strip()))
    return int(bits[1]), headers


async def copy_body(reader: asyncio.StreamReader, resp: web.StreamResponse, *, chunked: bool, length: int | None,
                    idle_timeout_s: float | None = None) -> None:
    """Copy a response body to ``resp``: de-chunked, exactly ``length`` bytes, or until EOF. ``idle_timeout_s``
    bounds the wait for each chunk header (None: no bound, as ``logs -f`` needs)."""
    if chunked:
        while True:
            size_line = await asyncio.wait_for(reader.readline(), idle_timeout_s)
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                return
            while size:
                data = await reader.read(min(size, 65536))
                if not data:
                    raise asyncio.IncompleteReadError(b"", size)
                size -= len(data)
                await resp.write(data)
            await reader.readexactly(2)
    remaining = length
    while remaining is None or remaining > 0:
        data = await reader.read(65536 if remaining is None else min(remaining, 65536))
        if not data:
            return
        if remaining is not None:
            remaining -= len(data)
        await resp.write(data)


async def splice(req: web.Request, headers: Mapping[str, str], reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> web.StreamResponse:
    """After the backend's 101: answer the client's upgrade with ``headers`` and pipe both ways until the backend
    closes (or the client closes and the backend has finished sending, within 30 s)."""
    resp, up, client_writer = await hijack_into(req, headers, writer)  # client -> backend as it arrives
    down = asyncio.create_task(pipe(reader, client_writer))
    try:
        done, _ = await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
        if down in done:
            up.cancel()  # the backend closed: nothing more can come back; stop reading from the client
        else:
            # the client closed its side (EOF was passed on): let the backend finish what it is sending
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(down), 30)
    finally:
        for t in (up, down):
            t.cancel()
        writer.close()
        client_writer.close()
    return resp
