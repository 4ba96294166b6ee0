"""Data paths through the apiserver to the kubelet, measured side by side in one run:

* port-forward throughput: ``kubectl port-forward`` (WebSocket-tunnelled SPDY, kubectl's default, and plain SPDY)
  to a sink running *in a pod*, against a raw loopback TCP copy to the same sink program on the host (ratio), and
  a raw copy straight to the pod's IP when the pod has its own network namespace;
* the same through Konnectivity (``kplane up --egress konnectivity``) once that exists;
* exec round trip (``kubectl exec POD -- true``, both protocols, and the Python client's stream()) p50/p99;
* ``kubectl logs -f`` lines per second.

Each throughput figure is the median of ``--runs`` one-way copies of ``--mb`` MiB (the sink answers when it has
counted them all). Measures; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import Figure, Profiler, Report, machine_line, md_table, pct, proc_cpu
from tests.cluster import KUBECTL, Cluster, free_port

TARGET_DIRECT = 300e6
TARGET_KONNECTIVITY = 150e6
MODES = {"websocket": {}, "spdy": {"KUBECTL_PORT_FORWARD_WEBSOCKETS": "false",
                                   "KUBECTL_REMOTE_COMMAND_WEBSOCKETS": "false"}}

# Reads an 8-byte length then that many bytes, answers b"done"; one thread per connection.
SINK = r"""
import socket, sys, threading
srv = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], int(sys.argv[2])))
srv.listen(64)
def one(c):
    with c:
        hdr = b""
        while len(hdr) < 8:
            b = c.recv(8 - len(hdr))
            if not b:
                return
            hdr += b
        left = int.from_bytes(hdr, "big")
        buf = bytearray(1 << 20)
        while left > 0:
            n = c.recv_into(buf, min(len(buf), left))
            if not n:
                return
            left -= n
        c.sendall(b"done")
print("listening", flush=True)
while True:
    c, _ = srv.accept()
    threading.Thread(target=one, args=(c,), daemon=True).start()
"""


def send(host: str, port: int, total: int) -> float:
    chunk = os.urandom(1 << 20)
    with socket.create_connection((host, port), timeout=120) as s:
        t0 = time.perf_counter()
        s.sendall(total.to_bytes(8, "big"))
        sent = 0
        while sent < total:
            s.sendall(chunk)
            sent += len(chunk)
        if s.recv(4) != b"done":
            raise RuntimeError("the sink did not count every byte")
        return total / (time.perf_counter() - t0)


def wait_port(host: str, port: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def konnectivity_available() -> bool:
    """``kplane up --egress konnectivity`` exists (another piece of work adds it)."""
    out = subprocess.run([sys.executable, "-m", "kplane.cli", "up", "--help"], capture_output=True, text=True).stdout
    return "--egress" in out and "konnectivity" in out


def start_sink_pod(c: Cluster, port: int) -> str:
    """The sink as a pod; returns the pod's IP if it has its own network namespace, else ''."""
    manifest = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "sink"},
                "spec": {"containers": [{"name": "sink", "image": "none",
                                         "command": [sys.executable, "-c", SINK, "0.0.0.0", str(port)]}]}}
    import json

    c.kubectl("apply", "-f", "-", input=json.dumps(manifest))
    c.kubectl("wait", "--for=condition=Ready", "pod/sink", "--timeout=60s")
    deadline = time.monotonic() + 15
    while "listening" not in c.kubectl("logs", "sink", check=False).stdout:
        if time.monotonic() > deadline:
            raise RuntimeError("the sink pod does not listen")
        time.sleep(0.2)
    ips = c.kubectl("get", "pod", "sink", "-o", "jsonpath={.status.podIP} {.status.hostIP}").stdout.split()
    return ips[0] if len(ips) == 2 and ips[0] != ips[1] else ""


def port_forward(c: Cluster, env: dict[str, str], remote: int, measure: Callable[[int], float]) -> float:
    local = free_port()
    pf = subprocess.Popen([KUBECTL, "port-forward", "pod/sink", f"{local}:{remote}"], stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True, env=env)
    assert pf.stdout is not None
    try:
        pf.stdout.readline()  # "Forwarding from ..."
        return measure(local)
    finally:
        pf.terminate()
        pf.wait(10)


def throughput_rows(c: Cluster, env0: dict[str, str], args: argparse.Namespace, host_sink: int,
                    prof: Profiler | None = None, label: str = "") -> list[tuple[str, float, float]]:
    """(path, bytes/s, kplane CPU seconds per GB) rows."""
    total = args.mb * 1024 * 1024
    port = free_port()
    pod_ip = start_sink_pod(c, port)
    rows: list[tuple[str, float, float]] = []
    assert c.proc is not None
    pid = c.proc.pid

    def med(host: str, p: int) -> float:
        return statistics.median(send(host, p, total) for _ in range(args.runs))

    if host_sink:
        rows.append(("raw loopback TCP (host sink)", med("127.0.0.1", host_sink), float("nan")))
    if pod_ip:
        try:
            rows.append((f"raw TCP to the pod IP{label}", med(pod_ip, port), float("nan")))
        except OSError as exc:
            print(f"  (raw copy to pod IP {pod_ip} failed: {exc})", flush=True)
    for mode, extra in MODES.items():
        if prof is not None and mode == "websocket":
            prof.start(pid)
        cpu0 = proc_cpu(pid)
        try:
            bw = port_forward(c, {**env0, **extra}, port, lambda local: med("127.0.0.1", local))
        finally:
            if prof is not None:
                prof.stop()
        cpu = proc_cpu(pid) - cpu0
        rows.append((f"port-forward{label} ({mode})", bw, cpu / (total * args.runs / 1e9)))
    c.kubectl("delete", "pod", "sink", "--grace-period=0", "--force", check=False)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=256, help="MiB per throughput run")
    ap.add_argument("--runs", type=int, default=3, help="throughput runs per path (median)")
    ap.add_argument("--execs", type=int, default=30)
    ap.add_argument("--lines", type=int, default=200000)
    ap.add_argument("--only-throughput", action="store_true")
    ap.add_argument("--skip-direct", action="store_true",
                    help="only the Konnectivity pass (with --py-spy: profile it)")
    ap.add_argument("--json", help="write the figures here (for bench/report.py)")
    ap.add_argument("--py-spy", metavar="OUT", help="profile kplane during the WebSocket port-forward runs")
    args = ap.parse_args()
    rep = Report("streams")
    print(f"# {machine_line()}", flush=True)
    host_port = free_port()
    host_sink = subprocess.Popen([sys.executable, "-c", SINK, "127.0.0.1", str(host_port)],
                                 stdout=subprocess.DEVNULL)
    try:
        wait_port("127.0.0.1", host_port)
        if args.skip_direct:
            total = args.mb * 1024 * 1024
            rows = [("raw loopback TCP (host sink)",
                     statistics.median(send("127.0.0.1", host_port, total) for _ in range(args.runs)),
                     float("nan"))]
        else:
            with tempfile.TemporaryDirectory(prefix="kplane-bench-") as d:
                c = Cluster(Path(d) / "data")
                c.start()
                env0 = dict(os.environ, KUBECONFIG=str(c.kubeconfig), HOME=d)
                try:
                    rows = throughput_rows(c, env0, args, host_port, Profiler(args.py_spy))
                    if not args.only_throughput:
                        exec_rows, logs = exec_and_logs(c, env0, args)
                finally:
                    c.stop()
        kon_rows: list[tuple[str, float, float]] = []
        kon_note = "not measured: konnectivity not wired yet (no `kplane up --egress konnectivity`)"
        if konnectivity_available():
            with tempfile.TemporaryDirectory(prefix="kplane-bench-") as d:
                c = Cluster(Path(d) / "data", extra_args=["--egress", "konnectivity"])
                c.start()
                env0 = dict(os.environ, KUBECONFIG=str(c.kubeconfig), HOME=d)
                try:
                    kon_rows = throughput_rows(c, env0, args, 0, Profiler(args.py_spy) if args.skip_direct else None,
                                               label=" via konnectivity")
                    kon_note = ""
                finally:
                    c.stop()
    finally:
        host_sink.kill()
        host_sink.wait()
    raw = rows[0][1]
    table: list[list[Any]] = [[name, bw / 1e6, bw / raw, cpu] for name, bw, cpu in rows + kon_rows]
    if kon_note:
        table.append(["port-forward via konnectivity", kon_note, "", ""])
    rep.section(f"### Port-forward throughput to a sink in a pod, {args.mb} MiB one way, median of {args.runs} "
                f"(same sink program, same run)\n\n"
                + md_table(["path", "MB/s", "ratio to raw loopback", "kplane CPU s per GB"], table)
                + "\n\nkplane CPU: the `kplane up` process (apiserver, konnectivity server and kubelet in one "
                  "process, so one core at most) while the copies ran, per GB moved.")
    for name, bw, _cpu in rows + kon_rows:
        if name.startswith("port-forward"):
            target = TARGET_KONNECTIVITY if "konnectivity" in name else TARGET_DIRECT
            rep.add(Figure(name, bw / 1e6, "MB/s", target / 1e6, ">=", note=f"{bw / raw:.3f} of raw loopback"))
    if kon_note:
        rep.add(Figure("port-forward via konnectivity", None, "MB/s", TARGET_KONNECTIVITY / 1e6, ">=",
                       note=kon_note))
    if not args.only_throughput and not args.skip_direct:
        rep.section(f"### Exec round trip ({args.execs} runs each)\n\n"
                    + md_table(["client", "p50 ms", "p99 ms"], exec_rows)
                    + "\n\nkubectl rows include starting the kubectl process; the Python client row does not.")
        for name, p50, p99 in exec_rows:
            rep.add(Figure(f"exec round trip p99, {name}", p99, "ms", note=f"p50 {p50:.1f} ms"))
        n, dt = logs
        rep.section(f"### kubectl logs -f\n\n{n:,} lines in {dt:.2f} s = {n / dt:,.0f} lines/s")
        rep.add(Figure("kubectl logs -f", n / dt, "lines/s"))
    rep.finish(args.json)


def exec_and_logs(c: Cluster, env0: dict[str, str], args: argparse.Namespace) -> tuple[
        list[list[Any]], tuple[int, float]]:
    c.kubectl("run", "box", "--image=none", "--command", "--", "sleep", "3600")
    c.kubectl("wait", "--for=condition=Ready", "pod/box", "--timeout=60s")
    rows: list[list[Any]] = []
    for mode, extra in MODES.items():
        lat = []
        for _ in range(args.execs):
            t0 = time.perf_counter()
            subprocess.run([KUBECTL, "exec", "box", "--", "true"], env={**env0, **extra}, check=True,
                           capture_output=True)
            lat.append((time.perf_counter() - t0) * 1000)
        rows.append([f"kubectl ({mode})", pct(lat, 0.5), pct(lat, 0.99)])
    from kubernetes import client, config
    from kubernetes.stream import stream

    api = client.CoreV1Api(config.new_client_from_config(config_file=str(c.kubeconfig)))
    lat = []
    for _ in range(args.execs):
        t0 = time.perf_counter()
        stream(api.connect_get_namespaced_pod_exec, "box", "default", command=["true"], stderr=True,
               stdin=False, stdout=True, tty=False)
        lat.append((time.perf_counter() - t0) * 1000)
    rows.append(["python client (websocket)", pct(lat, 0.5), pct(lat, 0.99)])
    c.kubectl("run", "spam", "--image=none", "--restart=Never", "--command", "--", "sh", "-c",
              f"seq 1 {args.lines}; sleep 600")
    c.kubectl("wait", "--for=condition=Ready", "pod/spam", "--timeout=60s")
    time.sleep(1)
    t0 = time.perf_counter()
    f = subprocess.Popen([KUBECTL, "logs", "-f", "spam"], stdout=subprocess.PIPE, env=env0)
    assert f.stdout is not None
    n = 0
    for _line in f.stdout:
        n += 1
        if n >= args.lines:
            break
    dt = time.perf_counter() - t0
    f.kill()
    f.wait()
    return rows, (n, dt)


if __name__ == "__main__":
    main()
