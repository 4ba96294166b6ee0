"""The node's container shim: ``python -m kplane.kubelet.shim <runtime root> [--idle-exit SECONDS]``.

One detached process per runtime root -- that is, per node: simulated nodes on one machine each have their own
root and their own shim -- supervises every container of that node in one single-threaded poll loop, as
containerd groups containers under a shim. A Python interpreter costs at least ~8 MiB of RSS however little it
imports, so one shim per container would cost that much for every container.

**Trade-off: one shim per node means a crash of the shim loses supervision of every container on that node at
once.** The containers keep running (each is in its own session), but from then on their output is not logged,
attach stops working and their exit codes are lost: the runtime reports each of them as
``ContainerStatusUnknown`` once it dies. With one shim per container a crash cost one container. The shim limits
the damage of its own errors to one container: a failure to start a container, an unexpected error while
supervising one (which kills that container and records the error as its exit), or a misbehaving attach client
(which is dropped) never stops the shim or touches the other containers.

Life cycle. The runtime starts the shim when it first starts a container and finds none answering (``main``
detaches with a double fork + setsid, so restarting the node agent never kills it). An exclusive ``flock`` on
``<root>/shim.lock``, held for the shim's whole life, guarantees a single shim per root: a shim started while
another holds the lock says ``busy`` and exits. The shim listens on ``<root>/shim.sock`` (mode 0600; peers must
be root or the shim's own uid) and exits on its own once it has supervised no container for ``--idle-exit``
seconds (never in its first ``STARTUP_GRACE_S``, so that it gets its first request; at once when idle and its
root is gone). Exiting, it unlinks the socket first, answers "retry" to what was already queued and closes, so a
request is either answered or never acted on; the runtime then starts a new shim and retries. Retrying never starts a container twice: the shim claims a state dir by creating its
``shim.pid`` exclusively (``link(2)``) before starting anything, and answers ``already`` for a claimed one.

Control protocol: one request per connection, one JSON object on one line (at most ``MAX_REQUEST`` bytes), one
JSON line back:

* ``{"op": "start", "dir": "<root>/containers/<id>"}`` -> ``{"ok": true, "pid": N}``; ``{"ok": true, "exit": code,
  "message": ...}`` when the container could not be started (recorded as a StartError in its ``exit.json``);
  ``{"ok": true, "already": true}`` for a state dir some shim has claimed already;
* ``{"op": "ping"}`` -> ``{"ok": true, "pid": <shim pid>, "containers": N}``;
* anything else, or a refused state dir -> ``{"ok": false, "error": "..."}``, and nothing was started
  (``"retry": true`` added while the shim is exiting).

A state dir is accepted only as exactly ``<root>/containers/<id>`` (absolute, normalized, a direct child of the
shim's own containers directory, ``<id>`` a valid container id), a real directory (not a symlink) owned by the
shim's uid, holding a well-formed ``spec.json``. Files in it are written relative to the directory's fd,
atomically (temp file + rename):

* ``shim.pid``      -- ``"<shim pid> <proc starttime>"`` of the shim that claimed it (written first)
* ``pid_starttime`` -- container process start time (``/proc/<pid>/stat`` field 22)
* ``started``       -- RFC3339 start time
* ``pid``           -- container pid (== its process group id); written last, signals "running"
* ``attach.sock``   -- Unix socket (0600) for ``kubectl attach`` while the container runs (see below)
* ``exit.json``     -- ``{"exitCode", "signal", "startedAt", "finishedAt", "reason", "message"?}``
* ``shim.log``      -- what the shim has to say about this container (it also goes to ``<root>/shim.log``)

The container runs in its own session/process group, in the pod's network namespace if the spec names one
(entered between fork and exec, in the child: the shim itself stays in its own), with its stdout/stderr pumped
into a rotating CRI log. Termination is driven by the runtime signalling the container's process group; when the
main process exits the shim kills whatever is left in the group (like a PID namespace dying with its init) and
writes ``exit.json``.

Attach: with ``"tty": true`` the container runs on a pty (its controlling terminal; all output is stdout); with
``"stdin": true`` the shim holds the write side of its stdin. Every client of ``attach.sock`` gets a copy of the
output from the moment it connects, framed as 1 byte stream (1 = stdout, 2 = stderr) + 4 byte big-endian length
+ data, and may send frames 0 (stdin data; an empty one just announces a stdin client), 3 (resize: u16 BE width +
u16 BE height) and 4 (close stdin). With ``"stdin_once": true`` the container's stdin is closed for good when the
first stdin client closes it or disconnects. Output always goes to the CRI log too; a client that falls more
than ``CLIENT_OUT_MAX`` behind is dropped, so attached clients never stall the container.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import resource
import select
import signal
import socket
import struct
import subprocess
import sys
import termios
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kplane.kubelet.crilog import RotatingLogWriter, format_ts

IDLE_FLUSH_S = 0.1  # a partial line is written out once its stream has been quiet this long
DRAIN_AFTER_EXIT_S = 2.0
DEFAULT_IDLE_EXIT_S = 10.0
STARTUP_GRACE_S = 2.0  # a new shim waits at least this long for its first request, whatever its idle time
CONTROL_SOCK = "shim.sock"
LOCK_FILE = "shim.lock"
SHIM_LOG = "shim.log"
MAX_REQUEST = 64 * 1024
MAX_SPEC = 16 << 20
MAX_CONTROL_CLIENTS = 64
CONTROL_TIMEOUT_S = 10.0  # a control connection that has not sent its request by then is closed
MAX_ATTACH_CLIENTS = 32  # per container
_SAFETY_WAKE_S = 5.0  # longest poll while containers run (exits normally wake the loop through SIGCHLD)
_IDLE_WAKE_S = 1.0  # while idle: how often the shim checks that its root still exists

ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,252}")


def valid_id(name: str) -> bool:
    """A container id (also the name of its state dir): never a path, never ``..``."""
    return isinstance(name, str) and ID_RE.fullmatch(name) is not None and ".." not in name


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


def now_rfc3339() -> str:
    return format_ts(datetime.now(UTC))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _write_at(dfd: int, name: str, data: str | bytes, *, sync: bool = False) -> None:
    """Atomically replace ``name`` in the directory ``dfd`` (temp file + rename). Only ``exit.json`` is fsynced:
    the pid files mean nothing after a reboot anyway."""
    raw = data.encode() if isinstance(data, str) else data
    tmp = f".{name}.tmp.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644, dir_fd=dfd)
    try:
        _write_all(fd, raw)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)


def _claim(dfd: int, text: str) -> bool:
    """Create ``shim.pid`` in ``dfd`` with ``text`` unless it exists: atomic, with its content (``link(2)`` of a
    finished temp file fails with EEXIST if another shim, or an earlier request, got there first)."""
    tmp = f".shim.pid.tmp.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644, dir_fd=dfd)
    try:
        _write_all(fd, text.encode())
    finally:
        os.close(fd)
    try:
        os.link(tmp, "shim.pid", src_dir_fd=dfd, dst_dir_fd=dfd)
        return True
    except FileExistsError:
        return False
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dfd)


def _exit_doc(*, code: int, sig: int | None, reason: str, started_at: str | None,
              message: str | None = None) -> str:
    info: dict[str, Any] = {
        "exitCode": code,
        "signal": sig,
        "startedAt": started_at,
        "finishedAt": now_rfc3339(),
        "reason": reason,
    }
    if message:
        info["message"] = message
    return json.dumps(info)


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


def sock_path(directory: Path, name: str = ATTACH_SOCK) -> tuple[str, int | None]:
    """An AF_UNIX address for ``<directory>/<name>`` that fits in sun_path (108 bytes): long paths are reached
    through ``/proc/self/fd/<dirfd>``; the caller closes the returned dir fd (if any)."""
    full = str(directory / name)
    if len(full.encode()) < 100:
        return full, None
    dfd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    return f"/proc/self/fd/{dfd}/{name}", dfd


def set_winsize(fd: int, width: int, height: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))


def _listen_at(dfd: int, name: str, backlog: int) -> socket.socket:
    """A non-blocking listening Unix socket ``name`` (mode 0600) in the directory ``dfd`` (bound through
    ``/proc/self/fd``: any path length, and the directory the caller checked)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=dfd)
        sock.bind(f"/proc/self/fd/{dfd}/{name}")
        os.chmod(name, 0o600, dir_fd=dfd)
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old)
    return sock


def _note(msg: str) -> None:
    print(f"{now_rfc3339()} shim[{os.getpid()}]: {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- one container

@dataclass
class _Spec:
    argv: list[str]
    env: dict[str, str]
    cwd: str | None
    log: str
    log_max_bytes: int
    log_max_files: int
    tty: bool
    stdin: bool
    stdin_once: bool
    netns: str | None


def _load_spec(dfd: int) -> _Spec:
    """``spec.json`` of a state dir, checked field by field; ValueError says what is wrong."""
    try:
        fd = os.open("spec.json", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
    except OSError as e:
        raise ValueError(f"cannot open spec.json: {e.strerror or e}") from None
    try:
        if os.fstat(fd).st_size > MAX_SPEC:
            raise ValueError(f"spec.json is larger than {MAX_SPEC} bytes")
        raw = bytearray()
        while chunk := os.read(fd, 1 << 20):
            raw += chunk
            if len(raw) > MAX_SPEC:
                raise ValueError(f"spec.json is larger than {MAX_SPEC} bytes")
    finally:
        os.close(fd)
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"spec.json is not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise ValueError("spec.json is not an object")

    def opt_str(key: str) -> str | None:
        v = doc.get(key)
        if v is not None and not isinstance(v, str):
            raise ValueError(f"{key!r} must be a string")
        return v or None

    def integer(key: str, default: int) -> int:
        v = doc.get(key, default)
        if not isinstance(v, int) or isinstance(v, bool):
            raise ValueError(f"{key!r} must be an integer")
        return v

    # types only: what the kernel refuses (a NUL byte, "=" in a name) is the container's StartError
    argv = doc.get("argv")
    if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
        raise ValueError("'argv' must be a list of strings")
    env = doc.get("env") or {}
    if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
        raise ValueError("'env' must map names to strings")
    log = opt_str("log")
    if log is None or not os.path.isabs(log) or "\0" in log:
        raise ValueError("'log' must be an absolute path")
    cwd = opt_str("cwd")
    if cwd is not None and not os.path.isabs(cwd):
        raise ValueError("'cwd' must be an absolute path")
    return _Spec(argv=argv, env=dict(env), cwd=cwd, log=log,
                 log_max_bytes=integer("log_max_bytes", 10 * 1024 * 1024),
                 log_max_files=integer("log_max_files", 5), tty=bool(doc.get("tty")),
                 stdin=bool(doc.get("stdin")), stdin_once=bool(doc.get("stdin_once")), netns=opt_str("netns"))


def _child_setup(netns_fd: int | None, tty: bool) -> Callable[[], None] | None:
    """What the container child does between fork and exec (after setsid): join the pod's network namespace and
    make the pty its controlling terminal. Safe in a preexec function because the shim has one thread."""
    if netns_fd is None and not tty:
        return None
    join: Callable[[int], None] | None = None
    if netns_fd is not None:
        from kplane.kubelet import nsutil

        join = nsutil.setns

    def setup() -> None:
        if join is not None and netns_fd is not None:
            join(netns_fd)
        if tty:
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    return setup


class _Client:
    __slots__ = ("inbuf", "out", "sock", "stdin")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.inbuf = bytearray()
        self.out = bytearray()
        self.stdin = False  # announced itself as a stdin client (for stdinOnce)


Handler = Callable[[int, int], None]


class _Container:
    """One supervised container: its process, its output pipes (or pty), its CRI log and its attach clients.
    Everything here runs in the shim's loop; nothing blocks."""

    def __init__(self, cid: str, key: tuple[int, int], dfd: int, spec: _Spec) -> None:
        self.cid = cid
        self.key = key
        self.dfd = dfd  # the state dir (an fd: checked once, then used for every file)
        self.spec = spec
        self.started_at = now_rfc3339()
        self.proc: subprocess.Popen[bytes] | None = None
        self.writer: RotatingLogWriter | None = None
        self.outputs: dict[int, str] = {}  # fd -> stream
        self.pipe_outputs: set[int] = set()  # those of ``outputs`` closed at EOF (a pty master is kept)
        self.own_fds: list[int] = []  # pty master / stdin write end, closed when done
        self.stdin_fd: int | None = None
        self.tty_fd: int | None = None
        self.listener: socket.socket | None = None
        self.clients: dict[int, _Client] = {}
        self.stdin_buf = bytearray()
        self.stdin_close_pending = False
        self.dirty = False  # partial lines buffered in the writer
        self.last_out = 0.0
        self.exited_at: float | None = None  # the main process has exited (monotonic)
        self.closing_until: float | None = None  # exit.json written; attach clients drain until then
        self.failed = False
        self.error: str | None = None  # why supervising it failed (goes into exit.json)
        self.done = False

    def note(self, msg: str) -> None:
        """Log about this container: to the shared shim log and its own ``shim.log``."""
        _note(f"{self.cid}: {msg}")
        try:
            fd = os.open(SHIM_LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644,
                         dir_fd=self.dfd)
            try:
                _write_all(fd, f"{now_rfc3339()} {msg}\n".encode())
            finally:
                os.close(fd)
        except OSError:
            pass

    # ---- start
    def start(self) -> dict[str, Any]:
        """Start the container process; a failure is recorded as a StartError (never raises for the container's
        own faults: bad command, cwd, namespace, log path)."""
        spec = self.spec
        try:
            self.writer = RotatingLogWriter(spec.log, max_bytes=spec.log_max_bytes, max_files=spec.log_max_files)
        except OSError as e:
            return self._start_error(128, f"failed to start container: cannot open its log {spec.log}: "
                                          f"{e.strerror or e}")
        netns_fd: int | None = None
        if spec.netns:
            try:
                netns_fd = os.open(spec.netns, os.O_RDONLY | os.O_CLOEXEC)
            except (OSError, ValueError) as e:
                return self._start_error(128, f"failed to start container: cannot join network namespace "
                                              f"{spec.netns}: {getattr(e, 'strerror', None) or e}")
        try:
            self.listener = _listen_at(self.dfd, ATTACH_SOCK, 16)
        except OSError as e:
            self.note(f"attach is unavailable: cannot listen on {ATTACH_SOCK}: {e}")
        parent_fds: list[int] = []  # our ends
        child_fds: list[int] = []  # the container's ends, closed here once it runs
        env = dict(spec.env)
        try:
            if not spec.argv:
                raise ValueError("empty command")
            if spec.tty:
                master, slave = os.openpty()
                parent_fds.append(master)
                child_fds.append(slave)
                env.setdefault("TERM", "xterm")
                fds: tuple[Any, Any, Any] = (slave, slave, slave)
            else:
                out_r, out_w = os.pipe()
                parent_fds.append(out_r)
                child_fds.append(out_w)
                err_r, err_w = os.pipe()
                parent_fds.append(err_r)
                child_fds.append(err_w)
                stdin: Any = subprocess.DEVNULL
                if spec.stdin:
                    in_r, in_w = os.pipe()
                    parent_fds.append(in_w)
                    child_fds.append(in_r)
                    stdin = in_r
                fds = (stdin, out_w, err_w)
            proc = subprocess.Popen(spec.argv, env=env, cwd=spec.cwd, start_new_session=True, close_fds=True,
                                    stdin=fds[0], stdout=fds[1], stderr=fds[2],
                                    preexec_fn=_child_setup(netns_fd, spec.tty))
        except (OSError, ValueError, subprocess.SubprocessError) as e:
            for fd in parent_fds:
                os.close(fd)
            self._close_listener()
            argv0 = spec.argv[0] if spec.argv else ""
            if isinstance(e, OSError) and spec.cwd is not None and e.filename == spec.cwd:
                code, msg = 128, f"failed to start container: working directory {spec.cwd!r}: {e.strerror}"
            elif isinstance(e, FileNotFoundError):
                code, msg = 127, f"failed to start container: executable {argv0!r} not found: {e.strerror}"
            elif isinstance(e, OSError):
                code, msg = 126, f"failed to start container: cannot execute {argv0!r}: {e.strerror}"
            elif isinstance(e, subprocess.SubprocessError) and spec.netns:
                code, msg = 128, f"failed to start container: cannot join network namespace {spec.netns}"
            else:
                code, msg = 128, f"failed to start container: {e}"
            return self._start_error(code, msg)
        finally:
            for fd in child_fds:
                os.close(fd)
            if netns_fd is not None:
                os.close(netns_fd)
        self.proc = proc
        if spec.tty:
            self.outputs = {parent_fds[0]: "stdout"}
            self.own_fds = [parent_fds[0]]
            self.tty_fd = parent_fds[0]
            self.stdin_fd = parent_fds[0] if spec.stdin else None
        else:
            self.outputs = {parent_fds[0]: "stdout", parent_fds[1]: "stderr"}
            self.pipe_outputs = set(self.outputs)
            if spec.stdin:
                self.stdin_fd = parent_fds[2]
                self.own_fds = [parent_fds[2]]
        for fd in [*self.outputs, *self.own_fds]:
            os.set_blocking(fd, False)
        st = proc_starttime(proc.pid)
        _write_at(self.dfd, "pid_starttime", f"{st if st is not None else ''}\n")
        _write_at(self.dfd, "started", self.started_at + "\n")
        _write_at(self.dfd, "pid", f"{proc.pid}\n")
        return {"ok": True, "pid": proc.pid}

    def _start_error(self, code: int, msg: str) -> dict[str, Any]:
        self.note(msg)
        if self.writer is not None:
            try:
                self.writer.write_line("stderr", msg)
                self.writer.close()
            except OSError:
                pass
            self.writer = None
        _write_at(self.dfd, "exit.json", _exit_doc(code=code, sig=None, reason="StartError",
                                                   started_at=self.started_at, message=msg), sync=True)
        self.done = True
        return {"ok": True, "exit": code, "message": msg}

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
        self._close_own(self.stdin_fd)
        self.stdin_fd = None

    def _close_own(self, fd: int) -> None:
        if fd in self.own_fds:
            self.own_fds.remove(fd)
            os.close(fd)

    def pump_stdin(self, _fd: int = -1, _ev: int = 0) -> None:
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
                    self._close_own(self.stdin_fd)
                self.stdin_fd = None
                return
            del self.stdin_buf[:n]
        if self.stdin_close_pending:
            self._close_stdin()

    # ---- attach clients
    def _drop(self, fd: int) -> None:
        c = self.clients.pop(fd, None)
        if c is None:
            return
        with contextlib.suppress(OSError):
            c.sock.close()
        if c.stdin and self.spec.stdin_once:
            self._close_stdin()  # stdinOnce: the stdin client went away -> stdin stays closed

    def accept(self, _fd: int, _ev: int) -> None:
        while self.listener is not None:
            try:
                sock, _ = self.listener.accept()
            except OSError:  # nothing pending (EAGAIN), or out of fds
                return
            if len(self.clients) >= MAX_ATTACH_CLIENTS:
                self.note(f"refusing an attach client: already {MAX_ATTACH_CLIENTS}")
                sock.close()
                continue
            sock.setblocking(False)
            self.clients[sock.fileno()] = _Client(sock)

    def client_event(self, fd: int, ev: int) -> None:
        """An attach client's event; whatever goes wrong with it drops that client, nothing else."""
        try:
            if fd in self.clients and ev & select.POLLOUT:
                self._client_output(fd)
            if fd in self.clients and ev & (select.POLLIN | select.POLLHUP | select.POLLERR):
                self._client_input(fd)
        except Exception:
            self.note(f"dropping attached client fd {fd} after an error:\n{traceback.format_exc()}")
            self._drop(fd)

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
                self.note(f"dropping attached client fd {fd}: frame of {n} bytes")
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
                if self.spec.stdin_once:
                    self._close_stdin()
            elif kind == FRAME_RESIZE and len(payload) == 4 and self.tty_fd is not None:
                w, h = struct.unpack(">HH", payload)
                with contextlib.suppress(OSError):
                    set_winsize(self.tty_fd, w, h)
        if self.stdin_buf and self.stdin_fd is not None:
            self.pump_stdin()  # most writes succeed at once

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
                self.note(f"dropping attached client fd {fd}: too slow")
                self._drop(fd)
            else:
                c.out += fr

    # ---- output
    def read_output(self, fd: int, _ev: int) -> None:
        stream = self.outputs.get(fd)
        if stream is None:
            return
        try:
            data = os.read(fd, 1 << 16)
        except BlockingIOError:
            return
        except OSError:  # EIO: the pty's slave side is gone
            data = b""
        assert self.writer is not None
        if data:
            self.writer.write(stream, data)
            self.dirty = True
            self.last_out = time.monotonic()
            self._broadcast(stream, data)
        else:
            del self.outputs[fd]
            if fd in self.pipe_outputs:
                self.pipe_outputs.discard(fd)
                os.close(fd)
            self.writer.flush(stream)

    # ---- the loop's view
    def register(self, want: Callable[[int, int, Handler], None]) -> None:
        if self.closing_until is not None:  # exit recorded: only what is left for the clients
            for fd, c in self.clients.items():
                if c.out:
                    want(fd, select.POLLOUT, self.client_event)
            return
        for fd in self.outputs:
            want(fd, select.POLLIN, self.read_output)
        if self.listener is not None:
            want(self.listener.fileno(), select.POLLIN, self.accept)
        accept_input = len(self.stdin_buf) < STDIN_BUF_MAX
        for fd, c in self.clients.items():
            m = (select.POLLIN if accept_input else 0) | (select.POLLOUT if c.out else 0)
            if m:
                want(fd, m, self.client_event)
        if self.stdin_buf and self.stdin_fd is not None:
            want(self.stdin_fd, select.POLLOUT, self.pump_stdin)

    def deadline(self) -> float | None:
        """The next time :meth:`tick` has something to do without any event (monotonic), if any."""
        ts = []
        if self.dirty:
            ts.append(self.last_out + IDLE_FLUSH_S)
        if self.exited_at is not None and self.closing_until is None:
            ts.append(self.exited_at + DRAIN_AFTER_EXIT_S)
        if self.closing_until is not None:
            ts.append(self.closing_until)
        return min(ts) if ts else None

    def tick(self, now: float) -> None:
        if self.done:
            return
        if self.dirty and now - self.last_out >= IDLE_FLUSH_S and self.writer is not None:
            self.dirty = False
            self.writer.flush()
        if self.proc is not None and self.exited_at is None and self.proc.poll() is not None:
            self.exited_at = now
            # the container is over: kill anything left in its process group
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        if self.exited_at is not None and self.closing_until is None and (
                not self.outputs or now - self.exited_at > DRAIN_AFTER_EXIT_S):
            # the drain limit: something escaped the process group but holds our pipes
            self._record_exit(now)
        if self.closing_until is not None and (now >= self.closing_until or not any(
                c.out for c in self.clients.values())):
            self.close()

    def _record_exit(self, now: float) -> None:
        assert self.proc is not None and self.proc.returncode is not None
        self._close_listener()
        for fd in list(self.outputs):
            if fd in self.pipe_outputs:
                os.close(fd)
        self.outputs.clear()
        self.pipe_outputs.clear()
        if self.writer is not None:
            writer, self.writer = self.writer, None
            writer.close()
        rc = self.proc.returncode
        code, sig = (128 - rc, -rc) if rc < 0 else (rc, None)
        reason = "Completed" if code == 0 and self.error is None else "Error"
        _write_at(self.dfd, "exit.json", _exit_doc(code=code, sig=sig, reason=reason, started_at=self.started_at,
                                                   message=self.error), sync=True)
        self.closing_until = now + CLIENT_FLUSH_S

    def _close_listener(self) -> None:
        if self.listener is not None:
            self.listener.close()
            self.listener = None
            with contextlib.suppress(OSError):
                os.unlink(ATTACH_SOCK, dir_fd=self.dfd)

    def close(self) -> None:
        """Release everything (the exit is recorded, or supervision was abandoned). Never raises."""
        self.done = True
        for fd in list(self.clients):
            c = self.clients.pop(fd)
            with contextlib.suppress(OSError):
                c.sock.close()
        with contextlib.suppress(Exception):
            self._close_listener()
        for fd in [*self.pipe_outputs, *self.own_fds]:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.pipe_outputs.clear()
        self.own_fds.clear()
        self.outputs.clear()
        self.stdin_fd = self.tty_fd = None
        if self.writer is not None:
            with contextlib.suppress(Exception):
                self.writer.close()
            self.writer = None
        with contextlib.suppress(OSError):
            os.close(self.dfd)

    def fail(self, where: str) -> None:
        """Supervising this container hit an unexpected error (a bug, or an I/O error on its log or state dir): log
        it, kill the container and let its exit be recorded with the error. The other containers are not
        touched."""
        self.note(f"error while {where}; killing the container:\n{traceback.format_exc()}")
        exc = sys.exc_info()[1]
        self.error = f"kplane shim: error while {where}: {exc!r}"
        self.failed = True
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(OSError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        for fd in list(self.clients):
            self._drop(fd)
        self._close_listener()
        for fd in list(self.outputs):  # no more reading: the handler that failed may fail again
            if fd in self.pipe_outputs:
                os.close(fd)
        self.outputs.clear()
        self.pipe_outputs.clear()
        self.dirty = False
        self.stdin_buf.clear()
        self.stdin_fd = None

    def abandon(self) -> None:
        """Even recording the failure failed: best-effort exit.json, then forget the container."""
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(OSError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        if self.closing_until is None:
            rc = self.proc.returncode if self.proc is not None else None
            if self.proc is None:  # it never ran
                code, sig, reason = 128, None, "StartError"
            else:
                code, sig = (137, None) if rc is None else ((128 - rc, -rc) if rc < 0 else (rc, None))
                reason = "Error"
            with contextlib.suppress(Exception):
                _write_at(self.dfd, "exit.json", _exit_doc(
                    code=code, sig=sig, reason=reason, started_at=self.started_at,
                    message=self.error or "kplane shim: supervising this container failed"))
        self.close()


# ----------------------------------------------------------------------------- the shim

class _Control:
    __slots__ = ("deadline", "inbuf", "out", "reading", "sock")

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline
        self.inbuf = bytearray()
        self.out = bytearray()
        self.reading = True


def _error(msg: str, **extra: Any) -> dict[str, Any]:
    return {"ok": False, "error": msg, **extra}


class _Interest:
    """The fds one loop iteration polls, and who handles each (``owner``: the container, if any)."""

    def __init__(self) -> None:
        self.masks: dict[int, int] = {}
        self.handlers: dict[int, tuple[_Container | None, Handler]] = {}
        self.owner: _Container | None = None

    def want(self, fd: int, mask: int, handler: Handler) -> None:
        self.masks[fd] = self.masks.get(fd, 0) | mask
        self.handlers[fd] = (self.owner, handler)


class Shim:
    """The loop supervising every container of one runtime root."""

    def __init__(self, root: Path, idle_exit_s: float, lock_fd: int) -> None:
        self.root = root
        self.containers_path = str(root / "containers")
        self.idle_exit_s = idle_exit_s
        self.lock_fd = lock_fd
        self.lock_ino = os.fstat(lock_fd).st_ino
        self.root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.containers_fd = os.open("containers", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                                     dir_fd=self.root_fd)
        self.pid_line = f"{os.getpid()} {proc_starttime(os.getpid()) or ''}\n"
        # by the state dir's (device, inode): a removed container may still be finishing when a new one of the
        # same id is started
        self.containers: dict[tuple[int, int], _Container] = {}
        self.zombies: list[subprocess.Popen[bytes]] = []  # processes of abandoned containers, still to reap
        self.controls: dict[int, _Control] = {}
        self.requests: list[tuple[_Control, bytes]] = []
        self.idle_since = time.monotonic() + max(0.0, STARTUP_GRACE_S - idle_exit_s)
        self.uid = os.geteuid()
        self.listener: socket.socket | None = _listen_at(self.root_fd, CONTROL_SOCK, 128)
        # container exits wake the loop: SIGCHLD writes a byte to this pipe
        self.wake_r, wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(wake_w, False)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        self._wake_w = wake_w

    # ---- control connections
    def _accept(self, _fd: int, _ev: int) -> None:
        while self.listener is not None:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            self._add_control(sock)

    def _add_control(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        ctl = _Control(sock, time.monotonic() + CONTROL_TIMEOUT_S)
        self.controls[sock.fileno()] = ctl
        try:
            _, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                             struct.calcsize("3i")))
        except OSError:
            uid = -1
        if uid not in (0, self.uid):
            self._reply(ctl, _error("permission denied"))
        elif len(self.controls) > MAX_CONTROL_CLIENTS:
            self._reply(ctl, _error("too many control connections", retry=True))

    def _control_event(self, fd: int, ev: int) -> None:
        ctl = self.controls.get(fd)
        if ctl is None:
            return
        if ev & select.POLLOUT and ctl.out:
            self._send(ctl)
        if not ctl.reading or fd not in self.controls or not ev & (select.POLLIN | select.POLLHUP | select.POLLERR):
            return
        try:
            data = ctl.sock.recv(MAX_REQUEST + 1)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close_control(ctl)
            return
        ctl.inbuf += data
        nl = ctl.inbuf.find(b"\n")
        if nl >= 0 and nl <= MAX_REQUEST:
            ctl.reading = False
            self.requests.append((ctl, bytes(ctl.inbuf[:nl])))
        elif len(ctl.inbuf) > MAX_REQUEST:
            self._reply(ctl, _error(f"request too large (at most {MAX_REQUEST} bytes)"))

    def _reply(self, ctl: _Control, doc: dict[str, Any]) -> None:
        ctl.reading = False
        ctl.inbuf.clear()
        ctl.out += json.dumps(doc).encode() + b"\n"
        self._send(ctl)

    def _send(self, ctl: _Control) -> None:
        try:
            while ctl.out:
                del ctl.out[:ctl.sock.send(ctl.out)]
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            ctl.out.clear()
        self._close_control(ctl)

    def _close_control(self, ctl: _Control) -> None:
        self.controls.pop(ctl.sock.fileno(), None)
        with contextlib.suppress(OSError):
            ctl.sock.close()

    def handle(self, line: bytes) -> dict[str, Any]:
        try:
            req = json.loads(line)
        except (ValueError, RecursionError):  # RecursionError: nested too deep
            return _error("malformed request: not a JSON object on one line")
        if not isinstance(req, dict):
            return _error("malformed request: not a JSON object")
        op = req.get("op")
        if op == "ping":
            return {"ok": True, "pid": os.getpid(), "containers": len(self.containers)}
        if op == "start":
            return self._start(req.get("dir"))
        return _error(f"unknown op {op!r}")

    def _start(self, path: Any) -> dict[str, Any]:
        if not isinstance(path, str) or not path or len(path) > 4096 or "\0" in path:
            return _error("'dir' must be the state dir's path")
        if not os.path.isabs(path) or os.path.normpath(path) != path:
            return _error(f"refusing state dir {path!r}: not an absolute normalized path")
        parent, name = os.path.split(path)
        if parent != self.containers_path:
            return _error(f"refusing state dir {path!r}: not a directory of {self.containers_path}")
        if not valid_id(name):
            return _error(f"refusing state dir {path!r}: {name!r} is not a container id")
        try:
            dfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.containers_fd)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                return _error(f"refusing state dir {path!r}: not a directory (symlinks are refused)")
            return _error(f"refusing state dir {path!r}: {e.strerror or e}")
        keep = False
        try:
            st = os.fstat(dfd)
            if st.st_uid != self.uid:
                return _error(f"refusing state dir {path!r}: not owned by uid {self.uid}")
            try:
                spec = _load_spec(dfd)
            except ValueError as e:
                return _error(f"refusing state dir {path!r}: {e}")
            if not _claim(dfd, self.pid_line):
                return {"ok": True, "already": True}
            c = _Container(name, (st.st_dev, st.st_ino), dfd, spec)
            keep = True
        finally:
            if not keep:
                os.close(dfd)
        try:
            reply = c.start()
        except Exception:
            with contextlib.suppress(Exception):
                c.fail("starting it")
            if c.proc is None:  # nothing runs: record the failure now
                c.abandon()
                return {"ok": True, "exit": 128, "message": c.error}
            reply = {"ok": True, "pid": c.proc.pid}
        if c.done:
            c.close()
        else:
            self.containers[c.key] = c
        return reply

    # ---- the loop
    def _container_failed(self, c: _Container, where: str) -> None:
        try:
            if c.failed:
                raise RuntimeError("failed again")
            c.fail(where)
        except Exception:
            _note(f"{c.cid}: abandoning it:\n{traceback.format_exc()}")
            c.abandon()
            if c.proc is not None and c.proc.returncode is None:
                self.zombies.append(c.proc)
            self.containers.pop(c.key, None)

    def _root_gone(self) -> bool:
        try:
            return os.stat(LOCK_FILE, dir_fd=self.root_fd).st_ino != self.lock_ino
        except OSError:
            return True

    def run(self) -> None:
        """Until idle for ``idle_exit_s``. An unexpected error in the loop itself (not in one container's
        handling, which :meth:`_iterate` confines to that container) is logged and the loop goes on."""
        while True:
            now = time.monotonic()
            if self.containers or self.controls or self.requests:
                self.idle_since = now
            elif now - self.idle_since >= self.idle_exit_s or self._root_gone():
                if self._exit():
                    return
                continue
            try:
                self._iterate(now)
            except Exception:
                _note(f"error in the loop:\n{traceback.format_exc()}")
                time.sleep(0.1)

    def _iterate(self, now: float) -> None:
        w = _Interest()
        w.want(self.wake_r, select.POLLIN, self._drain_wake)
        if self.listener is not None:
            w.want(self.listener.fileno(), select.POLLIN, self._accept)
        for fd, ctl in self.controls.items():
            w.want(fd, (select.POLLIN if ctl.reading else 0) | (select.POLLOUT if ctl.out else 0),
                   self._control_event)
        deadlines = [ctl.deadline for ctl in self.controls.values()]
        for c in self.containers.values():
            w.owner = c
            c.register(w.want)
            d = c.deadline()
            if d is not None:
                deadlines.append(d)
        w.owner = None
        if self.containers or self.zombies:
            deadlines.append(now + _SAFETY_WAKE_S)
        else:
            deadlines.append(min(self.idle_since + self.idle_exit_s, now + _IDLE_WAKE_S))
        timeout_ms = max(0, int((min(deadlines) - now) * 1000) + 1)
        p = select.poll()
        for fd, m in w.masks.items():
            p.register(fd, m)
        try:
            events = p.poll(timeout_ms)
        except InterruptedError:
            events = []
        for fd, ev in events:
            owner, h = w.handlers[fd]
            if owner is not None and owner.done:
                continue
            try:
                h(fd, ev)
            except Exception:
                if owner is None:
                    _note(f"error handling fd {fd}:\n{traceback.format_exc()}")
                else:
                    self._container_failed(owner, "handling its I/O")
        requests, self.requests = self.requests, []
        for ctl, line in requests:
            try:
                reply = self.handle(line)
            except Exception:
                _note(f"error handling a request:\n{traceback.format_exc()}")
                reply = _error(f"internal error: {sys.exc_info()[1]!r}")
            self._reply(ctl, reply)
        now = time.monotonic()
        for c in list(self.containers.values()):
            try:
                c.tick(now)
            except Exception:
                self._container_failed(c, "supervising it")
            if c.done:
                self.containers.pop(c.key, None)
        for ctl in list(self.controls.values()):
            if now >= ctl.deadline:
                self._close_control(ctl)
        self.zombies = [z for z in self.zombies if z.poll() is None]

    def _drain_wake(self, _fd: int, _ev: int) -> None:
        with contextlib.suppress(OSError):
            while os.read(self.wake_r, 4096):
                pass

    def _exit(self) -> bool:
        """Idle long enough: stop listening (unlink first, so new requests go to a new shim), tell what was queued
        in the meantime to retry, and return True. False if a request slipped in before the unlink."""
        assert self.listener is not None
        try:
            sock, _ = self.listener.accept()
        except OSError:
            sock = None
        if sock is not None:  # a request arrived just now: not idle after all
            self._add_control(sock)
            self.idle_since = time.monotonic()
            return False
        with contextlib.suppress(OSError):
            os.unlink(CONTROL_SOCK, dir_fd=self.root_fd)
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                break
            with contextlib.suppress(OSError):
                sock.setblocking(True)
                sock.settimeout(1.0)
                sock.sendall(json.dumps(_error("the shim is exiting", retry=True)).encode() + b"\n")
            sock.close()
        self.listener.close()
        self.listener = None
        _note(f"no container for {self.idle_exit_s:g} s: exiting")
        return True


def _detach(root: Path) -> int:
    """Double fork + setsid. The grandchild returns the write end of a pipe on which it reports how it started;
    the original process waits for that report and exits with it."""
    r, w = os.pipe()
    pid = os.fork()
    if pid > 0:
        os.close(w)
        os.waitpid(pid, 0)
        report = bytearray()
        while chunk := os.read(r, 4096):
            report += chunk
        text = report.decode(errors="replace").strip()
        if text.startswith(("ready", "busy")):
            print(text, flush=True)
            os._exit(0)
        print(f"shim: could not start: {text or f'it died, see {root / SHIM_LOG}'}", file=sys.stderr, flush=True)
        os._exit(1)
    os.close(r)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    os.chdir("/")
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.close(devnull)
    errfd = os.open(root / SHIM_LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(errfd, 2)
    os.close(errfd)
    return w


def _raise_fd_limit() -> None:
    """Several fds per container: take the hard limit."""
    with contextlib.suppress(ValueError, OSError):
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    idle = DEFAULT_IDLE_EXIT_S
    if len(args) == 3 and args[1] == "--idle-exit":
        try:
            idle = float(args[2])
        except ValueError:
            idle = -1.0
        args = args[:1]
    if len(args) != 1 or not idle >= 0:
        print("usage: python -m kplane.kubelet.shim <runtime root> [--idle-exit SECONDS]", file=sys.stderr)
        return 2
    root = Path(args[0]).resolve()
    if not (root / "containers").is_dir():
        print(f"shim: {root}/containers is not a directory", file=sys.stderr)
        return 2
    report = _detach(root)
    try:
        lock_fd = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.write(report, b"busy: another shim holds the lock\n")
            return 0
        _raise_fd_limit()
        shim = Shim(root, idle, lock_fd)
    except BaseException as e:
        traceback.print_exc()
        with contextlib.suppress(OSError):
            os.write(report, f"error: {e!r}\n".encode())
        return 1
    os.write(report, f"ready {os.getpid()}\n".encode())
    os.close(report)
    _note(f"supervising {root} (idle exit after {idle:g} s)")
    try:
        shim.run()
    except BaseException:
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
