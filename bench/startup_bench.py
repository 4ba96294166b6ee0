"""Time from ``kplane up`` to a Ready node (cold: a new data dir each run) and the process's peak RSS.

The clock starts when the process is spawned and stops when kplane prints that the node is Ready (the node has
joined through discovery, TLS bootstrap and registration, all over HTTPS). Peak RSS is VmHWM of the kplane process
(control plane + agent); container shims are separate processes and are reported apart. Measures; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.cluster import free_port, stop_containers


def vm_hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def one_run(base: Path, i: int) -> tuple[float, int]:
    data = base / f"run{i}"
    cmd = [sys.executable, "-m", "kplane.cli", "up", "--data-dir", str(data), "--apiserver-port", str(free_port()),
           "--kubelet-port", str(free_port()), "--bind-address", "127.0.0.1"]
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert p.stdout is not None
    elapsed = float("nan")
    for line in p.stdout:
        if line.rstrip().endswith(" Ready"):
            elapsed = time.perf_counter() - t0
            break
    rss = vm_hwm_kib(p.pid)
    p.send_signal(signal.SIGINT)
    p.wait(20)
    stop_containers(data)
    return elapsed, rss


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=5, help="cold starts")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        runs = [one_run(Path(d), i) for i in range(args.n)]
    times = [r[0] for r in runs]
    print(f"# kplane up -> first Ready node, {args.n} cold starts (new data dir: new PKI, store, bootstrap)")
    print(f"# machine: {os.cpu_count()} cores, {sys.implementation.name} {sys.version.split()[0]}")
    print(f"{'run':>4} {'seconds':>8} {'peak RSS MiB':>13}")
    for i, (t, rss) in enumerate(runs):
        print(f"{i:4d} {t:8.2f} {rss / 1024:13.1f}")
    print(f"median {statistics.median(times):.2f} s, max peak RSS {max(r[1] for r in runs) / 1024:.1f} MiB")


if __name__ == "__main__":
    main()
