"""Shared pieces of the benchmarks: percentiles, Markdown tables, the figures each script reports (and writes as
JSON for ``bench/report.py``), the machine description, and a lean HTTP/1.1 keep-alive client over TLS.

The load generators use :class:`H1Conn` rather than aiohttp's client so that the load process spends as little
CPU as possible per request (the server and the load share this machine's cores). It speaks only what the
benchmarks need: one request at a time per connection, ``Content-Length`` or chunked responses.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import platform
import resource
import ssl
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def pct(samples: list[float], p: float) -> float:
    """The p-quantile (0..1) of ``samples`` by the nearest-rank method; NaN when empty."""
    if not samples:
        return float("nan")
    s = sorted(samples)
    return s[min(len(s) - 1, max(0, math.ceil(len(s) * p) - 1))]


def md_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table; numbers right-aligned."""
    cells = [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    numeric = [all(isinstance(r[i], int | float) for r in rows) and bool(rows) for i in range(len(headers))]
    out = ["| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |",
           "|" + "|".join(("-" * (w + 1) + ":") if n else ("-" * (w + 2)) for w, n in
                          zip(widths, numeric, strict=True)) + "|"]
    for r in cells:
        out.append("| " + " | ".join(c.rjust(w) if n else c.ljust(w) for c, w, n in
                                     zip(r, widths, numeric, strict=True)) + " |")
    return "\n".join(out)


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return "" if v is None else str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if v != v:
            return "n/a"
        if abs(v) >= 100:
            return f"{v:,.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        return f"{v:.2f}"
    return str(v)


@dataclass
class Figure:
    """One measured figure and, when it has one, its target (``op`` is ``<=`` or ``>=``)."""

    name: str
    value: float | None
    unit: str
    target: float | None = None
    op: str = "<="
    note: str = ""

    @property
    def met(self) -> bool | None:
        if self.target is None or self.value is None or self.value != self.value:
            return None
        return self.value <= self.target if self.op == "<=" else self.value >= self.target

    def ratio(self) -> float | None:
        """value / target (<= targets) or target / value (>= targets): above 1 means short of the target."""
        if self.target is None or not self.value:
            return None
        return self.value / self.target if self.op == "<=" else self.target / self.value


class Report:
    """Figures of one benchmark script; printed as a table and written as JSON with ``--json PATH``."""

    def __init__(self, bench: str) -> None:
        self.bench = bench
        self.figures: list[Figure] = []
        self.sections: list[str] = []

    def add(self, fig: Figure) -> Figure:
        self.figures.append(fig)
        return fig

    def section(self, text: str) -> None:
        """Print a block (a heading line and a table) and keep it for RESULTS.md."""
        print(text, flush=True)
        print(flush=True)
        self.sections.append(text)

    def summary(self) -> str:
        rows = []
        for f in self.figures:
            target = "" if f.target is None else f"{f.op} {_fmt(f.target)} {f.unit}"
            met = {True: "met", False: "NOT met", None: ""}[f.met]
            rows.append([f.name, "not measured" if f.value is None else f.value, f.unit, target, met, f.note])
        return md_table(["figure", "value", "unit", "target", "", "note"], rows)

    def finish(self, json_path: str | None) -> None:
        self.section(f"### {self.bench}: figures against targets\n\n{self.summary()}")
        if json_path:
            Path(json_path).write_text(json.dumps({
                "bench": self.bench, "figures": [{**asdict(f), "met": f.met} for f in self.figures],
                "sections": self.sections}, indent=1))


def machine() -> dict[str, str]:
    mem = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        k, _, v = line.partition(":")
        mem[k] = v.strip()
    cpu_model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu_model = line.split(":", 1)[1].strip()
            break
    load = os.getloadavg()
    return {
        "cores": str(os.cpu_count()),
        "nproc": subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip(),
        "cpu": cpu_model,
        "MemTotal": mem.get("MemTotal", ""),
        "MemAvailable": mem.get("MemAvailable", ""),
        "kernel": platform.release(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "loadavg": f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
    }


def cpu_probe() -> str:
    """How fast this machine's CPU is right now: ``openssl speed`` AES-128-GCM on 16 KiB blocks for 1 s. On a
    virtual machine whose host is shared the same code runs up to ~1.7x slower at busy times (3.85 vs 2.24 GB/s
    seen on one day here), so the figures of a run are read against it."""
    try:
        out = subprocess.run(["openssl", "speed", "-evp", "aes-128-gcm", "-seconds", "1", "-bytes", "16384"],
                             capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "n/a"
    for line in out.splitlines():
        if line.upper().startswith("AES-128-GCM"):
            try:
                return f"{float(line.split()[-1].rstrip('k')) * 1000 / 1e9:.2f} GB/s"
            except ValueError:
                break
    return "n/a"


def machine_line() -> str:
    m = machine()
    return (f"machine: {m['nproc']} cores ({m['cpu']}), {m['MemTotal']} RAM, Linux {m['kernel']}, {m['python']}, "
            f"load average {m['loadavg']}")


def raise_nofile(want: int = 65536) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    new = min(want, hard) if hard != resource.RLIM_INFINITY else want
    if new > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def client_ssl(ca: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.check_hostname = False  # the apiserver certificate names its advertise address; we dial 127.0.0.1
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key) if key else None)
    return ctx


class HTTPError(Exception):
    pass


class H1Conn:
    """One HTTP/1.1 keep-alive connection over TLS; requests are sent one at a time."""

    def __init__(self, host: str, port: int, ctx: ssl.SSLContext) -> None:
        self.host, self.port, self.ctx = host, port, ctx
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port, ssl=self.ctx,
                                                                 limit=1 << 22)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def send_head(self, method: str, path: str, body: bytes = b"",
                        content_type: str = "application/json") -> None:
        if self.writer is None:
            await self.connect()
        assert self.writer is not None
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nAccept: application/json\r\n"
        if body or method in ("POST", "PUT", "PATCH"):
            head += f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
        self.writer.write(head.encode() + b"\r\n" + body)

    async def read_head(self) -> tuple[int, dict[str, str]]:
        assert self.reader is not None
        raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for h in lines[1:]:
            k, sep, v = h.partition(":")
            if sep:
                headers[k.strip().lower()] = v.strip()
        return status, headers

    async def request(self, method: str, path: str, body: bytes = b"",
                      content_type: str = "application/json") -> tuple[int, bytes]:
        try:
            await self.send_head(method, path, body, content_type)
            status, headers = await self.read_head()
            assert self.reader is not None
            if "content-length" in headers:
                data = await self.reader.readexactly(int(headers["content-length"]))
            elif "chunked" in headers.get("transfer-encoding", ""):
                parts = []
                while True:
                    size = int((await self.reader.readline()).split(b";")[0].strip() or b"0", 16)
                    parts.append(await self.reader.readexactly(size + 2))
                    if size == 0:
                        break
                data = b"".join(p[:-2] for p in parts)
            else:
                data = await self.reader.read()
            if headers.get("connection", "").lower() == "close":
                self.close()
            return status, data
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            self.close()
            raise HTTPError(f"{method} {path}: {type(exc).__name__}: {exc}") from exc

    async def stream_lines(self, path: str) -> tuple[int, asyncio.StreamReader]:
        """GET ``path`` and return the status and a reader positioned at the (chunked) body; the caller reads
        the chunk framing itself with :func:`chunks`."""
        await self.send_head("GET", path)
        status, _headers = await self.read_head()
        assert self.reader is not None
        return status, self.reader


async def chunks(reader: asyncio.StreamReader) -> Any:
    """Yield the payloads of a chunked body until its last chunk."""
    while True:
        size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
        if size == 0:
            return
        data = await reader.readexactly(size + 2)
        yield data[:-2]


def now() -> float:
    """CLOCK_MONOTONIC: one clock for every process on this machine."""
    return time.monotonic()


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def git_commit() -> str:
    p = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no", "src"],
                           capture_output=True, text=True).stdout.strip()
    return p.stdout.strip() + (" (with uncommitted changes in src/)" if dirty else "")


class Profiler:
    """``py-spy record`` of one process while a benchmark runs (``--py-spy OUT``): collapsed stacks in OUT, for
    ``bench/profile_top.py``. py-spy is not a dependency: ``.venv/bin/pip install py-spy`` to use it."""

    def __init__(self, out: str | None) -> None:
        self.out = out
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, pid: int) -> None:
        if not self.out:
            return
        exe = Path(sys.executable).parent / "py-spy"
        self.proc = subprocess.Popen([str(exe) if exe.exists() else "py-spy", "record", "--nonblocking", "-r", os.environ.get("PYSPY_RATE", "200"), *os.environ.get("PYSPY_EXTRA", "").split(),
                                      "-f", "raw", "-o", self.out, "-p", str(pid)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(2)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            self.proc = None
