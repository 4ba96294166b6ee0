"""API latency at a fixed offered load (open loop), and the highest rate the apiserver sustains.

A real ``kplane server`` (SQLite store, no node) runs in its own process; the load comes from ``--procs`` separate
load processes over HTTPS keep-alive connections (admin client certificate), ``--conns`` connections each.
Requests are scheduled at a constant rate (request i of the run at ``start + i / rate``, whatever happened to the
earlier ones: open loop), and each latency is measured from the request's *scheduled* time to the last byte of its
response, so time spent waiting behind slow requests, for a free connection or for the load process itself counts.
The first ``--warmup`` seconds of every run are left out.

Operations (ConfigMaps, JSON): GET one object of a 1,000-object pool; LIST a namespace of 50 objects; CREATE a new
object; UPDATE (PUT without resourceVersion) and PATCH (merge patch) an object of the pool.

The sustained rate of an operation is the highest offered rate at which every request completed, the rate served
was at least 95 % of the rate offered and p99 stayed under ``--sustain-p99`` ms (rates step up by 1.5x from the
fixed load, then one bisection step). Server CPU per request comes from the server process's own CPU time.
Measures; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import resource
import sys
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import (
    Figure,
    H1Conn,
    HTTPError,
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

OPS = ("GET", "LIST", "CREATE", "UPDATE", "PATCH")
POOL = 1000
LIST_SIZE = 50
NS, NS_LIST, NS_CREATE = "bench", "bench-list", "bench-create"
TARGET_P99_MS = 20.0
TARGET_RATE = 1000


@dataclass
class Job:
    op: str
    rate: float  # total offered rate over all load processes
    duration: float
    start: float  # CLOCK_MONOTONIC
    warmup: float
    tag: str


def _request(op: str, seq: int, tag: str) -> tuple[str, str, bytes, str]:
    base = f"/api/v1/namespaces/{NS}/configmaps"
    k = seq % POOL
    if op == "GET":
        return "GET", f"{base}/obj-{k}", b"", ""
    if op == "LIST":
        return "GET", f"/api/v1/namespaces/{NS_LIST}/configmaps", b"", ""
    if op == "CREATE":
        body = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"c-{tag}-{seq}"}, "data": {"i": "x"}}
        return "POST", f"/api/v1/namespaces/{NS_CREATE}/configmaps", orjson.dumps(body), "application/json"
    if op == "UPDATE":
        body = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"obj-{k}"}, "data": {"v": str(seq)}}
        return "PUT", f"{base}/obj-{k}", orjson.dumps(body), "application/json"
    if op == "PATCH":
        return "PATCH", f"{base}/obj-{k}", orjson.dumps({"data": {"p": str(seq)}}), "application/merge-patch+json"
    raise ValueError(op)


_OK = {"GET": 200, "LIST": 200, "CREATE": 201, "UPDATE": 200, "PATCH": 200}


async def _run_job(conns: asyncio.Queue[H1Conn], job: Job, index: int, procs: int) -> dict[str, Any]:
    lat: list[float] = []
    late: list[float] = []
    errors: list[str] = []
    pending: set[asyncio.Task[None]] = set()
    n = int(job.rate * job.duration)
    mine = range(index, n, procs)

    async def one(seq: int, due: float) -> None:
        c = await conns.get()
        try:
            method, path, body, ct = _request(job.op, seq, job.tag)
            status, data = await c.request(method, path, body, ct or "application/json")
            if status != _OK[job.op]:
                errors.append(f"{status} {data[:200]!r}")
                return
        except HTTPError as exc:
            errors.append(str(exc))
            return
        finally:
            conns.put_nowait(c)
        if due - job.start >= job.warmup:
            lat.append(now() - due)

    for seq in mine:
        due = job.start + seq / job.rate
        delay = due - now()
        if delay > 0:
            await asyncio.sleep(delay)
        if due - job.start >= job.warmup:
            late.append(now() - due)
        t = asyncio.create_task(one(seq, due))
        pending.add(t)
        t.add_done_callback(pending.discard)
    unfinished = 0
    if pending:
        _done, still = await asyncio.wait(set(pending), timeout=10.0)
        unfinished = len(still)
        for t in still:
            t.cancel()
    return {"lat": lat, "late": late, "errors": errors[:5], "n_errors": len(errors), "unfinished": unfinished,
            "scheduled": len(mine)}


def load_process(ctl: Connection, host: str, port: int, pki: str, conns: int, index: int, procs: int) -> None:
    async def main() -> None:
        p = Path(pki)
        ctx = client_ssl(p / "ca.crt", p / "admin.crt", p / "admin.key")
        pool: asyncio.Queue[H1Conn] = asyncio.Queue()
        for _ in range(conns):
            c = H1Conn(host, port, ctx)
            await c.connect()
            pool.put_nowait(c)
        loop = asyncio.get_running_loop()
        ctl.send("ready")
        while True:
            job = await loop.run_in_executor(None, ctl.recv)
            if job is None:
                break
            r0 = resource.getrusage(resource.RUSAGE_SELF)
            out = await _run_job(pool, job, index, procs)
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            out["cpu"] = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
            ctl.send(out)

    asyncio.run(main())


class Load:
    def __init__(self, cluster: Cluster, procs: int, conns: int) -> None:
        ctx = mp.get_context("spawn")
        self.ctls: list[Connection] = []
        self.procs: list[Any] = []
        for i in range(procs):
            a, b = ctx.Pipe()
            p = ctx.Process(target=load_process, args=(b, "127.0.0.1", cluster.port, str(cluster.pki), conns, i,
                                                       procs), daemon=True)
            p.start()
            self.ctls.append(a)
            self.procs.append(p)
        for c in self.ctls:
            assert c.recv() == "ready"
        assert cluster.proc is not None
        self.server_pid = cluster.proc.pid
        self.runs = 0

    def run(self, op: str, rate: float, duration: float, warmup: float) -> dict[str, Any]:
        self.runs += 1
        job = Job(op, rate, duration, now() + 0.2, warmup, f"r{self.runs}")
        cpu0 = proc_cpu(self.server_pid)
        for c in self.ctls:
            c.send(job)
        outs = [c.recv() for c in self.ctls]
        server_cpu = proc_cpu(self.server_pid) - cpu0
        lat = [x for o in outs for x in o["lat"]]
        late = [x for o in outs for x in o["late"]]
        scheduled = sum(o["scheduled"] for o in outs)
        bad = sum(o["n_errors"] + o["unfinished"] for o in outs)
        measured_s = duration - warmup
        return {
            "op": op, "rate": rate, "served": len(lat) / measured_s if measured_s > 0 else float("nan"),
            "p50": pct(lat, 0.5) * 1000, "p99": pct(lat, 0.99) * 1000, "max": max(lat, default=float("nan")) * 1000,
            "late_p99": pct(late, 0.99) * 1000, "bad": bad, "scheduled": scheduled,
            "errors": [e for o in outs for e in o["errors"]][:3],
            "server_cpu_ms": server_cpu * 1000 / max(scheduled, 1),
            "client_cpu": sum(o["cpu"] for o in outs) / (duration + 0.2),
            "server_cpu": server_cpu / (duration + 0.2),
        }

    def close(self) -> None:
        for c in self.ctls:
            c.send(None)
        for p in self.procs:
            p.join(10)


def sustainable(r: dict[str, Any], p99_ms: float) -> bool:
    return r["bad"] == 0 and r["served"] >= 0.95 * r["rate"] and r["p99"] <= p99_ms


def seed(cluster: Cluster) -> None:
    async def go() -> None:
        ctx = client_ssl(cluster.pki / "ca.crt", cluster.pki / "admin.crt", cluster.pki / "admin.key")
        c = H1Conn("127.0.0.1", cluster.port, ctx)
        await c.connect()
        for ns in (NS, NS_LIST, NS_CREATE):
            body = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}
            await c.request("POST", "/api/v1/namespaces", orjson.dumps(body))
        for i in range(POOL):
            body = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"obj-{i}"}, "data": {"v": "0"}}
            await c.request("POST", f"/api/v1/namespaces/{NS}/configmaps", orjson.dumps(body))
        # the namespace controller adds kube-root-ca.crt to bench-list: LIST_SIZE objects in all
        await asyncio.sleep(0.5)
        for i in range(LIST_SIZE - 1):
            body = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"l-{i}"},
                    "data": {"k": "v" * 64}}
            await c.request("POST", f"/api/v1/namespaces/{NS_LIST}/configmaps", orjson.dumps(body))
        c.close()

    asyncio.run(go())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=TARGET_RATE, help="fixed offered load, requests/s")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per run (fixed load)")
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--procs", type=int, default=2, help="load processes")
    ap.add_argument("--conns", type=int, default=8, help="connections per load process")
    ap.add_argument("--ops", default=",".join(OPS))
    ap.add_argument("--sustain-p99", type=float, default=100.0, help="ms: p99 bound for the sustained rate")
    ap.add_argument("--step-duration", type=float, default=4.0, help="seconds per run of the rate search")
    ap.add_argument("--max-rate", type=float, default=20000)
    ap.add_argument("--no-search", action="store_true", help="only the fixed load")
    ap.add_argument("--json", help="write the figures here (for bench/report.py)")
    ap.add_argument("--py-spy", metavar="OUT", help="profile the server during the fixed-load runs")
    args = ap.parse_args()
    ops = [o.strip().upper() for o in args.ops.split(",") if o.strip()]
    prof = Profiler(args.py_spy)
    rep = Report("api")
    print(f"# {machine_line()}", flush=True)
    raise_nofile()
    with tempfile.TemporaryDirectory(prefix="kplane-bench-") as d:
        c = Cluster(Path(d) / "data", node=False)
        c.start()
        try:
            seed(c)
            load = Load(c, args.procs, args.conns)
            assert c.proc is not None
            prof.start(c.proc.pid)
            fixed = {op: load.run(op, args.rate, args.duration, args.warmup) for op in ops}
            prof.stop()
            search: dict[str, tuple[float, dict[str, Any] | None]] = {}
            if not args.no_search:
                for op in ops:
                    search[op] = find_rate(load, op, args)
            load.close()
        finally:
            c.stop()
    rows = []
    for op, r in fixed.items():
        rows.append([op, r["rate"], r["served"], r["p50"], r["p99"], r["max"], r["p99"] / TARGET_P99_MS,
                     r["server_cpu_ms"], r["server_cpu"] * 100, r["client_cpu"] * 100, r["late_p99"],
                     r["bad"]])
    rep.section(
        f"### API at a fixed offered load of {args.rate:,.0f} req/s (open loop, latency from the scheduled time), "
        f"{args.procs} load processes x {args.conns} HTTPS keep-alive connections, {args.duration:.0f} s runs "
        f"({args.warmup:.0f} s warm-up left out)\n\n"
        + md_table(["op", "offered/s", "served/s", "p50 ms", "p99 ms", "max ms", f"p99 / {TARGET_P99_MS:.0f} ms",
                    "server CPU ms/req", "server CPU %", "load CPU %", "load lateness p99 ms", "failed"], rows)
        + "\n\nserver CPU % and load CPU % are of one core; load lateness is how late the load processes sent "
          "requests (their own scheduling delay, part of the latency above).")
    for op, r in fixed.items():
        errs = f"; errors: {r['errors']}" if r["errors"] else ""
        rep.add(Figure(f"{op} p99 at {args.rate:,.0f} req/s", r["p99"], "ms", TARGET_P99_MS,
                       note=f"p50 {r['p50']:.1f} ms, served {r['served']:,.0f}/s{errs}"))
    if search:
        rows = []
        for op, (best, r) in search.items():
            rows.append([op, best, r["p50"] if r else float("nan"), r["p99"] if r else float("nan"),
                         r["server_cpu"] * 100 if r else float("nan"), r["client_cpu"] * 100 if r else float("nan")])
            rep.add(Figure(f"{op} max sustained rate", best, "req/s", None,
                           note=f"p99 <= {args.sustain_p99:.0f} ms, all served"))
        rep.section(f"### Highest sustained rate (every request served, >= 95 % of the offered rate, p99 <= "
                    f"{args.sustain_p99:.0f} ms; {args.step_duration:.0f} s runs)\n\n"
                    + md_table(["op", "req/s", "p50 ms", "p99 ms", "server CPU %", "load CPU %"], rows)
                    + "\n\nThe load processes share the machine's cores with the server: at the highest rates the "
                      "load CPU % shows how much of the machine they took.")
    rep.finish(args.json)


def find_rate(load: Load, op: str, args: argparse.Namespace) -> tuple[float, dict[str, Any] | None]:
    good: tuple[float, dict[str, Any] | None] = (0.0, None)
    rate = args.rate / 2
    bad_rate = 0.0
    while rate <= args.max_rate:
        r = load.run(op, rate, args.step_duration, min(args.warmup, args.step_duration / 4))
        print(f"  {op} {rate:8.0f}/s -> served {r['served']:8.0f}/s p99 {r['p99']:8.1f} ms failed {r['bad']}",
              flush=True)
        if not sustainable(r, args.sustain_p99):
            bad_rate = rate
            break
        good = (rate, r)
        rate *= 1.5
        time.sleep(0.5)
    if bad_rate and good[0]:
        mid = (good[0] + bad_rate) / 2
        r = load.run(op, mid, args.step_duration, min(args.warmup, args.step_duration / 4))
        print(f"  {op} {mid:8.0f}/s -> served {r['served']:8.0f}/s p99 {r['p99']:8.1f} ms failed {r['bad']}",
              flush=True)
        if sustainable(r, args.sustain_p99):
            good = (mid, r)
    return good


if __name__ == "__main__":
    main()
