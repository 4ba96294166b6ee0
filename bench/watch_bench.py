"""Watch fan-out: event delivery latency to many concurrent watchers.

A real ``kplane server`` (SQLite store, no node) serves ``--watchers`` watches of the ConfigMaps of one namespace,
spread over ``--procs`` separate watcher processes (one HTTPS connection per watch, admin client certificate,
starting at the namespace's current resourceVersion). Once every watch has its response head, a separate writer
process updates one ConfigMap at a steady ``--rate`` for ``--duration`` seconds (a PUT carrying a sequence number),
noting when each write was acknowledged (its response received). Each watcher notes when it received each event.
Delivery latency = receipt time - acknowledgement time, per watcher and event, on the one CLOCK_MONOTONIC every
process shares (it can be slightly negative: the server may send an event before the writer has read its
response). Measures; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import re
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import (
    Figure,
    H1Conn,
    Profiler,
    Report,
    client_ssl,
    machine_line,
    md_table,
    now,
    pct,
    proc_cpu,
    raise_nofile,
)
from tests.cluster import Cluster

NS = "watch-bench"
SEQ = re.compile(rb'"seq":"(\d+)"')
TARGET_P99_MS = 100.0


def watcher_process(ctl: Connection, port: int, pki: str, count: int, rv: str) -> None:
    async def main() -> None:
        p = Path(pki)
        ctx = client_ssl(p / "ca.crt", p / "admin.crt", p / "admin.key")
        got: list[dict[int, float]] = [{} for _ in range(count)]
        ready = asyncio.Semaphore(0)
        errors: list[str] = []

        async def watch(i: int) -> None:
            c = H1Conn("127.0.0.1", port, ctx)
            try:
                await c.connect()
                status, reader = await c.stream_lines(
                    f"/api/v1/namespaces/{NS}/configmaps?watch=1&resourceVersion={rv}&timeoutSeconds=600")
                ready.release()
                if status != 200:
                    errors.append(f"watch {i}: HTTP {status}")
                    return
                mine = got[i]
                tail = b""
                # no JSON parsing: the watchers share the cores with the server, so they do as little as they
                # can per event (the sequence number is found in the raw bytes; chunk framing cannot match it)
                while data := await reader.read(1 << 16):
                    t = now()
                    buf = tail + data
                    for m in SEQ.finditer(buf):
                        mine.setdefault(int(m.group(1)), t)
                    tail = buf[-48:]
            except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                errors.append(f"watch {i}: {type(exc).__name__}: {exc}")
                ready.release()
            finally:
                c.close()

        sem = asyncio.Semaphore(32)

        async def start(i: int) -> asyncio.Task[None]:
            async with sem:
                t = asyncio.create_task(watch(i))
                await ready.acquire()
                return t

        tasks = await asyncio.gather(*(start(i) for i in range(count)))
        ctl.send(("ready", errors[:3]))
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, ctl.recv)  # the writer is done: give the last events time to arrive
        await asyncio.sleep(2.0)
        for t in tasks:
            t.cancel()
        ctl.send(("got", got, errors[:3]))

    asyncio.run(main())


def writer_process(ctl: Connection, port: int, pki: str, rate: float, duration: float) -> None:
    async def main() -> None:
        p = Path(pki)
        ctx = client_ssl(p / "ca.crt", p / "admin.crt", p / "admin.key")
        c = H1Conn("127.0.0.1", port, ctx)
        await c.connect()
        acks: dict[int, float] = {}
        late: list[float] = []
        path = f"/api/v1/namespaces/{NS}/configmaps/target"
        t0 = now() + 0.1
        n = int(rate * duration)
        for seq in range(n):
            due = t0 + seq / rate
            delay = due - now()
            if delay > 0:
                await asyncio.sleep(delay)
            late.append(now() - due)
            body = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "target"},
                    "data": {"seq": str(seq)}}
            status, _ = await c.request("PUT", path, orjson.dumps(body))
            if status == 200:
                acks[seq] = now()
        c.close()
        ctl.send((acks, pct(late, 0.99)))

    asyncio.run(main())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--watchers", type=int, default=1000)
    ap.add_argument("--procs", type=int, default=4, help="watcher processes")
    ap.add_argument("--rate", type=float, default=10.0, help="writes per second")
    ap.add_argument("--duration", type=float, default=15.0, help="seconds of writes")
    ap.add_argument("--json", help="write the figures here (for bench/report.py)")
    ap.add_argument("--py-spy", metavar="OUT", help="profile the server while the writer runs (py-spy raw output)")
    args = ap.parse_args()
    rep = Report("watch")
    prof = Profiler(args.py_spy)
    print(f"# {machine_line()}", flush=True)
    raise_nofile()
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="kplane-bench-") as d:
        c = Cluster(Path(d) / "data", node=False)
        c.start()
        try:
            rv = seed(c)
            ctls: list[Connection] = []
            procs = []
            per = [args.watchers // args.procs + (1 if i < args.watchers % args.procs else 0)
                   for i in range(args.procs)]
            t0 = time.monotonic()
            for n in per:
                a, b = ctx.Pipe()
                pr = ctx.Process(target=watcher_process, args=(b, c.port, str(c.pki), n, rv), daemon=True)
                pr.start()
                ctls.append(a)
                procs.append(pr)
            start_errors = []
            for a in ctls:
                _, e = a.recv()
                start_errors += e
            setup_s = time.monotonic() - t0
            print(f"  {args.watchers} watches open in {setup_s:.1f} s"
                  + (f"; errors: {start_errors}" if start_errors else ""), flush=True)
            wa, wb = ctx.Pipe()
            wp = ctx.Process(target=writer_process, args=(wb, c.port, str(c.pki), args.rate, args.duration),
                             daemon=True)
            assert c.proc is not None
            prof.start(c.proc.pid)
            cpu0 = proc_cpu(c.proc.pid)
            wp.start()
            acks, write_late = wa.recv()
            time.sleep(1.0)  # the last fan-out
            server_cpu = proc_cpu(c.proc.pid) - cpu0
            prof.stop()
            wp.join(10)
            for a in ctls:
                a.send("done")
            got: list[dict[int, float]] = []
            errors: list[str] = []
            for a in ctls:
                _, g, e = a.recv()
                got += g
                errors += e
            for pr in procs:
                pr.join(10)
        finally:
            c.stop()
    lat = []
    missing = 0
    for mine in got:
        for seq, ack in acks.items():
            t = mine.get(seq)
            if t is None:
                missing += 1
            else:
                lat.append(t - ack)
    expected = len(acks) * len(got)
    p99 = pct(lat, 0.99) * 1000
    rows = [[args.watchers, args.rate, len(acks), expected, len(lat), missing, pct(lat, 0.5) * 1000, p99,
             max(lat, default=float("nan")) * 1000, p99 / TARGET_P99_MS, server_cpu * 1e6 / max(len(lat), 1)]]
    rep.section(
        f"### Watch fan-out: {args.watchers} watches of one namespace's ConfigMaps ({args.procs} watcher "
        f"processes, one HTTPS connection each), one writer process updating at {args.rate:g}/s for "
        f"{args.duration:g} s; latency from write acknowledgement to receipt\n\n"
        + md_table(["watchers", "writes/s", "writes", "deliveries expected", "delivered", "missing", "p50 ms",
                    "p99 ms", "max ms", f"p99 / {TARGET_P99_MS:.0f} ms", "server CPU us/delivery"], rows)
        + f"\n\nSetup: {args.watchers} watches opened in {setup_s:.1f} s. Writer lateness p99 "
          f"{write_late * 1000:.1f} ms." + (f" Watch errors: {errors[:3]}" if errors else ""))
    rep.add(Figure(f"watch delivery p99, {args.watchers} watchers", p99, "ms", TARGET_P99_MS,
                   note=f"p50 {pct(lat, 0.5) * 1000:.1f} ms, {missing} of {expected} deliveries missing"))
    rep.finish(args.json)


def seed(c: Cluster) -> str:
    async def go() -> str:
        ctx = client_ssl(c.pki / "ca.crt", c.pki / "admin.crt", c.pki / "admin.key")
        h = H1Conn("127.0.0.1", c.port, ctx)
        await h.connect()
        await h.request("POST", "/api/v1/namespaces", orjson.dumps(
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}}))
        await h.request("POST", f"/api/v1/namespaces/{NS}/configmaps", orjson.dumps(
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "target"}, "data": {}}))
        await asyncio.sleep(0.5)  # kube-root-ca.crt lands too
        _, body = await h.request("GET", f"/api/v1/namespaces/{NS}/configmaps")
        h.close()
        rv: Any = orjson.loads(body)["metadata"]["resourceVersion"]
        return str(rv)

    return asyncio.run(go())


if __name__ == "__main__":
    main()
