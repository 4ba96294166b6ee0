"""Data paths through the apiserver to the kubelet, measured side by side in one run:

* port-forward throughput (kubectl port-forward over WebSocket-tunnelled SPDY and over plain SPDY) against a raw
  loopback TCP copy to the same sink (ratio);
* exec round trip (``kubectl exec POD -- true``) p50/p99, and over the Python client's stream();
* ``kubectl logs -f`` lines per second.
Measures; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.cluster import KUBECTL, Cluster, free_port

MODES = {"websocket": {}, "spdy": {"KUBECTL_PORT_FORWARD_WEBSOCKETS": "false",
                                   "KUBECTL_REMOTE_COMMAND_WEBSOCKETS": "false"}}


def sink_server() -> tuple[socket.socket, int]:
    """Reads a 8-byte length, then that many bytes, then answers b'done'."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)

    def serve() -> None:
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return

            def one(c: socket.socket = c) -> None:
                with c:
                    hdr = b""
                    while len(hdr) < 8:
                        hdr += c.recv(8 - len(hdr))
                    left = int.from_bytes(hdr, "big")
                    while left > 0:
                        b = c.recv(min(1 << 20, left))
                        if not b:
                            return
                        left -= len(b)
                    c.sendall(b"done")

            threading.Thread(target=one, daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return srv, int(srv.getsockname()[1])


def send(port: int, total: int) -> float:
    chunk = os.urandom(1 << 20)
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        t0 = time.perf_counter()
        s.sendall(total.to_bytes(8, "big"))
        sent = 0
        while sent < total:
            s.sendall(chunk)
            sent += len(chunk)
        assert s.recv(4) == b"done"
        return total / (time.perf_counter() - t0)


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(len(s) * p))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=256, help="MB per throughput run")
    ap.add_argument("--execs", type=int, default=30)
    ap.add_argument("--lines", type=int, default=200000)
    args = ap.parse_args()
    total = args.mb * 1024 * 1024
    with tempfile.TemporaryDirectory() as d:
        c = Cluster(Path(d) / "data")
        c.start()
        env0 = dict(os.environ, KUBECONFIG=str(c.kubeconfig), HOME=d)
        try:
            c.kubectl("run", "box", "--image=none", "--command", "--", "sleep", "3600")
            c.kubectl("wait", "--for=condition=Ready", "pod/box", "--timeout=30s")
            srv, port = sink_server()
            rows = []
            raw = statistics.median(send(port, total) for _ in range(3))
            rows.append(("raw loopback TCP", raw, 1.0))
            for mode, extra in MODES.items():
                local = free_port()
                pf = subprocess.Popen([KUBECTL, "port-forward", "pod/box", f"{local}:{port}"],
                                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                      env={**env0, **extra})
                assert pf.stdout is not None
                pf.stdout.readline()
                try:
                    bw = statistics.median(send(local, total) for _ in range(3))
                finally:
                    pf.terminate()
                    pf.wait(10)
                rows.append((f"port-forward ({mode})", bw, bw / raw))
            print(f"# port-forward throughput, {args.mb} MiB one way, median of 3 (same sink, same run)")
            print(f"{'path':28} {'MB/s':>9} {'ratio to raw':>13}")
            for name, bw, ratio in rows:
                print(f"{name:28} {bw / 1e6:9.1f} {ratio:13.3f}")
            print(f"\n# exec round trip: kubectl exec box -- true, {args.execs} runs each")
            print(f"{'mode':12} {'p50 ms':>8} {'p99 ms':>8}")
            for mode, extra in MODES.items():
                lat = []
                for _ in range(args.execs):
                    t0 = time.perf_counter()
                    subprocess.run([KUBECTL, "exec", "box", "--", "true"], env={**env0, **extra}, check=True,
                                   capture_output=True)
                    lat.append((time.perf_counter() - t0) * 1000)
                print(f"{mode:12} {pct(lat, 0.5):8.1f} {pct(lat, 0.99):8.1f}")
            from kubernetes import client, config
            from kubernetes.stream import stream

            api = client.CoreV1Api(config.new_client_from_config(config_file=str(c.kubeconfig)))
            lat = []
            for _ in range(args.execs):
                t0 = time.perf_counter()
                stream(api.connect_get_namespaced_pod_exec, "box", "default", command=["true"], stderr=True,
                       stdin=False, stdout=True, tty=False)
                lat.append((time.perf_counter() - t0) * 1000)
            print(f"{'python ws':12} {pct(lat, 0.5):8.1f} {pct(lat, 0.99):8.1f}   (no kubectl process start)")
            c.kubectl("run", "spam", "--image=none", "--restart=Never", "--command", "--", "sh", "-c",
                      f"seq 1 {args.lines}; sleep 600")
            c.kubectl("wait", "--for=condition=Ready", "pod/spam", "--timeout=30s")
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
            print(f"\n# kubectl logs -f: {n} lines in {dt:.2f} s = {n / dt:,.0f} lines/s")
            srv.close()
        finally:
            c.stop()


if __name__ == "__main__":
    main()
