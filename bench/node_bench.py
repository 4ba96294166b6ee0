"""Node scale: how many nodes can keep their Leases fresh, with lease-renew p99 <= 1 s.

A real ``kplane server`` (SQLite store, no node of its own) serves simulated nodes spread over ``--procs`` separate
client processes. Each simulated node is a real client of the cluster: its own TLS connection with its own
client certificate issued from the cluster CA (CN ``system:node:<name>``, O ``system:nodes``, so the Node
authorizer and NodeRestriction apply), it registers its Node and posts a kubelet-like status, creates its Lease in
``kube-node-lease``, then renews the Lease every ``--interval`` seconds (a PUT of the last Lease it got back, as
the kubelet does; on a conflict it reads the Lease again) and posts its status every ``--status-interval`` seconds.
Renewals are scheduled open loop (a random phase per node, then every interval); a renewal's latency runs from
its scheduled time to the response, so a renewal that waited behind a slow one counts that wait.

N steps up (``--steps``); at each step the new nodes register (a step whose nodes have not all registered within
``--register-timeout`` seconds fails), the cluster settles for ``--settle`` intervals, and
the renewals due during the next ``--window`` intervals are measured (a renewal still waiting 2 s after the window
counts with the time it has waited so far). The result is the largest N whose renew p99 <= 1 s.
Upstream's kubelet renews every 10 s; a shorter ``--interval`` gives the same request rate with fewer nodes
(reported as the equivalent number of 10-s nodes, and said so in the output). Measures; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing as mp
import random
import ssl
import sys
import tempfile
import time
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import (
    Figure,
    H1Conn,
    HTTPError,
    Report,
    machine_line,
    md_table,
    now,
    pct,
    proc_cpu,
    raise_nofile,
)
from tests.cluster import Cluster

TARGET_NODES = 5000
P99_LIMIT_S = 1.0
KUBELET_INTERVAL = 10.0
LEASES = "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases"


def _ts() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def node_status(name: str, i: int) -> dict[str, Any]:
    now_s = _ts()
    res = {"cpu": "4", "memory": "16331516Ki", "pods": "110", "ephemeral-storage": "10Gi"}

    def cond(t: str, status: str, reason: str, msg: str) -> dict[str, str]:
        return {"type": t, "status": status, "lastHeartbeatTime": now_s, "lastTransitionTime": now_s,
                "reason": reason, "message": msg}

    return {
        "capacity": res, "allocatable": res,
        "conditions": [
            cond("MemoryPressure", "False", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
            cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
            cond("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
            cond("Ready", "True", "KubeletReady", "kubelet is posting ready status"),
        ],
        "addresses": [{"type": "InternalIP", "address": f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"},
                      {"type": "Hostname", "address": name}],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
        "nodeInfo": {"machineID": f"{i:032x}", "systemUUID": f"{i:032x}", "bootID": f"{i:032x}",
                     "kernelVersion": "6.1.0", "osImage": "simulated", "containerRuntimeVersion": "kplane-sim://0",
                     "kubeletVersion": "v1.37.0-sim", "kubeProxyVersion": "", "operatingSystem": "linux",
                     "architecture": "amd64"},
    }


class SimNode:
    def __init__(self, name: str, index: int, conn: H1Conn) -> None:
        self.name, self.index, self.conn = name, index, conn
        self.node: dict[str, Any] = {}
        self.lease: dict[str, Any] = {}
        self.lock = asyncio.Lock()

    async def call(self, method: str, path: str, body: Any = None, ok: tuple[int, ...] = (200, 201)) -> tuple[
            int, dict[str, Any]]:
        async with self.lock:
            status, data = await self.conn.request(method, path, orjson.dumps(body) if body is not None else b"")
        doc = orjson.loads(data) if data else {}
        if status not in ok:
            raise HTTPError(f"{method} {path}: {status} {doc.get('message', '')}")
        return status, doc

    async def register(self) -> None:
        await self.conn.connect()
        body = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": self.name, "labels": {
            "kubernetes.io/hostname": self.name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
            "kplane.bench/simulated": "true"}}, "spec": {}}
        status, node = await self.call("POST", "/api/v1/nodes", body, ok=(201, 409))
        if status == 409:
            _, node = await self.call("GET", f"/api/v1/nodes/{self.name}")
        self.node = node
        await self.post_status()
        lease = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                 "metadata": {"name": self.name, "ownerReferences": [
                     {"apiVersion": "v1", "kind": "Node", "name": self.name, "uid": node["metadata"]["uid"]}]},
                 "spec": {"holderIdentity": self.name, "leaseDurationSeconds": 40, "renewTime": _micro()}}
        status, self.lease = await self.call("POST", LEASES, lease, ok=(201, 409))
        if status == 409:
            _, self.lease = await self.call("GET", f"{LEASES}/{self.name}")

    async def post_status(self) -> None:
        for _ in range(5):
            self.node["status"] = {**(self.node.get("status") or {}), **node_status(self.name, self.index)}
            status, doc = await self.call("PUT", f"/api/v1/nodes/{self.name}/status", self.node, ok=(200, 409))
            if status == 200:
                self.node = doc
                return
            _, self.node = await self.call("GET", f"/api/v1/nodes/{self.name}")
        raise HTTPError("node status: 5 conflicts")

    async def renew(self) -> None:
        self.lease.setdefault("spec", {})["renewTime"] = _micro()
        status, doc = await self.call("PUT", f"{LEASES}/{self.name}", self.lease, ok=(200, 409))
        if status == 409:
            _, self.lease = await self.call("GET", f"{LEASES}/{self.name}")
            self.lease["spec"]["renewTime"] = _micro()
            _, doc = await self.call("PUT", f"{LEASES}/{self.name}", self.lease)
        self.lease = doc


def _micro() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def node_process(ctl: Connection, port: int, pki: str, index: int, interval: float, status_interval: float,
                 workdir: str) -> None:
    from kplane.pki import issue, load_pair

    async def main() -> None:
        p = Path(pki)
        ca = load_pair(p / "ca.crt", p / "ca.key")
        loop = asyncio.get_running_loop()
        renewals: list[tuple[float, float, bool]] = []  # (due, latency, ok)
        statuses: list[tuple[float, float, bool]] = []
        tasks: list[asyncio.Task[None]] = []
        errors: list[str] = []
        inflight: dict[str, float] = {}  # node -> due time of the renewal it is waiting for

        def make_ctx(name: str) -> ssl.SSLContext:
            pair = issue(ca, common_name=f"system:node:{name}", organizations=["system:nodes"], client=True)
            cert, key = Path(workdir) / f"{name}.crt", Path(workdir) / f"{name}.key"
            cert.write_bytes(pair.cert_pem())
            key.write_bytes(pair.key_pem())
            ctx = ssl.create_default_context(cafile=str(p / "ca.crt"))
            ctx.check_hostname = False
            ctx.load_cert_chain(str(cert), str(key))
            return ctx

        async def renew_loop(n: SimNode) -> None:
            due = now() + random.uniform(0, interval)
            while True:
                delay = due - now()
                if delay > 0:
                    await asyncio.sleep(delay)
                inflight[n.name] = due
                try:
                    await n.renew()
                    renewals.append((due, now() - due, True))
                except (HTTPError, OSError, KeyError) as exc:
                    renewals.append((due, now() - due, False))
                    if len(errors) < 5:
                        errors.append(f"renew {n.name}: {exc}")
                finally:
                    del inflight[n.name]
                due += interval

        async def status_loop(n: SimNode) -> None:
            due = now() + random.uniform(0, status_interval)
            while True:
                delay = due - now()
                if delay > 0:
                    await asyncio.sleep(delay)
                try:
                    await n.post_status()
                    statuses.append((due, now() - due, True))
                except (HTTPError, OSError, KeyError) as exc:
                    statuses.append((due, now() - due, False))
                    if len(errors) < 5:
                        errors.append(f"status {n.name}: {exc}")
                due += status_interval

        async def add(names: list[tuple[str, int]], limit_s: float) -> tuple[int, list[str]]:
            sem = asyncio.Semaphore(16)
            failed: list[str] = []
            joined = [0]

            async def one(name: str, i: int) -> None:
                async with sem:
                    ctx = make_ctx(name)
                    n = SimNode(name, i, H1Conn("127.0.0.1", port, ctx))
                    for attempt in range(3):
                        try:
                            await n.register()
                            break
                        except (HTTPError, OSError) as exc:
                            if attempt == 2:
                                failed.append(f"{name}: {exc}")
                                return
                            await asyncio.sleep(0.5)
                    tasks.append(asyncio.create_task(renew_loop(n)))
                    tasks.append(asyncio.create_task(status_loop(n)))
                    joined[0] += 1

            regs = [asyncio.create_task(one(n, i)) for n, i in names]
            _done, late = await asyncio.wait(regs, timeout=limit_s)
            for t in late:
                t.cancel()
            if late:
                failed.append(f"{len(late)} nodes had not registered after {limit_s:.0f} s")
            return joined[0], failed[:5]

        while True:
            cmd = await loop.run_in_executor(None, ctl.recv)
            if cmd is None:
                break
            if cmd[0] == "add":
                ok, failed = await add(cmd[1], cmd[2])
                ctl.send(("added", ok, failed))
            elif cmd[0] == "window":
                _, t0, t1 = cmd
                # renewals due in the window have had 2 s to finish (those still waiting count as late, below)
                await asyncio.sleep(max(0.0, t1 - now()) + 2.0)
                r = [(lat, ok) for due, lat, ok in renewals if t0 <= due < t1]
                s = [(lat, ok) for due, lat, ok in statuses if t0 <= due < t1]
                # still waiting: counted with the time waited so far (a lower bound)
                r += [(now() - due, True) for due in inflight.values() if t0 <= due < t1]
                late = sum(1 for due in inflight.values() if t0 <= due < t1)
                ctl.send(("window", r, s, late, errors[:5]))
                errors.clear()
        for t in tasks:
            t.cancel()

    asyncio.run(main())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", default="500,1000,2000,3000,4000,5000,6000,7000,8000,10000",
                    help="node counts to try, in order")
    ap.add_argument("--register-timeout", type=float, default=60.0,
                    help="a step whose new nodes have not all registered by then fails")
    ap.add_argument("--interval", type=float, default=KUBELET_INTERVAL, help="lease renew interval, seconds")
    ap.add_argument("--status-interval", type=float, default=30.0, help="node status post interval, seconds")
    ap.add_argument("--window", type=float, default=1.0, help="measurement window, in intervals")
    ap.add_argument("--settle", type=float, default=0.5, help="wait after registering, in intervals")
    ap.add_argument("--procs", type=int, default=4, help="client processes holding the simulated nodes")
    ap.add_argument("--json", help="write the figures here (for bench/report.py)")
    args = ap.parse_args()
    scale = KUBELET_INTERVAL / args.interval
    steps = [int(s) for s in args.steps.split(",") if s.strip()]
    rep = Report("nodes")
    print(f"# {machine_line()}", flush=True)
    raise_nofile()
    rows: list[list[Any]] = []
    best = 0
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="kplane-bench-") as d:
        c = Cluster(Path(d) / "data", node=False)
        c.start()
        ctx = mp.get_context("spawn")
        ctls: list[Connection] = []
        procs = []
        try:
            for i in range(args.procs):
                a, b = ctx.Pipe()
                wd = Path(d) / f"w{i}"
                wd.mkdir()
                p = ctx.Process(target=node_process, args=(b, c.port, str(c.pki), i, args.interval,
                                                           args.status_interval, str(wd)), daemon=True)
                p.start()
                ctls.append(a)
                procs.append(p)
            have = 0
            for n in steps:
                t0 = time.monotonic()
                new = [(f"sim-{i:05d}", i) for i in range(have, n)]
                for k, ctl in enumerate(ctls):
                    ctl.send(("add", new[k::len(ctls)], args.register_timeout))
                added, failures = 0, []
                for ctl in ctls:
                    _, ok, failed = ctl.recv()
                    added += ok
                    failures += failed
                have = n
                reg_s = time.monotonic() - t0
                print(f"  {n} nodes: {added} of {len(new)} registered in {reg_s:.1f} s"
                      + (f"; {failures[:2]}" if failures else ""), flush=True)
                if added < len(new):
                    rows.append([n, int(n * scale), float("nan"), float("nan"), float("nan"), float("nan"),
                                 float("nan"), len(new) - added, 0, reg_s, float("nan"), float("nan"),
                                 "no (registration)"])
                    break
                time.sleep(args.settle * args.interval)  # settle before measuring
                assert c.proc is not None
                cpu0 = proc_cpu(c.proc.pid)
                w0 = now()
                w1 = w0 + args.window * args.interval
                for ctl in ctls:
                    ctl.send(("window", w0, w1))
                lat: list[float] = []
                st: list[float] = []
                bad = late = 0
                errs: list[str] = []
                for ctl in ctls:
                    _, r, s, lt, e = ctl.recv()
                    lat += [x for x, ok in r]
                    st += [x for x, ok in s]
                    bad += sum(1 for _x, ok in r if not ok) + sum(1 for _x, ok in s if not ok)
                    late += lt
                    errs += e
                p99 = pct(lat, 0.99)
                rate = len(lat) / (w1 - w0)
                cpu = (proc_cpu(c.proc.pid) - cpu0) / (now() - w0)
                rss = int(Path(f"/proc/{c.proc.pid}/status").read_text().split("VmRSS:")[1].split()[0]) / 1024
                ok = p99 <= P99_LIMIT_S and bad == 0 and added == len(new)
                rows.append([n, int(n * scale), rate, pct(lat, 0.5) * 1000, p99 * 1000, max(lat, default=0) * 1000,
                             pct(st, 0.99) * 1000, bad, late, reg_s, cpu * 100, rss, "yes" if ok else "no"])
                print(f"  {n} nodes: renew p50 {pct(lat, 0.5) * 1000:.0f} ms p99 {p99 * 1000:.0f} ms, "
                      f"{rate:.0f} renewals/s, failed {bad}" + (f" {errs[:2]}" if errs else ""), flush=True)
                if not ok:
                    break
                best = n
        finally:
            for ctl in ctls:
                with contextlib.suppress(OSError):
                    ctl.send(None)
            for p in procs:
                p.join(15)
                if p.is_alive():
                    p.kill()
            c.stop()
    note = ""
    if scale != 1:
        note = (f"renew interval {args.interval:g} s instead of 10 s: each node renews {scale:.3g}x as often, so N "
                f"nodes here make the lease traffic of {scale:.3g}*N kubelets")
    rep.section(
        f"### Node scale: simulated nodes ({args.procs} client processes, one TLS connection and client "
        f"certificate per node), lease renew every {args.interval:g} s, status every {args.status_interval:g} s, "
        f"{args.window:g}-interval windows; total {time.monotonic() - t_start:.0f} s\n\n"
        + (f"**{note}.**\n\n" if note else "")
        + md_table(["nodes", "equiv. 10-s nodes", "renewals/s", "renew p50 ms", "renew p99 ms", "renew max ms",
                    "status p99 ms", "failed", "unfinished", "register s", "server CPU %", "server RSS MiB",
                    "p99 <= 1 s"], rows)
        + "\n\nserver CPU % is of one core over the window; server RSS is the kplane process (it holds one TLS "
          "connection per node and the controllers' caches of every Node and Lease).")
    rep.add(Figure("largest N with lease-renew p99 <= 1 s", int(best * scale), "nodes", TARGET_NODES, ">=",
                   note=(note or f"renew every {args.interval:g} s")
                   + (f"; stopped at the first failing step ({rows[-1][0]})" if rows and rows[-1][-1] != "yes"
                      else "; did not reach a failing step")))
    rep.finish(args.json)


if __name__ == "__main__":
    main()
