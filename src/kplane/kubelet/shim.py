"""Per-container shim: ``python -m kplane.kubelet.shim <state_dir>``.

Detaches from its caller (double fork + setsid) so that restarting the node agent never kills a
container, starts the container process in its own session/process group, pumps its stdout/stderr
into a rotating CRI log, and records the outcome in the state dir:

* ``shim.pid``      -- ``"<shim pid> <proc starttime>"`` (written first)
* ``pid_starttime`` -- container process start time (``/proc/<pid>/stat`` field 22)
* ``started``       -- RFC3339 start time
* ``pid``           -- container pid (== its process group id); written last, signals "running"
* ``exit.json``     -- ``{"exitCode", "signal", "startedAt", "finishedAt", "reason", "message"?}``

All files are written atomically (temp file + rename).  Termination is driven by the runtime
signalling the container's process group; when the main process exits the shim kills whatever is
left in the group (like a PID namespace dying with its init) and writes ``exit.json``.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kplane.kubelet.crilog import RotatingLogWriter, format_ts

IDLE_FLUSH_S = 0.1
DRAIN_AFTER_EXIT_S = 2.0


def proc_stat(pid: int) -> tuple[str, int] | None:
    """``(state, starttime)`` of ``pid`` from ``/proc/<pid>/stat`` (starttime in clock ticks since
    boot, field 22), or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    try:
        fields = data[data.rindex(b")") + 2 :].split()  # fields[0] is field 3 (state)
        return fields[0].decode(), int(fields[19])
    except (ValueError, IndexError):
        return None


def proc_starttime(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot, or None if it does not exist."""
    st = proc_stat(pid)
    return None if st is None else st[1]


def atomic_write(path: Path, data: str | bytes) -> None:
    raw = data.encode() if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, raw)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def now_rfc3339() -> str:
    return format_ts(datetime.now(UTC))


def _write_exit(state: Path, *, code: int, sig: int | None, reason: str, started_at: str | None,
                message: str | None = None) -> None:
    info: dict[str, Any] = {
        "exitCode": code,
        "signal": sig,
        "startedAt": started_at,
        "finishedAt": now_rfc3339(),
        "reason": reason,
    }
    if message:
        info["message"] = message
    atomic_write(state / "exit.json", json.dumps(info))


def _detach(state: Path) -> None:
    """Double fork + setsid; only the grandchild returns."""
    pid = os.fork()
    if pid > 0:
        _, status = os.waitpid(pid, 0)
        os._exit(os.waitstatus_to_exitcode(status))
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    os.chdir("/")
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.close(devnull)
    errfd = os.open(state / "shim.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(errfd, 2)
    os.close(errfd)


def run(state: Path) -> int:
    spec = json.loads((state / "spec.json").read_text())
    argv: list[str] = list(spec["argv"])
    env: dict[str, str] = dict(spec.get("env") or {})
    cwd: str | None = spec.get("cwd") or None
    writer = RotatingLogWriter(spec["log"], max_bytes=int(spec.get("log_max_bytes", 10 * 1024 * 1024)),
                               max_files=int(spec.get("log_max_files", 5)))
    started_at = now_rfc3339()
    try:
        if not argv:
            raise ValueError("empty command")
        proc = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True, close_fds=True)
    except (OSError, ValueError) as e:
        if isinstance(e, OSError) and cwd is not None and e.filename == cwd:
            code, msg = 128, f"failed to start container: working directory {cwd!r}: {e.strerror}"
        elif isinstance(e, FileNotFoundError):
            code, msg = 127, f"failed to start container: executable {argv[0]!r} not found: {e.strerror}"
        elif isinstance(e, OSError):
            code, msg = 126, f"failed to start container: cannot execute {argv[0]!r}: {e.strerror}"
        else:
            code, msg = 128, f"failed to start container: {e}"
        try:
            writer.write_line("stderr", msg)
            writer.close()
        except OSError:
            pass
        _write_exit(state, code=code, sig=None, reason="StartError", started_at=started_at, message=msg)
        return 0

    st = proc_starttime(proc.pid)
    atomic_write(state / "pid_starttime", f"{st if st is not None else ''}\n")
    atomic_write(state / "started", started_at + "\n")
    atomic_write(state / "pid", f"{proc.pid}\n")

    assert proc.stdout is not None and proc.stderr is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout.fileno(), selectors.EVENT_READ, "stdout")
    sel.register(proc.stderr.fileno(), selectors.EVENT_READ, "stderr")
    exited_at: float | None = None
    while sel.get_map():
        events = sel.select(IDLE_FLUSH_S)
        if not events:
            writer.flush()
        for key, _ in events:
            fd = key.fd
            stream: str = key.data
            try:
                data = os.read(fd, 1 << 16)
            except OSError:
                data = b""
            if data:
                writer.write(stream, data)
            else:
                sel.unregister(fd)
                writer.flush(stream)
        if exited_at is None and proc.poll() is not None:
            exited_at = time.monotonic()
            # the container is over: kill anything left in its process group
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if exited_at is not None and time.monotonic() - exited_at > DRAIN_AFTER_EXIT_S:
            break  # something escaped the process group but holds our pipes
    sel.close()
    writer.close()
    rc = proc.wait()
    if rc < 0:
        code, sig = 128 - rc, -rc
    else:
        code, sig = rc, None
    _write_exit(state, code=code, sig=sig, reason="Completed" if code == 0 else "Error",
                started_at=started_at)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m kplane.kubelet.shim <state_dir>", file=sys.stderr)
        return 2
    state = Path(args[0]).resolve()
    if not (state / "spec.json").is_file():
        print(f"shim: {state}/spec.json not found", file=sys.stderr)
        return 2
    _detach(state)
    try:
        atomic_write(state / "shim.pid", f"{os.getpid()} {proc_starttime(os.getpid()) or ''}\n")
        return run(state)
    except BaseException:
        traceback.print_exc()
        if not (state / "exit.json").exists() and not (state / "pid").exists():
            try:
                _write_exit(state, code=128, sig=None, reason="StartError", started_at=None,
                            message="shim failed: " + traceback.format_exc(limit=1).strip())
            except OSError:
                pass
        return 1


if __name__ == "__main__":
    sys.exit(main())
