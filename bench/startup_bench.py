"""``kplane up`` to the first Ready node (cold starts), and the memory of the whole all-in-one cluster.

Cold start: a new data dir each run (new PKI, store, bootstrap token); the clock starts when the process is spawned
(interpreter start and imports included) and stops when kplane prints that its node is Ready (the node joined
through discovery, TLS bootstrap and registration over HTTPS). Median of ``-n`` runs.

Memory: one more cluster, sampled every 100 ms from spawn until 10 pods run and a few seconds after. Counted at
each sample, summed over every process of the cluster:

* ``kplane``: the ``kplane up`` process (apiserver, controllers, node agent and kubelet in one process) and any
  helper processes it has at that moment;
* ``shim``: the node's container shim (``python -m kplane.kubelet.shim <node runtime root>``, one per node,
  detached, supervising all of the node's containers), and while it is being started its short-lived launcher
  (the same command line);
* ``containers``: the pods' own processes (here ``sleep``, children of the shim), reported apart: they are the
  workload.

The figure is the peak of the summed RSS of kplane + shim (PSS, which splits shared pages fairly, is shown next
to it). Measures; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import Figure, Report, machine_line, md_table
from tests.cluster import Cluster, claim_net_index, free_port, stop_containers

TARGET_S = 1.5
TARGET_MB = 150.0


def kplane_cmd(data: Path, net_index: int) -> list[str]:
    c = Cluster(data, net_index=net_index)
    return [sys.executable, "-m", "kplane.cli", "up", "--data-dir", str(data), "--apiserver-port", str(c.port),
            "--kubelet-port", str(free_port()), "--cluster-cidr", c.cluster_cidr, "--service-cluster-ip-range",
            c.service_cidr]


def byte_compile() -> str:
    """Byte-compile kplane as ``pip install`` does: a run with PYTHONDONTWRITEBYTECODE=1 (set in some
    environments) would otherwise compile every module from source at every start."""
    import kplane

    pkg = Path(kplane.__file__).parent
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(pkg)], check=False, capture_output=True)
    return str(pkg)


def cold_start(base: Path, i: int, net_index: int) -> tuple[float, float]:
    data = base / f"run{i}"
    t0 = time.perf_counter()
    p = subprocess.Popen(kplane_cmd(data, net_index), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert p.stdout is not None
    api = ready = float("nan")
    try:
        for line in p.stdout:
            if "apiserver ready" in line:
                api = time.perf_counter() - t0
            if line.rstrip().endswith(" Ready"):
                ready = time.perf_counter() - t0
                break
    finally:
        p.send_signal(signal.SIGINT)
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()
        stop_containers(data)
    return api, ready


# --- memory ------------------------------------------------------------------------------------------------


def _proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (ppid, cmdline) for every process."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
            cmd = Path(f"/proc/{d}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError):
            continue
        out[int(d)] = (ppid, cmd)
    return out


def classify(main_pid: int, data_dir: Path) -> dict[int, str]:
    """Every process of the cluster: ``kplane`` (the main process and its helpers), ``shim`` (the node's shim and
    its launcher), ``container`` (what runs under a shim)."""
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)

    def descendants(pid: int) -> list[int]:
        out, todo = [], [pid]
        while todo:
            p = todo.pop()
            for c in children.get(p, []):
                out.append(c)
                todo.append(c)
        return out

    classes: dict[int, str] = {}
    shims = [pid for pid, (_, cmd) in table.items() if "kplane.kubelet.shim" in cmd and str(data_dir) in cmd]
    for s in shims:
        classes[s] = "shim"
        for c in descendants(s):
            classes[c] = "container"
    if main_pid in table:
        classes[main_pid] = "kplane"
        for c in descendants(main_pid):
            classes.setdefault(c, "kplane")
    return classes


def _kib(pid: int, file: str, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/{file}").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


class Sampler(threading.Thread):
    """Samples RSS and PSS of the cluster's processes, by class, every ``period`` seconds."""

    def __init__(self, data_dir: Path, period: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.data_dir = data_dir
        self.period = period
        self.pid = 0
        self.stop = threading.Event()
        self.samples: list[tuple[float, dict[str, tuple[int, int, int]]]] = []  # class -> (n, rss, pss)

    def run(self) -> None:
        t0 = time.perf_counter()
        while not self.stop.is_set():
            if self.pid:
                by: dict[str, tuple[int, int, int]] = {}
                for pid, cls in classify(self.pid, self.data_dir).items():
                    n, rss, pss = by.get(cls, (0, 0, 0))
                    by[cls] = (n + 1, rss + _kib(pid, "status", "VmRSS:"), pss + _kib(pid, "smaps_rollup", "Pss:"))
                self.samples.append((time.perf_counter() - t0, by))
            self.stop.wait(self.period)

    def peak(self, classes: tuple[str, ...], idx: int) -> tuple[float, dict[str, tuple[int, int, int]]]:
        return max(self.samples, key=lambda s: sum(s[1].get(c, (0, 0, 0))[idx] for c in classes))


POD = """apiVersion: v1
kind: Pod
metadata: {{name: mem-{i}}}
spec:
  containers:
  - {{name: c, image: none, command: [sleep, "3600"]}}
"""


def memory_run(base: Path, pods: int, hold_s: float, net_index: int, pod_network: str) -> Sampler:
    data = base / "mem"
    s = Sampler(data)
    s.start()
    c = Cluster(data, net_index=net_index, extra_args=["--pod-network", pod_network])
    try:
        c.start()
        assert c.proc is not None
        s.pid = c.proc.pid
        c.kubectl("apply", "-f", "-", input="---\n".join(POD.format(i=i) for i in range(pods)))
        c.kubectl("wait", "--for=condition=Ready", "pod", "--all", "--timeout=120s")
        end = time.monotonic() + hold_s
        while time.monotonic() < end:
            c.kubectl("get", "pods,nodes,configmaps", "-A")
    finally:
        s.stop.set()
        s.join()
        c.stop()
    return s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=5, help="cold starts")
    ap.add_argument("--pods", type=int, default=10)
    ap.add_argument("--hold", type=float, default=5.0, help="seconds to keep sampling once the pods run")
    ap.add_argument("--pod-network", choices=("auto", "host"), default="auto",
                    help="for the memory run (auto: a network namespace per pod as root)")
    ap.add_argument("--json", help="write the figures here (for bench/report.py)")
    args = ap.parse_args()
    rep = Report("startup")
    print(f"# {machine_line()}", flush=True)
    net_index = claim_net_index()
    pkg = byte_compile()
    with tempfile.TemporaryDirectory(prefix="kplane-bench-") as d:
        runs = [cold_start(Path(d), i, net_index) for i in range(args.n)]
        mem = memory_run(Path(d), args.pods, args.hold, net_index, args.pod_network)
    times = [r[1] for r in runs]
    rep.section(f"### kplane up -> first Ready node, {args.n} cold starts (new data dir each: new PKI, store, "
                f"bootstrap; {pkg} byte-compiled first, as an installed package is)\n\n" + md_table(["run", "apiserver ready s", "node Ready s"],
                                              [[i, a, t] for i, (a, t) in enumerate(runs)]))
    med = statistics.median(times)
    rep.add(Figure("kplane up -> Ready node (median)", med, "s", TARGET_S,
                   note=f"min {min(times):.2f} s, max {max(times):.2f} s"))

    counted = ("kplane", "shim")
    t_rss, by_rss = mem.peak(counted, 1)
    t_pss, by_pss = mem.peak(counted, 2)
    rows = []
    for cls in ("kplane", "shim", "container"):
        n, rss, pss = by_rss.get(cls, (0, 0, 0))
        rows.append([cls, n, rss / 1024, pss / 1024, "yes" if cls in counted else "no (the workload)"])
    peak_rss = sum(by_rss.get(c, (0, 0, 0))[1] for c in counted) / 1024
    peak_pss = sum(by_pss.get(c, (0, 0, 0))[2] for c in counted) / 1024
    last = mem.samples[-1][1] if mem.samples else {}
    steady = sum(last.get(c, (0, 0, 0))[1] for c in counted) / 1024
    rows.append(["**counted total**", sum(by_rss.get(c, (0, 0, 0))[0] for c in counted), peak_rss,
                 sum(by_rss.get(c, (0, 0, 0))[2] for c in counted) / 1024, ""])
    rep.section(f"### Memory of the all-in-one cluster: 1 node, {args.pods} running pods, --pod-network "
                f"{args.pod_network} (sampled every 100 ms, "
                f"{len(mem.samples)} samples; breakdown at the RSS peak, t={t_rss:.1f} s)\n\n"
                + md_table(["processes", "count", "RSS MiB", "PSS MiB", "counted"], rows)
                + f"\n\nPeak PSS of kplane + shim: {peak_pss:.1f} MiB (t={t_pss:.1f} s). RSS at the last sample: "
                  f"{steady:.1f} MiB. RSS counts pages shared between the Python processes (interpreter, "
                  f"libraries) once per process; PSS splits them.")
    rep.add(Figure(f"peak RSS, kplane + node shim, {args.pods} pods", peak_rss, "MiB", TARGET_MB,
                   note=f"PSS {peak_pss:.0f} MiB; containers themselves not counted"))
    rep.finish(args.json)


if __name__ == "__main__":
    main()
