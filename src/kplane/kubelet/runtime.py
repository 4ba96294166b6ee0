"""Process container runtime: every container is a real host process supervised by the node's detached shim.

One shim process per runtime root (per node) supervises all of its containers (see :mod:`kplane.kubelet.shim`,
which also says what that costs: a crash of the shim loses supervision of every container of the node). The
runtime starts it on demand and asks it, over ``<root>/shim.sock``, to start each container. State lives on disk
under ``<root>/containers/<id>/``, so a restarted agent rediscovers running containers with
:meth:`ProcessRuntime.list` and never loses an exit code: the shim, not the agent, is the container's parent and
records ``exit.json``.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import errno
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import kplane
from kplane.kubelet.crilog import parse_ts, rotated_files
from kplane.kubelet.shim import (
    CONTROL_SOCK,
    DEFAULT_IDLE_EXIT_S,
    FRAME_CLOSE_STDIN,
    FRAME_HDR,
    FRAME_RESIZE,
    FRAME_STDERR,
    FRAME_STDIN,
    FRAME_STDOUT,
    frame,
    proc_stat,
    set_winsize,
    sock_path,
    valid_id,
)

__all__ = [
    "AttachSession",
    "ContainerExistsError",
    "ContainerNotFoundError",
    "ContainerNotRunningError",
    "ContainerRunningError",
    "ContainerSpec",
    "ContainerState",
    "ExecProcess",
    "ExitInfo",
    "ProcessRuntime",
    "validate_id",
]

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_POLL_S = 0.02
_PKG_ROOT = str(Path(kplane.__file__).resolve().parent.parent)  # so the shim can import kplane


class ContainerNotFoundError(KeyError):
    pass


class ContainerExistsError(FileExistsError):
    pass


class ContainerRunningError(RuntimeError):
    pass


class ContainerNotRunningError(RuntimeError):
    """exec/attach on a container that is not (or no longer) running."""


def validate_id(container_id: str) -> str:
    if not valid_id(container_id):
        raise ValueError(f"invalid container id {container_id!r}")
    return container_id


@dataclass
class ContainerSpec:
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None
    log_path: Path | None = None  # default: <state dir>/container.log
    log_max_bytes: int = 10 * 1024 * 1024
    log_max_files: int = 5
    tty: bool = False  # run on a pty (for ``kubectl attach -t``)
    stdin: bool = False  # keep the container's stdin open for attach
    stdin_once: bool = False  # close stdin when the first attached stdin client closes it/disconnects
    netns: str | None = None  # path of a network namespace the container runs in (the shim enters it)

    @classmethod
    def from_container(cls, command: list[str] | None, args: list[str] | None, **kw: Any) -> ContainerSpec:
        """Build from a pod container's ``command``/``args`` (no images: ``command`` is required)."""
        argv = list(command or []) + list(args or [])
        if not command:
            raise ValueError("container command is required (no image entrypoint available)")
        return cls(argv=argv, **kw)


@dataclass(frozen=True)
class ExitInfo:
    exit_code: int
    signal: int | None
    finished_at: datetime | None
    reason: str
    started_at: datetime | None = None
    message: str | None = None

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ExitInfo:
        def ts(v: Any) -> datetime | None:
            try:
                return parse_ts(v) if v else None
            except ValueError:
                return None

        return cls(exit_code=int(d.get("exitCode", 255)), signal=d.get("signal"),
                   finished_at=ts(d.get("finishedAt")), reason=str(d.get("reason") or "Error"),
                   started_at=ts(d.get("startedAt")), message=d.get("message"))


@dataclass(frozen=True)
class ContainerState:
    id: str
    state: Literal["created", "running", "exited", "unknown"]
    pid: int | None = None
    started_at: datetime | None = None
    exit: ExitInfo | None = None

    @property
    def running(self) -> bool:
        return self.state in ("created", "running")


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except (FileNotFoundError, NotADirectoryError):
        return None


def _alive(pid: int, starttime: int | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    st = proc_stat(pid)
    if st is None:
        return False
    if st[0] in ("Z", "X"):
        return False  # exited, not yet reaped
    return starttime is None or st[1] == starttime


def _pid_and_start(text: str | None) -> tuple[int | None, int | None]:
    if not text:
        return None, None
    parts = text.split()
    try:
        pid = int(parts[0])
        st = int(parts[1]) if len(parts) > 1 and parts[1] else None
    except (ValueError, IndexError):
        return None, None
    return pid, st


# --------------------------------------------------------------------------- exec / attach

_READ_CHUNK = 1 << 16
_ATTACH_BUF_MAX = 1 << 20  # per stream, bytes an AttachSession holds before it stops reading the socket

# Runs as the last step before the exec'd command (after nsenter, if any): make the pty the controlling
# terminal, chdir inside the container's mount namespace, exec with the container's PATH and report failures
# the way runc does (kubectl prints stderr and exits with the code).
_EXEC_HELPER = r"""
import os, sys
cwd, tty, argv = sys.argv[1], sys.argv[2] == "1", sys.argv[3:]
def fail(code, what):
    sys.stderr.write("OCI runtime exec failed: exec failed: unable to start container process: " + what + "\n")
    sys.stderr.flush()
    os._exit(code)
if tty:
    import fcntl, termios
    try:
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)
    except OSError:
        pass
if cwd:
    try:
        os.chdir(cwd)
    except OSError as e:
        fail(128, "chdir to cwd (%r) set in config.json failed: %s" % (cwd, (e.strerror or str(e)).lower()))
a0 = argv[0]
try:
    os.execvp(a0, argv)
except FileNotFoundError as e:
    if "/" in a0:
        fail(127, 'exec: "%s": stat %s: no such file or directory' % (a0, a0))
    fail(127, 'exec: "%s": executable file not found in $PATH' % a0)
except PermissionError:
    fail(126, 'exec: "%s": permission denied' % a0)
except OSError as e:
    fail(126, 'exec: "%s": %s' % (a0, (e.strerror or str(e)).lower()))
"""


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class _FdEnd:
    """Our non-blocking end of a pipe or pty; waiting is done with the loop's add_reader/add_writer."""

    def __init__(self, fd: int, *, owned: bool = True) -> None:
        self.fd = fd
        self.owned = owned  # close the fd on close() (a shared pty master is closed by its ExecProcess)
        self.closed = False
        self._waiting: tuple[asyncio.AbstractEventLoop, asyncio.Future[None], bool] | None = None
        os.set_blocking(fd, False)

    async def _wait(self, writable: bool) -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        (loop.add_writer if writable else loop.add_reader)(self.fd, _wake, fut)
        self._waiting = (loop, fut, writable)
        try:
            await fut
        finally:
            self._unwait()

    def _unwait(self) -> None:
        if self._waiting is not None:
            loop, fut, writable = self._waiting
            self._waiting = None
            (loop.remove_writer if writable else loop.remove_reader)(self.fd)
            _wake(fut)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._unwait()  # before the fd number can be reused
            if self.owned:
                with contextlib.suppress(OSError):
                    os.close(self.fd)


class _FdReader(_FdEnd):
    """Pull-based reads: nothing is buffered here, so a process whose output is not read blocks on its
    full pipe (back-pressure) instead of growing our memory."""

    @property
    def eof(self) -> bool:
        return self.closed

    async def read(self, n: int = _READ_CHUNK) -> bytes:
        while not self.closed:
            try:
                data = os.read(self.fd, n)
            except BlockingIOError:
                await self._wait(False)
                continue
            except OSError as e:
                if e.errno not in (errno.EIO, errno.EBADF):  # EIO: the pty's slave side is gone
                    raise
                data = b""
            if data:
                return data
            self.close()
        return b""


class _FdWriter(_FdEnd):
    async def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self.closed:
                raise BrokenPipeError("stdin is closed")
            try:
                n = os.write(self.fd, view[:_READ_CHUNK])
            except BlockingIOError:
                await self._wait(True)
                continue
            except OSError as e:
                if e.errno == errno.EIO:
                    raise BrokenPipeError("terminal hung up") from e
                raise
            view = view[n:]


def _exit_code(rc: int) -> int:
    return 128 - rc if rc < 0 else rc


class ExecProcess:
    """A process started by :meth:`ProcessRuntime.exec`.  Read stdout and stderr concurrently with writing
    stdin (e.g. in separate tasks); reads return b"" at EOF (stderr is always b"" with a tty)."""

    def __init__(self, proc: asyncio.subprocess.Process, *, tty: bool, stdout: _FdReader,
                 stderr: _FdReader | None, stdin: _FdWriter | None, pty_fd: int | None) -> None:
        self._proc = proc
        self.tty = tty
        self.pid = proc.pid
        self._stdout = stdout
        self._stderr = stderr
        self._stdin = stdin
        self._pty_fd = pty_fd

    async def write_stdin(self, data: bytes) -> None:
        if self._stdin is None:
            raise RuntimeError("exec was started without stdin")
        await self._stdin.write(data)

    async def close_stdin(self) -> None:
        if self._stdin is None or self._stdin.closed:
            return
        if self.tty:
            with contextlib.suppress(OSError):
                await self._stdin.write(b"\x04")  # a pty cannot be half-closed: send EOF (^D)
        self._stdin.close()

    async def read_stdout(self) -> bytes:
        data = await self._stdout.read()
        if not data and self._pty_fd is not None:
            self._close_pty()  # the terminal hung up: nothing more to read or write
        return data

    async def read_stderr(self) -> bytes:
        return b"" if self._stderr is None else await self._stderr.read()

    def _close_pty(self) -> None:
        if self._pty_fd is None:
            return
        fd, self._pty_fd = self._pty_fd, None
        self._stdout.close()
        if self._stdin is not None:
            self._stdin.close()
        with contextlib.suppress(OSError):
            os.close(fd)

    def resize(self, width: int, height: int) -> None:
        if self._pty_fd is not None:
            with contextlib.suppress(OSError):
                set_winsize(self._pty_fd, width, height)

    async def wait(self) -> int:
        """Exit code; 128+N if killed by signal N."""
        return _exit_code(await self._proc.wait())

    @property
    def returncode(self) -> int | None:
        rc = self._proc.returncode
        return None if rc is None else _exit_code(rc)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the exec'd process group (it runs in its own session)."""
        if self._proc.returncode is not None:
            return
        try:
            os.killpg(self._proc.pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(sig)

    def close(self) -> None:
        """Release our ends of the process's stdio (does not kill it)."""
        self._close_pty()
        if self._stdin is not None:
            self._stdin.close()
        if self._stderr is not None:
            self._stderr.close()
        self._stdout.close()


class AttachSession:
    """A connection to a container's main process stdio via its shim (``attach.sock``).  Output is the
    container's from the moment of attaching; reads return b"" once the container has exited."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, tty: bool,
                 stdin: bool) -> None:
        self.tty = tty
        self.stdin = stdin
        self._reader = reader
        self._writer = writer
        self._bufs: dict[int, deque[bytes]] = {FRAME_STDOUT: deque(), FRAME_STDERR: deque()}
        self._sizes = {FRAME_STDOUT: 0, FRAME_STDERR: 0}
        self._data = {FRAME_STDOUT: asyncio.Event(), FRAME_STDERR: asyncio.Event()}
        self._space = {FRAME_STDOUT: asyncio.Event(), FRAME_STDERR: asyncio.Event()}
        self._eof = False
        self._stdin_closed = not stdin
        self._pump = asyncio.create_task(self._run())

    async def _run(self) -> None:
        try:
            while True:
                kind, n = FRAME_HDR.unpack(await self._reader.readexactly(FRAME_HDR.size))
                data = await self._reader.readexactly(n) if n else b""
                if kind not in self._bufs or not data:
                    continue
                while self._sizes[kind] >= _ATTACH_BUF_MAX:  # consumer is behind: stop reading the socket
                    self._space[kind].clear()
                    await self._space[kind].wait()
                self._bufs[kind].append(data)
                self._sizes[kind] += len(data)
                self._data[kind].set()
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            self._eof = True
            for ev in self._data.values():
                ev.set()

    async def _read(self, kind: int) -> bytes:
        buf = self._bufs[kind]
        while not buf and not self._eof:
            self._data[kind].clear()
            await self._data[kind].wait()
        if not buf:
            return b""
        data = buf.popleft()
        self._sizes[kind] -= len(data)
        self._space[kind].set()
        return data

    async def read_stdout(self) -> bytes:
        return await self._read(FRAME_STDOUT)

    async def read_stderr(self) -> bytes:
        if self.tty:
            return b""
        return await self._read(FRAME_STDERR)

    async def write_stdin(self, data: bytes) -> None:
        if not self.stdin:
            raise RuntimeError("attached without stdin")
        if self._stdin_closed:
            raise BrokenPipeError("stdin is closed")
        for i in range(0, len(data), _READ_CHUNK):
            self._writer.write(frame(FRAME_STDIN, data[i:i + _READ_CHUNK]))
            await self._writer.drain()

    async def close_stdin(self) -> None:
        if self._stdin_closed:
            return
        self._stdin_closed = True
        with contextlib.suppress(ConnectionError, OSError):
            self._writer.write(frame(FRAME_CLOSE_STDIN))
            await self._writer.drain()

    def resize(self, width: int, height: int) -> None:
        if self._writer.is_closing():
            return
        self._writer.write(frame(FRAME_RESIZE, struct.pack(">HH", width & 0xFFFF, height & 0xFFFF)))

    def close(self) -> None:
        """Detach (the container keeps running)."""
        self._pump.cancel()
        self._writer.close()


class _NoAnswer(Exception):
    """The shim closed the connection without answering (it was exiting, or died): nothing was started."""


class ProcessRuntime:
    def __init__(self, root: Path | str, *, start_timeout: float = 10.0,
                 shim_idle_exit: float = DEFAULT_IDLE_EXIT_S) -> None:
        self.root = Path(root).resolve()
        self.containers_dir = self.root / "containers"
        self.containers_dir.mkdir(parents=True, exist_ok=True)
        self.start_timeout = start_timeout
        self.shim_idle_exit = shim_idle_exit  # for a shim this runtime starts: exit after this long without containers
        self._launching: asyncio.Future[str] | None = None  # the shim launch in flight (one at a time)

    # ----------------------------------------------------------------- paths
    def state_dir(self, container_id: str) -> Path:
        d = self.containers_dir / validate_id(container_id)
        if d.parent != self.containers_dir:
            raise ValueError(f"invalid container id {container_id!r}")
        return d

    def _spec(self, container_id: str) -> dict[str, Any] | None:
        raw = _read(self.state_dir(container_id) / "spec.json")
        if raw is None:
            return None
        try:
            spec: dict[str, Any] = json.loads(raw)
        except ValueError:
            return None
        return spec

    def log_path(self, container_id: str) -> Path:
        spec = self._spec(container_id)
        if spec is None:
            raise ContainerNotFoundError(container_id)
        return Path(spec["log"])

    # ----------------------------------------------------------------- lifecycle
    async def start(self, container_id: str, spec: ContainerSpec) -> None:
        d = self.state_dir(container_id)
        if not spec.argv:
            raise ValueError("empty argv")
        log = Path(spec.log_path) if spec.log_path is not None else d / "container.log"
        if not log.is_absolute():
            raise ValueError("log_path must be absolute")
        if spec.cwd is not None and not os.path.isabs(spec.cwd):
            raise ValueError("cwd must be absolute")
        try:
            d.mkdir()
        except FileExistsError:
            raise ContainerExistsError(f"container {container_id!r} already exists") from None
        env = dict(spec.env)
        env.setdefault("PATH", DEFAULT_PATH)
        doc = {
            "argv": [str(a) for a in spec.argv],
            "env": env,
            "cwd": spec.cwd,
            "log": str(log),
            "log_max_bytes": int(spec.log_max_bytes),
            "log_max_files": int(spec.log_max_files),
            "tty": bool(spec.tty),
            "stdin": bool(spec.stdin),
            "stdin_once": bool(spec.stdin_once),
            "netns": spec.netns,
        }
        tmp = d / ".spec.json.tmp"
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, d / "spec.json")

        deadline = time.monotonic() + self.start_timeout
        try:
            reply = await self._ask_shim({"op": "start", "dir": str(d)}, deadline)
        except BaseException:
            if not (d / "shim.pid").exists():  # no shim claimed it: nothing runs
                shutil.rmtree(d, ignore_errors=True)
            raise
        if not reply.get("ok"):
            shutil.rmtree(d, ignore_errors=True)
            raise RuntimeError(f"the shim refused to start container {container_id!r}: {reply.get('error')}")
        while True:
            if (d / "pid").exists() or (d / "exit.json").exists():
                return
            shim_pid, shim_st = _pid_and_start(_read(d / "shim.pid"))
            if shim_pid is not None and not _alive(shim_pid, shim_st) and not (
                    (d / "pid").exists() or (d / "exit.json").exists()):
                log_text = _read(d / "shim.log") or ""
                raise RuntimeError(f"shim for {container_id!r} died during start: {log_text[-2000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"container {container_id!r} did not start within {self.start_timeout}s")
            await asyncio.sleep(_POLL_S)

    # ----------------------------------------------------------------- the node's shim
    async def _ask_shim(self, request: dict[str, Any], deadline: float) -> dict[str, Any]:
        """Send ``request`` to the node's shim, starting one if none answers (none yet, or the last one exited
        when idle); retried until ``deadline``. Retrying is safe: the shim never starts a state dir twice."""
        last: BaseException | None = None
        while time.monotonic() < deadline:
            try:
                reply = await self._shim_request(request, deadline - time.monotonic())
                if not reply.get("retry"):
                    return reply
                last = RuntimeError(reply.get("error"))
            except (OSError, _NoAnswer) as e:  # no socket, a stale one, or a shim that went away: start one
                last = e
                if await self._launch_shared() == "ready":
                    continue
            await asyncio.sleep(_POLL_S)  # another shim holds the lock (starting up, or exiting)
        raise RuntimeError(f"no container shim answered on {self.root / CONTROL_SOCK}: {last}")

    async def _shim_request(self, request: dict[str, Any], limit_s: float) -> dict[str, Any]:
        addr, dfd = sock_path(self.root, CONTROL_SOCK)
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(addr), max(limit_s, 0.01))
        finally:
            if dfd is not None:
                os.close(dfd)
        try:
            writer.write(json.dumps(request).encode() + b"\n")
            await writer.drain()
            line = await asyncio.wait_for(reader.readline(), max(limit_s, 0.01))
        finally:
            writer.close()
        if not line.endswith(b"\n"):
            raise _NoAnswer("the shim closed the connection without answering")
        reply = json.loads(line)
        if not isinstance(reply, dict):
            raise RuntimeError(f"unexpected answer from the shim: {line[:200]!r}")
        return reply

    async def _launch_shared(self) -> str:
        """Concurrent starts that find no shim wait for one launch instead of each starting a launcher."""
        fut = self._launching
        if fut is None or fut.done() or fut.get_loop() is not asyncio.get_running_loop():
            fut = self._launching = asyncio.ensure_future(self._launch_shim())
        return await asyncio.shield(fut)

    async def _launch_shim(self) -> str:
        """Start the node's shim; "ready" once it listens, "busy" if another one holds its lock."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PKG_ROOT, env.get("PYTHONPATH")) if p)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "kplane.kubelet.shim", str(self.root), "--idle-exit", str(self.shim_idle_exit),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, start_new_session=True, env=env)
        try:  # returns once the shim listens (or has found another one)
            out, err = await asyncio.wait_for(proc.communicate(), self.start_timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise RuntimeError(f"the container shim for {self.root} did not start within {self.start_timeout}s") \
                from None
        if proc.returncode != 0:
            raise RuntimeError(f"the container shim for {self.root} failed to start: "
                               f"{err.decode(errors='replace').strip()}")
        return out.decode(errors="replace").split(" ", 1)[0].split(":", 1)[0].strip()

    def status(self, container_id: str) -> ContainerState:
        d = self.state_dir(container_id)
        if not (d / "spec.json").exists():
            return ContainerState(container_id, "unknown")
        for _ in range(2):
            exit_info = self._exit_info(d)
            pid, _ = _pid_and_start(_read(d / "pid"))
            started_raw = _read(d / "started")
            started = None
            if started_raw:
                try:
                    started = parse_ts(started_raw.strip())
                except ValueError:
                    started = None
            if exit_info is not None:
                return ContainerState(container_id, "exited", pid=pid, started_at=started, exit=exit_info)
            shim_pid, shim_st = _pid_and_start(_read(d / "shim.pid"))
            shim_alive = shim_pid is not None and _alive(shim_pid, shim_st)
            if pid is not None:
                st_raw = (_read(d / "pid_starttime") or "").strip()
                st = int(st_raw) if st_raw.isdigit() else None
                if _alive(pid, st) or shim_alive:
                    # a dead container with a live shim is just about to get its exit.json
                    return ContainerState(container_id, "running", pid=pid, started_at=started)
            elif shim_alive:
                return ContainerState(container_id, "created")
            # shim gone without exit.json: re-check once (exit.json may have just landed)
        if pid is None and (d / "shim.pid").exists():
            return ContainerState(container_id, "exited", exit=ExitInfo(
                128, None, None, "StartError", message="shim exited before starting the container"))
        if pid is None:
            return ContainerState(container_id, "created")
        return ContainerState(container_id, "exited", pid=pid, started_at=started, exit=ExitInfo(
            137, None, None, "ContainerStatusUnknown",
            message="the container's shim disappeared; its exit code could not be recorded"))

    @staticmethod
    def _exit_info(d: Path) -> ExitInfo | None:
        raw = _read(d / "exit.json")
        if raw is None:
            return None
        try:
            return ExitInfo.from_json(json.loads(raw))
        except (ValueError, TypeError):
            return ExitInfo(255, None, None, "Unknown", message="corrupt exit.json")

    async def wait(self, container_id: str, timeout_s: float | None = None) -> ExitInfo:
        """Wait until the container has exited; TimeoutError after ``timeout_s`` seconds."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            st = self.status(container_id)
            if st.state == "unknown":
                raise ContainerNotFoundError(container_id)
            if st.exit is not None:
                return st.exit
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"container {container_id!r} still running")
            await asyncio.sleep(_POLL_S)

    def kill(self, container_id: str, sig: int = signal.SIGKILL) -> bool:
        """Signal the container's process group; False if it is not running."""
        d = self.state_dir(container_id)
        pid, _ = _pid_and_start(_read(d / "pid"))
        if pid is None or (d / "exit.json").exists():
            return False
        st_raw = (_read(d / "pid_starttime") or "").strip()
        st = int(st_raw) if st_raw.isdigit() else None
        if not _alive(pid, st):
            return False
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return False
        return True

    async def stop(self, container_id: str, grace_s: float, *,
                   stop_signal: int = signal.SIGTERM, kill_timeout: float = 10.0) -> ExitInfo:
        """Send ``stop_signal`` to the process group, SIGKILL after ``grace_s``, return the exit."""
        st = self.status(container_id)
        if st.state == "unknown":
            raise ContainerNotFoundError(container_id)
        if st.exit is not None:
            return st.exit
        if st.state == "created":
            # wait for the shim to publish the pid (bounded by start_timeout)
            deadline = time.monotonic() + self.start_timeout
            while st.state == "created" and time.monotonic() < deadline:
                await asyncio.sleep(_POLL_S)
                st = self.status(container_id)
            if st.exit is not None:
                return st.exit
        if grace_s > 0:
            self.kill(container_id, stop_signal)
            try:
                return await self.wait(container_id, grace_s)
            except TimeoutError:
                pass
        self.kill(container_id, signal.SIGKILL)
        deadline = time.monotonic() + kill_timeout
        while True:
            try:
                return await self.wait(container_id, 0.5)
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise
                self.kill(container_id, signal.SIGKILL)

    def list(self) -> list[str]:
        out = []
        for entry in sorted(os.listdir(self.containers_dir)):
            if valid_id(entry) and (self.containers_dir / entry / "spec.json").exists():
                out.append(entry)
        return out

    def remove(self, container_id: str, *, force: bool = False) -> None:
        """Delete the state dir and logs; ContainerRunningError if the container still runs
        (with ``force`` the process group is SIGKILLed first)."""
        d = self.state_dir(container_id)
        if not d.exists():
            raise ContainerNotFoundError(container_id)
        st = self.status(container_id)
        if st.running and force:
            self.kill(container_id, signal.SIGKILL)
            deadline = time.monotonic() + 5
            while st.running and time.monotonic() < deadline:
                time.sleep(_POLL_S)
                st = self.status(container_id)
        if st.running:
            raise ContainerRunningError(f"container {container_id!r} is running")
        spec = self._spec(container_id)
        if spec is not None:
            log = Path(spec["log"])
            for p in [*rotated_files(log), log]:
                p.unlink(missing_ok=True)
        shutil.rmtree(d, ignore_errors=True)

    # ----------------------------------------------------------------- exec / attach
    async def _running(self, container_id: str) -> ContainerState:
        st = self.status(container_id)
        deadline = time.monotonic() + self.start_timeout
        while st.state == "created" and time.monotonic() < deadline:  # the shim is about to publish the pid
            await asyncio.sleep(_POLL_S)
            st = self.status(container_id)
        if st.state == "unknown":
            raise ContainerNotFoundError(container_id)
        if st.state != "running" or st.pid is None:
            raise ContainerNotRunningError(f"container {container_id!r} is not running")
        return st

    @staticmethod
    def _nsenter_prefix(pid: int) -> builtins.list[str]:
        """``nsenter`` argv to join the container's mount and network namespaces, those it has of its own (and
        we are root)."""
        if os.geteuid() != 0:
            return []
        flags = []
        for ns, flag in (("mnt", "--mount"), ("net", "--net")):
            try:
                if os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"):
                    flags.append(flag)
            except OSError:
                continue
        if not flags:
            return []
        nsenter = shutil.which("nsenter")
        if nsenter is None:
            raise RuntimeError("the container has its own namespaces, but nsenter (util-linux) is not installed")
        return [nsenter, f"--target={pid}", *flags, "--"]

    async def exec(self, container_id: str, argv: Sequence[str], *, tty: bool, stdin: bool) -> ExecProcess:
        """Run ``argv`` in the running container: its env and cwd, inside its mount namespace (as root).

        A missing executable is not an error here: the process exits 127 (126 if not executable) with
        runc's message on stderr, as ``kubectl exec`` expects."""
        if not argv:
            raise ValueError("empty command")
        st = await self._running(container_id)
        assert st.pid is not None
        spec = self._spec(container_id) or {}
        env = {str(k): str(v) for k, v in (spec.get("env") or {}).items()}
        env.setdefault("PATH", DEFAULT_PATH)
        if tty:
            env.setdefault("TERM", "xterm")
        cwd = spec.get("cwd") or ""
        prefix = self._nsenter_prefix(st.pid)
        cmd = [*prefix, sys.executable, "-I", "-S", "-c", _EXEC_HELPER, cwd, "1" if tty else "0",
               *[str(a) for a in argv]]
        parent: builtins.list[int] = []
        child: builtins.list[int] = []
        try:
            if tty:
                master, slave = os.openpty()
                parent.append(master)
                child.append(slave)
                fds: tuple[Any, Any, Any] = (slave, slave, slave)
            else:
                out_r, out_w = os.pipe()
                err_r, err_w = os.pipe()
                parent += [out_r, err_r]
                child += [out_w, err_w]
                in_fd: Any = subprocess.DEVNULL
                if stdin:
                    in_r, in_w = os.pipe()
                    parent.append(in_w)
                    child.append(in_r)
                    in_fd = in_r
                fds = (in_fd, out_w, err_w)
            proc = await asyncio.create_subprocess_exec(
                *cmd, stdin=fds[0], stdout=fds[1], stderr=fds[2], env=env, cwd="/",
                start_new_session=True, close_fds=True)
        except BaseException:
            for fd in parent:
                os.close(fd)
            raise
        finally:
            for fd in child:
                os.close(fd)
        if tty:
            return ExecProcess(proc, tty=True, stdout=_FdReader(parent[0], owned=False), stderr=None,
                               stdin=_FdWriter(parent[0], owned=False) if stdin else None, pty_fd=parent[0])
        return ExecProcess(proc, tty=False, stdout=_FdReader(parent[0]), stderr=_FdReader(parent[1]),
                           stdin=_FdWriter(parent[2]) if stdin else None, pty_fd=None)

    async def attach(self, container_id: str, *, stdin: bool) -> AttachSession:
        """Attach to the main process's stdio through its shim (works for containers started by an earlier
        agent process too)."""
        await self._running(container_id)
        d = self.state_dir(container_id)
        spec = self._spec(container_id) or {}
        if stdin and not spec.get("stdin"):
            raise ValueError(f"container {container_id!r} was not started with stdin")
        addr, dfd = sock_path(d)
        try:
            reader, writer = await asyncio.open_unix_connection(addr)
        except (FileNotFoundError, ConnectionRefusedError) as e:
            if self.status(container_id).running:
                raise RuntimeError(f"container {container_id!r} does not accept attach: {e}") from e
            raise ContainerNotRunningError(f"container {container_id!r} is not running") from e
        finally:
            if dfd is not None:
                os.close(dfd)
        sock = writer.get_extra_info("socket")
        if isinstance(sock, socket.socket):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 18)
        session = AttachSession(reader, writer, tty=bool(spec.get("tty")), stdin=stdin)
        if stdin:
            writer.write(frame(FRAME_STDIN))  # announce a stdin client (stdinOnce closes stdin when it leaves)
            await writer.drain()
        return session
