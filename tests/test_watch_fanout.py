"""Many watchers of the same objects: each gets every event once, in order, in its own format, whether the event
was written to it straight from the store's fan-out of a write or waited in the store's queue for a slow client.

The apiserver encodes a JSON watch event once per revision and hands the same bytes to every JSON watcher; these
tests pin down that selectors, Table output and bookmarks are still per watcher, and that a watch ends on time.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import ssl
from typing import Any

import aiohttp
import pytest

from kplane.apiserver.server import _chunk, _unchunk
from tests.cluster import Cluster

TABLE = "application/json;as=Table;g=meta.k8s.io;v=v1, application/json"


def _ctx(cluster: Cluster) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(cluster.pki / "ca.crt"))
    ctx.check_hostname = False
    ctx.load_cert_chain(str(cluster.pki / "admin.crt"), str(cluster.pki / "admin.key"))
    return ctx


async def _watch(s: aiohttp.ClientSession, url: str, accept: str = "application/json") -> list[bytes]:
    lines = []
    async with s.get(url, headers={"Accept": accept}) as r:
        assert r.status == 200, await r.text()
        async for line in r.content:
            if line.strip():
                lines.append(line)
    return lines


async def test_many_watchers_same_events_own_format(cluster: Cluster, ns: str) -> None:
    base = f"{cluster.url}/api/v1/namespaces/{ns}/configmaps"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=_ctx(cluster))) as s:
        async with s.get(base) as r:
            rv = (await r.json())["metadata"]["resourceVersion"]
        q = f"?watch=1&resourceVersion={rv}&timeoutSeconds=3"
        plain = [asyncio.create_task(_watch(s, base + q)) for _ in range(5)]
        labelled = asyncio.create_task(_watch(s, base + q + "&labelSelector=pick%3Dyes"))
        table = asyncio.create_task(_watch(s, base + q, TABLE))
        bookmarks = asyncio.create_task(_watch(s, base + q + "&allowWatchBookmarks=true"))
        await asyncio.sleep(0.5)
        for i in range(4):
            labels = {"pick": "yes"} if i % 2 else {}
            body = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"f{i}", "labels": labels},
                    "data": {"i": str(i)}}
            async with s.post(base, json=body) as r:
                assert r.status == 201
        async with s.patch(f"{base}/f1", data=json.dumps({"data": {"i": "x"}}),
                           headers={"Content-Type": "application/merge-patch+json"}) as r:
            assert r.status == 200
        async with s.delete(f"{base}/f0") as r:
            assert r.status == 200
        outs = await asyncio.gather(*plain)
        sel, tab, bm = await labelled, await table, await bookmarks

    assert all(o == outs[0] for o in outs)  # byte for byte
    every: list[dict[str, Any]] = [json.loads(x) for x in outs[0]]
    # (the namespace's kube-root-ca.crt may land in the stream too: its controller is not synchronised with us)
    evs = [e for e in every if e["object"]["metadata"]["name"].startswith("f")]
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in evs] == [
        ("ADDED", "f0"), ("ADDED", "f1"), ("ADDED", "f2"), ("ADDED", "f3"), ("MODIFIED", "f1"), ("DELETED", "f0")]
    rvs = [int(e["object"]["metadata"]["resourceVersion"]) for e in every]
    assert rvs == sorted(rvs) and len(set(rvs)) == len(rvs)
    assert [(json.loads(x)["type"], json.loads(x)["object"]["metadata"]["name"]) for x in sel] == [
        ("ADDED", "f1"), ("ADDED", "f3"), ("MODIFIED", "f1")]
    tables = [json.loads(x) for x in tab]
    assert len(tables) == len(every) and all(t["object"]["kind"] == "Table" for t in tables)
    assert "columnDefinitions" in tables[0]["object"] and "columnDefinitions" not in tables[1]["object"]
    assert [c for t in tables if (c := t["object"]["rows"][0]["cells"][0]).startswith("f")] == [
        "f0", "f1", "f2", "f3", "f1", "f0"]
    # the same events, then a bookmark as the watch times out (at the last revision it saw)
    bms = [json.loads(x) for x in bm]
    assert bms[:-1] == every
    assert bms[-1]["type"] == "BOOKMARK"
    assert bms[-1]["object"]["metadata"]["resourceVersion"] == str(rvs[-1])


async def test_watch_ends_at_its_timeout_with_no_events(cluster: Cluster, ns: str) -> None:
    base = f"{cluster.url}/api/v1/namespaces/{ns}/configmaps"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=_ctx(cluster))) as s:
        # the namespace's kube-root-ca.crt is written by a controller at its own pace: list once it is there, so
        # nothing can change after the revision we watch from
        async with asyncio.timeout(10):
            while True:
                async with s.get(base) as r:
                    listed = await r.json()
                if any(i["metadata"]["name"] == "kube-root-ca.crt" for i in listed["items"]):
                    break
                await asyncio.sleep(0.05)
        rv = listed["metadata"]["resourceVersion"]
        lines = await asyncio.wait_for(_watch(s, f"{base}?watch=1&resourceVersion={rv}&timeoutSeconds=1"), 10)
    assert lines == []


def _read_events_until_deleted(stream: Any) -> list[dict[str, Any]]:
    """Watch events from a chunked body (checking each chunk's framing) up to the first DELETED one."""
    lines: list[dict[str, Any]] = []
    while not lines or lines[-1]["type"] != "DELETED":
        size = int(stream.readline().strip(), 16)
        chunk = stream.read(size + 2)
        assert size and chunk[-2:] == b"\r\n", "bad chunk framing"
        lines += [json.loads(x) for x in chunk[:-2].splitlines() if x.strip()]
    return lines


async def test_a_watch_not_read_for_a_while_gets_every_event_in_order(cluster: Cluster, ns: str) -> None:
    """Events stop being written straight to a client that does not read (its connection's buffer fills) and
    wait in the store's queue for it instead; once it reads, it gets all of them, in order, framed as one chunked
    body, with nothing lost or repeated across the switches between the two ways out."""
    base = f"{cluster.url}/api/v1/namespaces/{ns}/configmaps"
    ctx = _ctx(cluster)
    n, size = 120, 100_000  # 12 MB: far more than the sockets' buffers hold
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s:
        body = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "big"}, "data": {"i": "-1"}}
        async with s.post(base, json=body) as resp:
            assert resp.status == 201
            rv = (await resp.json())["metadata"]["resourceVersion"]
        # a plain blocking TLS socket with a small receive buffer, read by a thread only at the end: no client
        # library flow control in between
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: the window scale follows
        sock.connect(("127.0.0.1", cluster.port))
        tls = ctx.wrap_socket(sock, server_hostname="kplane")
        tls.settimeout(60)
        stream = tls.makefile("rb")
        tls.sendall(f"GET /api/v1/namespaces/{ns}/configmaps?watch=1&resourceVersion={rv}&timeoutSeconds=60 "
                    f"HTTP/1.1\r\nHost: kplane\r\nAccept: application/json\r\n\r\n".encode())
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            head += await asyncio.to_thread(stream.readline)
        assert head.startswith(b"HTTP/1.1 200") and b"chunked" in head.lower()
        for i in range(n):  # the watcher reads nothing meanwhile
            patch = {"data": {"i": str(i), "pad": "x" * size}}
            async with s.patch(f"{base}/big", data=json.dumps(patch),
                               headers={"Content-Type": "application/merge-patch+json"}) as resp:
                assert resp.status == 200
        async with s.delete(f"{base}/big") as resp:
            assert resp.status == 200
        lines = await asyncio.to_thread(_read_events_until_deleted, stream)
        tls.close()
    mine = [e for e in lines if e["object"]["metadata"]["name"] == "big"]
    assert [e["object"]["data"]["i"] for e in mine] == [str(i) for i in range(n)] + [str(n - 1)]
    assert [e["type"] for e in mine] == ["MODIFIED"] * n + ["DELETED"]
    rvs = [int(e["object"]["metadata"]["resourceVersion"]) for e in lines]
    assert rvs == sorted(rvs) and len(set(rvs)) == len(rvs)


@pytest.mark.parametrize("size", [0, 1, 15, 16, 255, 4096, 100_000])
def test_watch_line_chunk_framing(size: int) -> None:
    """A shared watch line is kept once, framed as a chunk (pushed as is); the pump writes the line inside it."""
    line = bytes(random.randrange(256) for _ in range(size))
    chunk = _chunk(line)
    assert chunk == f"{size:x}".encode() + b"\r\n" + line + b"\r\n"
    assert bytes(_unchunk(chunk)) == line
