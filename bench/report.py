"""Run every benchmark and write ``bench/RESULTS.md``: the machine, the commit, every figure against its target
(met / not met), and each benchmark's own tables. ``make bench`` runs this.

    .venv/bin/python bench/report.py                 # everything, writes bench/RESULTS.md
    .venv/bin/python bench/report.py --only api,watch --no-write

Each benchmark also runs alone (``python bench/<name>_bench.py --help``). The part of RESULTS.md after the
``<!-- notes -->`` marker (profiles, what was changed, reasons) is written by hand and kept as it is.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import cpu_probe, git_commit, machine, md_table

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"
MARKER = "<!-- notes -->"

# name -> (script, extra arguments); the ones with targets write --json figures
BENCHES: dict[str, tuple[str, list[str]]] = {
    "startup": ("startup_bench.py", []),
    "api": ("api_bench.py", []),
    "nodes": ("node_bench.py", []),
    "watch": ("watch_bench.py", []),
    "streams": ("stream_bench.py", []),
    "service": ("service_bench.py", []),
}
WITH_JSON = {"startup", "api", "nodes", "watch", "streams"}

REASONS_HINT = "see the notes below"


def run(name: str, tmp: Path) -> tuple[dict[str, Any] | None, str, float, int]:
    script, extra = BENCHES[name]
    cmd = [sys.executable, str(HERE / script), *extra]
    out_json = tmp / f"{name}.json"
    if name in WITH_JSON:
        cmd += ["--json", str(out_json)]
    print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=HERE.parent)
    assert p.stdout is not None
    lines = []
    for line in p.stdout:
        print(line, end="", flush=True)
        lines.append(line)
    rc = p.wait()
    doc = json.loads(out_json.read_text()) if out_json.exists() else None
    return doc, "".join(lines), time.monotonic() - t0, rc


def render(results: dict[str, tuple[dict[str, Any] | None, str, float, int]], m0: dict[str, str],
           m1: dict[str, str], started: datetime, notes: str) -> str:
    load = (f"load average {m0['loadavg']} (1/5/15 min) before the run, {m1['loadavg']} after it (which "
            f"includes the benchmarks' own load)")
    busy = float(m0["loadavg"].split()[0])
    state = ("a quiet machine (1-min load average below 0.5 before the run)" if busy < 0.5 else
             f"a LOADED machine (1-min load average {busy:.2f} before the run: other work was running); figures "
             f"are worse than on a quiet machine")
    out = [
        "# Benchmark results",
        "",
        f"Written by `bench/report.py` (`make bench`) on {started:%Y-%m-%d %H:%M} UTC, commit "
        f"`{git_commit()}`. Taken on {state}.",
        "",
        "## Machine",
        "",
        md_table(["", ""], [
            ["cores (`nproc`)", m0["nproc"]], ["CPU", m0["cpu"]],
            ["RAM (/proc/meminfo MemTotal)", m0["MemTotal"]], ["MemAvailable at start", m0["MemAvailable"]],
            ["kernel", m0["kernel"]], ["Python", m0["python"]], ["load", load],
            ["CPU speed probe (`openssl speed` AES-128-GCM, 16 KiB, 1 s)",
             f"{m0.get('cpu_probe', 'n/a')} before the run, {m1.get('cpu_probe', 'n/a')} after it (this VM's host "
             "is shared: 3.85 GB/s on a fast period, 2.24 GB/s on a slow one, the same day)"],
        ]),
        "",
        "## Figures against targets",
        "",
    ]
    rows = []
    for name, (doc, _text, _secs, rc) in results.items():
        if doc is None:
            if name in WITH_JSON:
                rows.append([name, "benchmark failed" if rc else "no figures", "", "", "", f"exit code {rc}"])
            continue
        for f in doc["figures"]:
            target = "(none)" if f["target"] is None else f"{f['op']} {_num(f['target'])} {f['unit']}"
            met = {True: "met", False: "**not met**", None: ""}[f["met"]]
            value = "not measured" if f["value"] is None else f"{_num(f['value'])} {f['unit']}"
            rows.append([name, f["name"], value, target, met, f["note"]])
    out += [md_table(["bench", "figure", "value", "target", "", "note"], rows), "",
            "Why a target is not met, and what was profiled and changed: see the notes at the end.", ""]
    for name, (doc, text, secs, rc) in results.items():
        out += [f"## {name} ({secs:.0f} s{'' if rc == 0 else f', exit code {rc}'})", ""]
        if doc is not None:
            out += ["\n\n".join(s.replace("### ", "#### ") for s in doc["sections"]
                                if "figures against targets" not in s), ""]
        else:
            out += ["```", text.strip()[-6000:], "```", ""]
    out += [MARKER, notes.strip(), ""]
    return "\n".join(out)


def _num(v: float) -> str:
    if v == int(v) and abs(v) >= 10:
        return f"{int(v):,}"
    return f"{v:,.1f}" if abs(v) >= 10 else f"{v:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="comma-separated benchmarks: " + ",".join(BENCHES))
    ap.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    args = ap.parse_args()
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(BENCHES)
    for n in names:
        if n not in BENCHES:
            raise SystemExit(f"unknown benchmark {n!r}; choose from {', '.join(BENCHES)}")
    started = datetime.now(UTC)
    m0 = machine()
    m0["cpu_probe"] = cpu_probe()
    print(f"# machine: {m0}", flush=True)
    results = {}
    with tempfile.TemporaryDirectory(prefix="kplane-report-") as d:
        for n in names:
            if not (HERE / BENCHES[n][0]).exists():
                continue
            results[n] = run(n, Path(d))
    m1 = machine()
    m1["cpu_probe"] = cpu_probe()
    print(f"# CPU speed probe: {m0['cpu_probe']} before, {m1['cpu_probe']} after", flush=True)
    if args.no_write:
        return
    notes = ""
    if RESULTS.exists() and MARKER in RESULTS.read_text():
        notes = RESULTS.read_text().split(MARKER, 1)[1]
    RESULTS.write_text(render(results, m0, m1, started, notes))
    print(f"\nwrote {RESULTS.relative_to(Path(os.getcwd())) if RESULTS.is_relative_to(os.getcwd()) else RESULTS}")


if __name__ == "__main__":
    main()
