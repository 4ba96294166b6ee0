"""API request throughput and latency on the SQLite store, over HTTPS with keep-alive.

Starts a real ``kplane up`` in a subprocess on an ephemeral port, then drives it from this (separate) process with
``--concurrency`` clients for each of CREATE, GET, UPDATE, LIST. Prints a table: requests/s, p50, p99.
Measures; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.cluster import Cluster


def pct(samples: list[float], p: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(len(s) * p))] * 1000


async def run(cluster: Cluster, n: int, concurrency: int) -> list[tuple[str, int, float, float, float]]:
    ctx = ssl.create_default_context(cafile=str(cluster.pki / "ca.crt"))
    ctx.load_cert_chain(str(cluster.pki / "admin.crt"), str(cluster.pki / "admin.key"))
    base = f"{cluster.url}/api/v1/namespaces/default/configmaps"
    rows = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx, limit=concurrency)) as s:
        async def op(kind: str, i: int) -> None:
            name = f"bench-{i}"
            if kind == "CREATE":
                body = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": {"i": str(i)}}
                async with s.post(base, data=orjson.dumps(body), headers={"Content-Type": "application/json"}) as r:
                    assert r.status == 201, await r.text()
            elif kind == "GET":
                async with s.get(f"{base}/{name}") as r:
                    assert r.status == 200
                    await r.read()
            elif kind == "UPDATE":
                body = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": {"i": "u"}}
                async with s.put(f"{base}/{name}", data=orjson.dumps(body),
                                 headers={"Content-Type": "application/json"}) as r:
                    assert r.status == 200, await r.text()
            elif kind == "LIST":
                async with s.get(base, params={"limit": "50"}) as r:
                    assert r.status == 200
                    await r.read()

        for kind in ("CREATE", "GET", "UPDATE", "LIST"):
            lat: list[float] = []
            queue = list(range(n))

            async def worker(kind: str = kind, queue: list[int] = queue, lat: list[float] = lat) -> None:
                while queue:
                    i = queue.pop()
                    t0 = time.perf_counter()
                    await op(kind, i)
                    lat.append(time.perf_counter() - t0)

            t0 = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            wall = time.perf_counter() - t0
            rows.append((kind, n, n / wall, pct(lat, 0.5), pct(lat, 0.99)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=2000, help="requests per operation")
    ap.add_argument("-c", "--concurrency", type=int, default=16)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        c = Cluster(Path(d) / "data")
        c.start()
        try:
            rows = asyncio.run(run(c, args.n, args.concurrency))
        finally:
            c.stop()
    print(f"# API on SQLite: {args.n} requests per op, {args.concurrency} concurrent clients, HTTPS keep-alive")
    print(f"# machine: {platform.machine()}, {platform.python_implementation()} {platform.python_version()}")
    print(f"{'op':8} {'requests':>9} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8}")
    for kind, n, rps, p50, p99 in rows:
        print(f"{kind:8} {n:9d} {rps:9.0f} {p50:8.2f} {p99:8.2f}")
    print(f"# mean req/s over ops: {statistics.mean(r[2] for r in rows):.0f}")


if __name__ == "__main__":
    main()
