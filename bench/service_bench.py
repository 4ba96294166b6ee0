"""Requests per second to one pod's HTTP server, measured side by side in one run:

* direct to the pod IP (the baseline),
* through the Service VIP (kube-proxy's nftables DNAT),
* through the apiserver's proxy subresources (services/NAME:PORT/proxy and pods/NAME:PORT/proxy, HTTPS with the
  admin certificate),

each as a ratio of the direct figure. The same load generator (asyncio + aiohttp, keep-alive, C concurrent
clients for S seconds) drives every target. Needs root for the pod network and the VIP; without it the VIP row
says why it is missing. Measures; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.cluster import Cluster, free_port

BACKEND = textwrap.dedent("""
    import asyncio, sys
    BODY = b"ok\\n"
    RESP = b"HTTP/1.1 200 OK\\r\\nContent-Type: text/plain\\r\\nContent-Length: 3\\r\\n\\r\\n" + BODY
    class P(asyncio.Protocol):
        def connection_made(self, t):
            self.t, self.buf = t, b""
        def data_received(self, d):
            self.buf += d
            while b"\\r\\n\\r\\n" in self.buf:
                _, self.buf = self.buf.split(b"\\r\\n\\r\\n", 1)
                self.t.write(RESP)
    async def main():
        loop = asyncio.get_running_loop()
        srv = await loop.create_server(P, "0.0.0.0", int(sys.argv[1]))
        await srv.serve_forever()
    asyncio.run(main())
""")


async def load(url: str, seconds: float, conc: int, ctx: ssl.SSLContext | None) -> tuple[float, float, float, int]:
    """(requests/s, p50 ms, p99 ms, errors)."""
    lat: list[float] = []
    errors = 0
    deadline = time.monotonic() + seconds
    connector = aiohttp.TCPConnector(ssl=ctx if ctx is not None else False, limit=conc)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=10)) as s:
        async def worker() -> None:
            nonlocal errors
            while time.monotonic() < deadline:
                t0 = time.perf_counter()
                try:
                    async with s.get(url) as r:
                        await r.read()
                        if r.status != 200:
                            errors += 1
                            continue
                except (aiohttp.ClientError, TimeoutError):
                    errors += 1
                    await asyncio.sleep(0.01)
                    continue
                lat.append(time.perf_counter() - t0)

        t_start = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(conc)))
        elapsed = time.monotonic() - t_start
    if not lat:
        return 0.0, float("nan"), float("nan"), errors
    lat.sort()
    return (len(lat) / elapsed, statistics.median(lat) * 1000, lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000,
            errors)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--concurrency", type=int, default=16)
    args = ap.parse_args()
    root = os.geteuid() == 0
    with tempfile.TemporaryDirectory(prefix="kplane-svc-bench-") as tmp:
        d = Path(tmp)
        d.chmod(0o755)
        script = d / "backend.py"
        script.write_text(BACKEND)
        cluster = Cluster(d / "data")
        cluster.start(timeout=60)
        try:
            port = free_port()
            pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web", "labels": {"app": "web"}},
                   "spec": {"containers": [{"name": "c", "image": "none",
                                            "command": [sys.executable, str(script), str(port)],
                                            "ports": [{"name": "http", "containerPort": port}]}]}}
            svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
                   "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80,
                                                                   "targetPort": "http"}]}}
            cluster.kubectl("apply", "-f", "-", input=json.dumps(pod))
            cluster.kubectl("apply", "-f", "-", input=json.dumps(svc))
            pod_ip = vip = ""
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                p = json.loads(cluster.kubectl("get", "pod", "web", "-o", "json").stdout)
                ep = cluster.kubectl("get", "endpoints", "web", "-o", "jsonpath={.subsets[0].addresses[0].ip}",
                                     check=False).stdout
                if p["status"].get("phase") == "Running" and ep:
                    pod_ip = p["status"]["podIP"]
                    break
                time.sleep(0.3)
            vip = json.loads(cluster.kubectl("get", "svc", "web", "-o", "json").stdout)["spec"]["clusterIP"]
            ctx = ssl.create_default_context(cafile=str(cluster.pki / "ca.crt"))
            ctx.load_cert_chain(str(cluster.pki / "admin.crt"), str(cluster.pki / "admin.key"))
            targets: list[tuple[str, str, ssl.SSLContext | None]] = [
                ("direct to the pod IP", f"http://{pod_ip}:{port}/", None),
                ("Service VIP (kube-proxy)", f"http://{vip}:80/", None),
                ("apiserver services/web:http/proxy", f"{cluster.url}/api/v1/namespaces/default/services/web:http/"
                                                      f"proxy/", ctx),
                ("apiserver pods/web:PORT/proxy", f"{cluster.url}/api/v1/namespaces/default/pods/web:{port}/proxy/",
                 ctx),
            ]
            time.sleep(1.0)  # kube-proxy's debounce and the endpoints have settled
            print(f"# {args.concurrency} keep-alive clients, {args.seconds:.0f} s per target; pod IP {pod_ip}, "
                  f"VIP {vip}{'' if root else ' (not root: no pod network, no VIP)'}")
            print(f"{'target':40s} {'req/s':>9s} {'p50 ms':>8s} {'p99 ms':>8s} {'errors':>7s} {'ratio':>7s}")
            base = None
            for name, url, c in targets:
                if "VIP" in name and not root:
                    print(f"{name:40s} {'not measured: kube-proxy needs root':>40s}")
                    continue
                rps, p50, p99, errs = asyncio.run(load(url, args.seconds, args.concurrency, c))
                if base is None:
                    base = rps or 1.0
                print(f"{name:40s} {rps:9.0f} {p50:8.2f} {p99:8.2f} {errs:7d} {rps / base:7.3f}")
        finally:
            cluster.stop()


if __name__ == "__main__":
    main()
