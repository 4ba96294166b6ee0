"""Process container runtime: every container is a real host process supervised by a detached shim.

State lives on disk under ``<root>/containers/<id>/`` (see :mod:`kplane.kubelet.shim`), so a
restarted agent rediscovers running containers with :meth:`ProcessRuntime.list` and never loses an
exit code: the shim, not the agent, is the container's parent and records ``exit.json``.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import kplane
from kplane.kubelet.crilog import parse_ts, rotated_files
from kplane.kubelet.shim import proc_stat

__all__ = [
    "ContainerExistsError",
    "ContainerNotFoundError",
    "ContainerRunningError",
    "ContainerSpec",
    "ContainerState",
    "ExitInfo",
    "ProcessRuntime",
    "validate_id",
]

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,252}$")
_POLL_S = 0.02
_PKG_ROOT = str(Path(kplane.__file__).resolve().parent.parent)  # so the shim can import kplane


class ContainerNotFoundError(KeyError):
    pass


class ContainerExistsError(FileExistsError):
    pass


class ContainerRunningError(RuntimeError):
    pass


def validate_id(container_id: str) -> str:
    if not isinstance(container_id, str) or not _ID_RE.match(container_id) or ".." in container_id:
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
    tty: bool = False
    stdin: bool = False

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


class ProcessRuntime:
    def __init__(self, root: Path | str, *, start_timeout: float = 10.0) -> None:
        self.root = Path(root).resolve()
        self.containers_dir = self.root / "containers"
        self.containers_dir.mkdir(parents=True, exist_ok=True)
        self.start_timeout = start_timeout

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
        }
        tmp = d / ".spec.json.tmp"
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, d / "spec.json")

        shim_env = dict(os.environ)
        shim_env["PYTHONPATH"] = os.pathsep.join(p for p in (_PKG_ROOT, shim_env.get("PYTHONPATH")) if p)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "kplane.kubelet.shim", str(d),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE, start_new_session=True, env=shim_env)
        _, err = await proc.communicate()  # returns once the shim has detached
        if proc.returncode != 0:
            shutil.rmtree(d, ignore_errors=True)
            raise RuntimeError(f"shim for {container_id!r} failed: {err.decode(errors='replace').strip()}")
        deadline = time.monotonic() + self.start_timeout
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
            if _ID_RE.match(entry) and ".." not in entry and (self.containers_dir / entry / "spec.json").exists():
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
