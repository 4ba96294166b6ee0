"""Per-container shim: ``python -m kplane.kubelet.shim <state_dir>``.

Detaches from its caller (double fork + setsid) so that restarting the node agent never kills a
container, starts the container process in its own session/process group, pumps its stdout/stderr
into a rotating CRI log, and records the outcome in the state dir:

* ``shim.pid``      -- ``"<shim pid> <proc starttime>"`` (written first)
* ``pid_starttime`` -- container process start time (``/proc/<pid>/stat`` field 22)
* ``started``       -- RFC3339 start time
* ``pid``           -- container pid (== its process group id); written last, signals "running"
* ``attach.sock``   -- Unix socket (0600) for ``kubectl attach`` while the container runs (see below)
* ``exit.json``     -- ``{"exitCode", "signal", "startedAt", "finishedAt", "reason", "message"?}``

All files are written atomically (temp file + rename).  Termination is driven by the runtime
signalling the container's process group; when the main process exits the shim kills whatever is
left in the group (like a PID namespace dying with its init) and writes ``exit.json``.

Attach: with ``"tty": true`` the container runs on a pty (its controlling terminal; all output is
stdout); with ``"stdin": true`` the shim holds the write side of its stdin.  Every client of
``attach.sock`` gets a copy of the output from the moment it connects, framed as 1 byte stream
(1 = stdout, 2 = stderr) + 4 byte big-endian length + data, and may send frames 0 (stdin data; an
empty one just announces a stdin client), 3 (resize: u16 BE width + u16 BE height) and 4 (close
stdin).  With ``"stdin_once": true`` the container's stdin is closed for good when the first stdin
client closes it or disconnects.  Output always goes to the CRI log too; a client that falls more
than ``CLIENT_OUT_MAX`` behind is dropped, so attached clients never stall the container.
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import termios
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


# ----------------------------------------------------------------------------- attach protocol
# Frames on ``attach.sock`` (both directions): 1 byte kind + 4 byte big-endian length + payload.
FRAME_STDIN = 0  # client -> shim: data for the container's stdin (an empty one marks a stdin client)
FRAME_STDOUT = 1  # shim -> client
FRAME_STDERR = 2  # shim -> client
FRAME_RESIZE = 3  # client -> shim: u16 BE width + u16 BE height
FRAME_CLOSE_STDIN = 4  # client -> shim
FRAME_HDR = struct.Struct(">BI")
MAX_FRAME = 1 << 20
CLIENT_OUT_MAX = 4 << 20  # a client further behind than this is dropped (never stalls the container)
STDIN_BUF_MAX = 1 << 20  # stop reading client input while this much stdin is pending
CLIENT_FLUSH_S = 1.0
ATTACH_SOCK = "attach.sock"
_STREAM_KIND = {"stdout": FRAME_STDOUT, "stderr": FRAME_STDERR}


def frame(kind: int, data: bytes = b"") -> bytes:
    return FRAME_HDR.pack(kind, len(data)) + data


def sock_path(state: Path) -> tuple[str, int | None]:
    """An AF_UNIX address for ``<state>/attach.sock`` that fits in sun_path (108 bytes): long state dirs
    are reached through ``/proc/self/fd/<dirfd>``; the caller closes the returned dir fd (if any)."""
    full = str(state / ATTACH_SOCK)
    if len(full.encode()) < 100:
        return full, None
    dfd = os.open(state, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    return f"/proc/self/fd/{dfd}/{ATTACH_SOCK}", dfd


def set_winsize(fd: int, width: int, height: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))


def _set_ctty() -> None:  # runs in the container child after setsid(): the pty becomes its terminal
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class _Client:
    __slots__ = ("inbuf", "out", "sock", "stdin")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.inbuf = bytearray()
        self.out = bytearray()
        self.stdin = False  # announced itself as a stdin client (for stdinOnce)


class _Mux:
    """Fans the container's output out to the CRI log and attached clients; feeds client stdin in."""

    def __init__(self, writer: RotatingLogWriter, outputs: dict[int, str], stdin_fd: int | None, *,
                 tty_fd: int | None, stdin_once: bool, listener: socket.socket | None) -> None:
        self.writer = writer
        self.outputs = outputs
        self.stdin_fd = stdin_fd
        self.tty_fd = tty_fd
        self.stdin_once = stdin_once
        self.listener = listener
        self.clients: dict[int, _Client] = {}
        self.stdin_buf = bytearray()
        self.stdin_close_pending = False
        for fd in [*outputs, *([stdin_fd] if stdin_fd is not None else [])]:
            os.set_blocking(fd, False)

    # ---- stdin
    def _close_stdin(self) -> None:
        if self.stdin_fd is None:
            return
        if self.stdin_fd == self.tty_fd:
            # a pty cannot be half-closed: send EOF (^D) like a terminal user would, then stop writing
            if not self.stdin_close_pending:
                self.stdin_buf += b"\x04"
            self.stdin_close_pending = True
            if self.stdin_buf:
                return
            self.stdin_fd = None
            return
        if self.stdin_buf:
            self.stdin_close_pending = True
            return
        os.close(self.stdin_fd)
        self.stdin_fd = None

    def _pump_stdin(self) -> None:
        if self.stdin_fd is None:
            self.stdin_buf.clear()
            return
        while self.stdin_buf:
            try:
                n = os.write(self.stdin_fd, self.stdin_buf[:1 << 16])
            except BlockingIOError:
                return
            except OSError:  # the container closed its stdin (EPIPE) or the pty hung up (EIO)
                self.stdin_buf.clear()
                if self.stdin_fd != self.tty_fd:
                    os.close(self.stdin_fd)
                self.stdin_fd = None
                return
            del self.stdin_buf[:n]
        if self.stdin_close_pending:
            self._close_stdin()

    # ---- clients
    def _drop(self, fd: int) -> None:
        c = self.clients.pop(fd, None)
        if c is None:
            return
        try:
            c.sock.close()
        except OSError:
            pass
        if c.stdin and self.stdin_once:
            self._close_stdin()  # stdinOnce: the stdin client went away -> stdin stays closed

    def _accept(self) -> None:
        assert self.listener is not None
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            sock.setblocking(False)
            self.clients[sock.fileno()] = _Client(sock)

    def _client_input(self, fd: int) -> None:
        c = self.clients[fd]
        try:
            data = c.sock.recv(1 << 16)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(fd)
            return
        c.inbuf += data
        while len(c.inbuf) >= FRAME_HDR.size:
            kind, n = FRAME_HDR.unpack_from(c.inbuf)
            if n > MAX_FRAME:
                self._drop(fd)
                return
            if len(c.inbuf) < FRAME_HDR.size + n:
                break
            payload = bytes(c.inbuf[FRAME_HDR.size:FRAME_HDR.size + n])
            del c.inbuf[:FRAME_HDR.size + n]
            if kind == FRAME_STDIN:
                c.stdin = True
                if self.stdin_fd is not None and not self.stdin_close_pending:
                    self.stdin_buf += payload
            elif kind == FRAME_CLOSE_STDIN:
                c.stdin = True
                if self.stdin_once:
                    self._close_stdin()
            elif kind == FRAME_RESIZE and len(payload) == 4 and self.tty_fd is not None:
                w, h = struct.unpack(">HH", payload)
                try:
                    set_winsize(self.tty_fd, w, h)
                except OSError:
                    pass

    def _client_output(self, fd: int) -> None:
        c = self.clients[fd]
        while c.out:
            try:
                n = c.sock.send(c.out[:1 << 18])
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._drop(fd)
                return
            del c.out[:n]

    def _broadcast(self, stream: str, data: bytes) -> None:
        if not self.clients:
            return
        fr = frame(_STREAM_KIND[stream], data)
        for fd, c in list(self.clients.items()):
            if len(c.out) + len(fr) > CLIENT_OUT_MAX:
                print(f"shim: dropping attached client fd {fd}: too slow", file=sys.stderr)
                self._drop(fd)
            else:
                c.out += fr

    # ---- output
    def _read_output(self, fd: int) -> None:
        stream = self.outputs[fd]
        try:
            data = os.read(fd, 1 << 16)
        except BlockingIOError:
            return
        except OSError:  # EIO: the pty's slave side is gone
            data = b""
        if data:
            self.writer.write(stream, data)
            self._broadcast(stream, data)
        else:
            del self.outputs[fd]
            self.writer.flush(stream)

    def poll_once(self, timeout_s: float) -> bool:
        """One round of I/O; False if it timed out without any event."""
        masks: dict[int, int] = {}

        def want(fd: int, m: int) -> None:
            masks[fd] = masks.get(fd, 0) | m

        for fd in self.outputs:
            want(fd, select.POLLIN)
        if self.listener is not None:
            want(self.listener.fileno(), select.POLLIN)
        accept_input = len(self.stdin_buf) < STDIN_BUF_MAX
        for fd, c in self.clients.items():
            want(fd, (select.POLLIN if accept_input else 0) | (select.POLLOUT if c.out else 0))
        if self.stdin_buf and self.stdin_fd is not None:
            want(self.stdin_fd, select.POLLOUT)
        p = select.poll()
        for fd, m in masks.items():
            p.register(fd, m)
        try:
            events = p.poll(timeout_s * 1000)
        except InterruptedError:
            return True
        for fd, ev in events:
            if fd in self.outputs and ev & (select.POLLIN | select.POLLHUP | select.POLLERR):
                self._read_output(fd)
            if self.listener is not None and fd == self.listener.fileno():
                self._accept()
                continue
            if fd in self.clients and ev & select.POLLOUT:
                self._client_output(fd)
            if fd in self.clients and ev & (select.POLLIN | select.POLLHUP | select.POLLERR):
                self._client_input(fd)
            if fd == self.stdin_fd and ev & (select.POLLOUT | select.POLLERR | select.POLLHUP):
                self._pump_stdin()
        if self.stdin_buf and self.stdin_fd is not None:
            self._pump_stdin()  # opportunistic: most writes succeed at once
        return bool(events)

    def close_listener(self, path: str | None) -> None:
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        if path:
            try:
                os.unlink(path)
            except OSError:
                pass

    def finish(self) -> None:
        """Give attached clients a bounded time to receive what is left, then hang up on them."""
        deadline = time.monotonic() + CLIENT_FLUSH_S
        while any(c.out for c in self.clients.values()) and time.monotonic() < deadline:
            p = select.poll()
            for fd, c in self.clients.items():
                if c.out:
                    p.register(fd, select.POLLOUT)
            for fd, _ in p.poll(100):
                if fd in self.clients:
                    self._client_output(fd)
        for fd in list(self.clients):
            c = self.clients.pop(fd)
            try:
                c.sock.close()
            except OSError:
                pass
        if self.stdin_fd is not None and self.stdin_fd != self.tty_fd:
            try:
                os.close(self.stdin_fd)
            except OSError:
                pass
        self.stdin_fd = None


def _listen(state: Path) -> tuple[socket.socket | None, str | None]:
    """Bind ``<state>/attach.sock`` (mode 0600); (None, None) if that fails (attach is then unavailable)."""
    path = str(state / ATTACH_SOCK)
    addr, dfd = sock_path(state)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        sock.bind(addr)
        os.chmod(path, 0o600)
        sock.listen(16)
        sock.setblocking(False)
    except OSError:
        traceback.print_exc()
        sock.close()
        return None, None
    finally:
        os.umask(old)
        if dfd is not None:
            os.close(dfd)
    return sock, path


def run(state: Path) -> int:
    spec = json.loads((state / "spec.json").read_text())
    argv: list[str] = list(spec["argv"])
    env: dict[str, str] = dict(spec.get("env") or {})
    cwd: str | None = spec.get("cwd") or None
    tty = bool(spec.get("tty"))
    want_stdin = bool(spec.get("stdin"))
    writer = RotatingLogWriter(spec["log"], max_bytes=int(spec.get("log_max_bytes", 10 * 1024 * 1024)),
                               max_files=int(spec.get("log_max_files", 5)))
    started_at = now_rfc3339()
    netns = spec.get("netns")
    if netns:  # the pod's network namespace: the shim joins it, so the container and its children are in it
        from kplane.kubelet.nsutil import enter_netns

        try:
            enter_netns(str(netns))
        except OSError as e:
            msg = f"failed to start container: cannot join network namespace {netns}: {e.strerror or e}"
            try:
                writer.write_line("stderr", msg)
                writer.close()
            except OSError:
                pass
            _write_exit(state, code=128, sig=None, reason="StartError", started_at=started_at, message=msg)
            return 0
    listener, sock_file = _listen(state)
    parent_fds: list[int] = []  # our ends
    child_fds: list[int] = []  # the container's ends, closed here once it runs
    kw: dict[str, Any] = {}
    try:
        if not argv:
            raise ValueError("empty command")
        if tty:
            master, slave = os.openpty()
            parent_fds.append(master)
            child_fds.append(slave)
            if "TERM" not in env:
                env["TERM"] = "xterm"
            kw = {"stdin": slave, "stdout": slave, "stderr": slave, "preexec_fn": _set_ctty}
        else:
            stdin: Any = subprocess.DEVNULL
            if want_stdin:
                r, w = os.pipe()
                parent_fds.append(w)
                child_fds.append(r)
                stdin = r
            kw = {"stdin": stdin, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
        proc = subprocess.Popen(argv, env=env, cwd=cwd, start_new_session=True, close_fds=True, **kw)
    except (OSError, ValueError, subprocess.SubprocessError) as e:
        for fd in parent_fds + child_fds:
            os.close(fd)
        if listener is not None:
            listener.close()
        if sock_file:
            Path(sock_file).unlink(missing_ok=True)
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
    for fd in child_fds:
        os.close(fd)

    st = proc_starttime(proc.pid)
    atomic_write(state / "pid_starttime", f"{st if st is not None else ''}\n")
    atomic_write(state / "started", started_at + "\n")
    atomic_write(state / "pid", f"{proc.pid}\n")

    if tty:
        outputs = {parent_fds[0]: "stdout"}
        stdin_fd: int | None = parent_fds[0] if want_stdin else None
        tty_fd: int | None = parent_fds[0]
    else:
        assert proc.stdout is not None and proc.stderr is not None
        outputs = {proc.stdout.fileno(): "stdout", proc.stderr.fileno(): "stderr"}
        stdin_fd = parent_fds[0] if want_stdin else None
        tty_fd = None
    mux = _Mux(writer, outputs, stdin_fd, tty_fd=tty_fd, stdin_once=bool(spec.get("stdin_once")),
               listener=listener)
    exited_at: float | None = None
    while mux.outputs:
        if not mux.poll_once(IDLE_FLUSH_S):
            writer.flush()
        if exited_at is None and proc.poll() is not None:
            exited_at = time.monotonic()
            # the container is over: kill anything left in its process group
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if exited_at is not None and time.monotonic() - exited_at > DRAIN_AFTER_EXIT_S:
            break  # something escaped the process group but holds our pipes
    mux.close_listener(sock_file)
    writer.close()
    rc = proc.wait()
    if rc < 0:
        code, sig = 128 - rc, -rc
    else:
        code, sig = rc, None
    _write_exit(state, code=code, sig=sig, reason="Completed" if code == 0 else "Error",
                started_at=started_at)
    mux.finish()
    for fd in parent_fds:
        try:
            os.close(fd)
        except OSError:
            pass
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
