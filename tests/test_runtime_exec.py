"""exec and attach on the process runtime (the process side of ``kubectl exec`` / ``kubectl attach``)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import signal
import stat
import sys
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from kplane.kubelet.crilog import parse_line
from kplane.kubelet.runtime import (
    AttachSession,
    ContainerNotRunningError,
    ContainerSpec,
    ExecProcess,
    ProcessRuntime,
)

pytestmark = pytest.mark.timeout(20)

IS_ROOT = os.geteuid() == 0
HAVE_NS_TOOLS = all(shutil.which(t) for t in ("unshare", "nsenter", "mount"))


@pytest.fixture
def rt(tmp_path: Path) -> Iterator[ProcessRuntime]:
    runtime = ProcessRuntime(tmp_path / "rt")
    yield runtime
    for cid in ProcessRuntime(tmp_path / "rt").list():
        try:
            runtime.remove(cid, force=True)
        except Exception:
            runtime.kill(cid, signal.SIGKILL)


def sh(script: str, **kw: object) -> ContainerSpec:
    return ContainerSpec(argv=["sh", "-c", script], **kw)  # type: ignore[arg-type]


async def drain(read: Callable[[], Awaitable[bytes]]) -> bytes:
    out = bytearray()
    while chunk := await read():
        out += chunk
    return bytes(out)


async def run(p: ExecProcess, stdin: bytes | None = None) -> tuple[int, bytes, bytes]:
    async def feed() -> None:
        if stdin is not None:
            await p.write_stdin(stdin)
            await p.close_stdin()

    try:
        out, err, _ = await asyncio.wait_for(
            asyncio.gather(drain(p.read_stdout), drain(p.read_stderr), feed()), 8)
        return await asyncio.wait_for(p.wait(), 5), out, err
    finally:
        p.kill()
        p.close()


async def read_until(read: Callable[[], Awaitable[bytes]], needle: bytes, limit_s: float = 5.0) -> bytes:
    buf = bytearray()

    async def loop() -> None:
        while needle not in buf:
            chunk = await read()
            if not chunk:
                raise AssertionError(f"EOF before {needle!r}; got {bytes(buf)!r}")
            buf.extend(chunk)

    try:
        await asyncio.wait_for(loop(), limit_s)
    except TimeoutError:
        raise AssertionError(f"{needle!r} not seen; got {bytes(buf)!r}") from None
    return bytes(buf)


def log_text(rt: ProcessRuntime, cid: str) -> bytes:
    return b"".join(parse_line(line)[3] for line in rt.log_path(cid).read_bytes().splitlines())


async def wait_log(rt: ProcessRuntime, cid: str, needle: bytes, limit_s: float = 5.0) -> None:
    for _ in range(int(limit_s / 0.02)):
        if needle in log_text(rt, cid):
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{needle!r} not in log: {log_text(rt, cid)!r}")


# ----------------------------------------------------------------------------- exec


async def test_exec_echo_and_exit_codes(rt: ProcessRuntime) -> None:
    await rt.start("c", sh("exec sleep 30"))
    code, out, err = await run(await rt.exec("c", ["echo", "hello", "world"], tty=False, stdin=False))
    assert (code, out, err) == (0, b"hello world\n", b"")
    code, out, err = await run(await rt.exec("c", ["sh", "-c", "echo oops >&2; exit 5"], tty=False, stdin=False))
    assert (code, out, err) == (5, b"", b"oops\n")


async def test_exec_missing_binary(rt: ProcessRuntime, tmp_path: Path) -> None:
    await rt.start("c", sh("exec sleep 30"))
    code, out, err = await run(await rt.exec("c", ["no-such-binary-xyz"], tty=False, stdin=False))
    assert code == 127 and out == b""
    assert err.decode() == ('OCI runtime exec failed: exec failed: unable to start container process: '
                            'exec: "no-such-binary-xyz": executable file not found in $PATH\n')
    code, _, err = await run(await rt.exec("c", ["/nope/x"], tty=False, stdin=False))
    assert code == 127 and b"no such file or directory" in err
    plain = tmp_path / "plain"
    plain.write_text("not a program")
    code, _, err = await run(await rt.exec("c", [str(plain)], tty=False, stdin=False))
    assert code == 126 and b"permission denied" in err


async def test_exec_signal_exit_code(rt: ProcessRuntime) -> None:
    await rt.start("c", sh("exec sleep 30"))
    p = await rt.exec("c", ["sleep", "30"], tty=False, stdin=False)
    p.kill(signal.SIGTERM)
    assert await asyncio.wait_for(p.wait(), 5) == 128 + signal.SIGTERM
    p.close()


async def test_exec_not_running(rt: ProcessRuntime) -> None:
    await rt.start("done", sh("exit 0"))
    await rt.wait("done", 5)
    with pytest.raises(ContainerNotRunningError):
        await rt.exec("done", ["true"], tty=False, stdin=False)
    with pytest.raises(ContainerNotRunningError):
        await rt.attach("done", stdin=False)
    with pytest.raises(KeyError):
        await rt.exec("missing", ["true"], tty=False, stdin=False)


async def test_exec_stdin_roundtrip_2mb(rt: ProcessRuntime) -> None:
    await rt.start("c", sh("exec sleep 30"))
    data = os.urandom(2 * 1024 * 1024)
    code, out, err = await run(await rt.exec("c", ["cat"], tty=False, stdin=True), stdin=data)
    assert code == 0 and err == b""
    assert len(out) == len(data) and hashlib.sha256(out).digest() == hashlib.sha256(data).digest()


async def test_exec_backpressure(rt: ProcessRuntime) -> None:
    """Unread output stalls the exec'd process (bounded pipe) instead of being buffered by the agent."""
    await rt.start("c", sh("exec sleep 30"))
    p = await rt.exec("c", ["sh", "-c", "head -c 4000000 /dev/zero; echo done >&2"], tty=False, stdin=False)
    try:
        await asyncio.sleep(0.5)
        assert p.returncode is None  # blocked writing: nobody reads stdout
        code, out, err = await run(p)
        assert code == 0 and len(out) == 4000000 and err == b"done\n"
    finally:
        p.kill()
        p.close()


async def test_exec_tty_resize(rt: ProcessRuntime) -> None:
    await rt.start("c", sh("exec sleep 30"))
    p = await rt.exec("c", ["sh", "-c", "read x; stty size; tty; echo err >&2"], tty=True, stdin=True)
    try:
        p.resize(100, 40)
        await p.write_stdin(b"go\n")
        out = await asyncio.wait_for(drain(p.read_stdout), 5)
        assert await asyncio.wait_for(p.read_stderr(), 1) == b""
        assert await asyncio.wait_for(p.wait(), 5) == 0
    finally:
        p.kill()
        p.close()
    lines = out.decode().replace("\r", "").splitlines()
    assert "40 100" in lines, out
    assert any(line.startswith("/dev/pts/") for line in lines), out
    assert "err" in lines  # stderr goes to the terminal too


async def test_exec_env_and_cwd(rt: ProcessRuntime, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    await rt.start("c", sh("exec sleep 30", env={"GREETING": "hola mundo"}, cwd=str(work)))
    code, out, _ = await run(await rt.exec("c", ["sh", "-c", 'echo "$GREETING"; pwd'], tty=False, stdin=False))
    assert code == 0 and out.decode().splitlines() == ["hola mundo", str(work)]


@pytest.mark.root
@pytest.mark.skipif(not IS_ROOT, reason="mount namespaces need root")
@pytest.mark.skipif(not HAVE_NS_TOOLS, reason="needs unshare, nsenter and mount (util-linux)")
async def test_exec_enters_mount_namespace(rt: ProcessRuntime, tmp_path: Path) -> None:
    src = tmp_path / "vol"
    src.mkdir()
    (src / "token").write_text("secret-in-namespace")
    target = f"/tmp/kplane-ns-test-{uuid.uuid4().hex[:12]}"
    mounts = [{"source": str(src), "target": target, "readOnly": True}]
    argv = ["unshare", "--mount", "--propagation", "private", "--", sys.executable, "-m",
            "kplane.kubelet.mountexec", json.dumps(mounts), "--", "sh", "-c", "echo ready; exec sleep 30"]
    os.mkdir(target)  # the empty mount point exists on the host
    try:
        await rt.start("ns", ContainerSpec(argv=argv, cwd=target))
        await wait_log(rt, "ns", b"ready")
        assert os.listdir(target) == []  # the host does not see the bind mount
        code, out, err = await run(await rt.exec("ns", ["cat", f"{target}/token"], tty=False, stdin=False))
        assert (code, out, err) == (0, b"secret-in-namespace", b"")
        # cwd is resolved inside the namespace (it is the mount point itself)
        code, out, _ = await run(await rt.exec("ns", ["sh", "-c", "pwd; cat token"], tty=False, stdin=False))
        assert (code, out) == (0, f"{target}\nsecret-in-namespace".encode())
        # the same host path outside: empty mount point
        assert os.listdir(target) == []
    finally:
        for cid in rt.list():
            rt.remove(cid, force=True)
        with contextlib.suppress(OSError):
            os.rmdir(target)


# ----------------------------------------------------------------------------- attach


async def test_attach_stdin_roundtrip_and_log(rt: ProcessRuntime) -> None:
    await rt.start("a", sh("echo started; while read l; do echo got $l; echo e$l >&2; done; echo bye", stdin=True))
    await wait_log(rt, "a", b"started")
    s = await rt.attach("a", stdin=True)
    try:
        await s.write_stdin(b"hi\n")
        await read_until(s.read_stdout, b"got hi\n")
        await read_until(s.read_stderr, b"ehi\n")
        await s.write_stdin(b"there\n")
        await read_until(s.read_stdout, b"got there\n")
        # not stdin_once: closing our stdin does not close the container's
        await s.close_stdin()
    finally:
        s.close()
    s2 = await rt.attach("a", stdin=True)
    try:
        await s2.write_stdin(b"again\n")
        await read_until(s2.read_stdout, b"got again\n")
    finally:
        s2.close()
    # attached output is in the CRI log as well, streams kept apart
    await wait_log(rt, "a", b"got again")
    records = [parse_line(line) for line in rt.log_path("a").read_bytes().splitlines()]
    assert ("stdout", b"got hi") in [(r[1], r[3]) for r in records]
    assert ("stderr", b"ehi") in [(r[1], r[3]) for r in records]
    assert rt.status("a").running


async def test_attach_stdin_once_and_eof_on_exit(rt: ProcessRuntime) -> None:
    await rt.start("a", sh("cat; echo stdin-closed; exit 3", stdin=True, stdin_once=True))
    s = await rt.attach("a", stdin=True)
    try:
        await s.write_stdin(b"line1\n")
        await read_until(s.read_stdout, b"line1\n")
        await s.close_stdin()
        rest = await asyncio.wait_for(drain(s.read_stdout), 5)  # b"" once the container exits
        assert rest == b"stdin-closed\n"
        assert await asyncio.wait_for(s.read_stderr(), 5) == b""
    finally:
        s.close()
    info = await rt.wait("a", 5)
    assert info.exit_code == 3


async def test_attach_stdin_once_on_disconnect(rt: ProcessRuntime) -> None:
    await rt.start("a", sh("cat >/dev/null; echo eof", stdin=True, stdin_once=True))
    s = await rt.attach("a", stdin=True)
    await s.write_stdin(b"x\n")
    s.close()  # the stdin client going away closes the container's stdin
    info = await rt.wait("a", 5)
    assert info.exit_code == 0
    await wait_log(rt, "a", b"eof")


async def test_attach_tty(rt: ProcessRuntime) -> None:
    await rt.start("t", sh("read x; stty size; tty; echo x=$x; echo to-stderr >&2", tty=True, stdin=True))
    s = await rt.attach("t", stdin=True)
    try:
        assert s.tty
        s.resize(100, 40)
        await s.write_stdin(b"go\n")
        out = await read_until(s.read_stdout, b"to-stderr")
        assert await s.read_stderr() == b""
    finally:
        s.close()
    text = out.decode().replace("\r", "")
    assert "40 100\n" in text and "/dev/pts/" in text and "x=go\n" in text
    await rt.wait("t", 5)
    log = log_text(rt, "t").replace(b"\r", b"")
    assert b"40 100" in log and b"x=go" in log and b"to-stderr" in log
    assert {parse_line(line)[1] for line in rt.log_path("t").read_bytes().splitlines()} == {"stdout"}


async def test_attach_output_only_and_fresh_runtime(rt: ProcessRuntime, tmp_path: Path) -> None:
    """A new ProcessRuntime (agent restart) can attach to a container started by an earlier one."""
    await rt.start("r", sh("i=0; while :; do i=$((i+1)); echo tick $i; sleep 0.05; done"))
    fresh = ProcessRuntime(tmp_path / "rt")
    s: AttachSession = await fresh.attach("r", stdin=False)
    try:
        await read_until(s.read_stdout, b"tick")
        with pytest.raises(RuntimeError):
            await s.write_stdin(b"x")
    finally:
        s.close()
    sock = fresh.state_dir("r") / "attach.sock"
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    with pytest.raises(ValueError):
        await fresh.attach("r", stdin=True)  # not started with stdin
    await fresh.stop("r", 1)
    assert not sock.exists()


async def test_attach_slow_client_does_not_stall(rt: ProcessRuntime) -> None:
    """A client that never reads is dropped; the container and its log keep going."""
    await rt.start("f", sh("head -c 30000000 /dev/zero | tr '\\0' 'a' | fold -w 1000; echo finished", log_max_bytes=1 << 30))
    s = await rt.attach("f", stdin=False)
    try:
        info = await rt.wait("f", 15)
        assert info.exit_code == 0
        await wait_log(rt, "f", b"finished")
        assert b"too slow" in (rt.state_dir("f") / "shim.log").read_bytes()
        assert await asyncio.wait_for(drain(s.read_stdout), 5)  # what was delivered before the drop, then EOF
    finally:
        s.close()


async def test_attach_long_state_dir(tmp_path: Path) -> None:
    """Unix socket paths are limited to 108 bytes; long state dirs still work."""
    root = tmp_path / ("x" * 60) / ("y" * 60)
    rt = ProcessRuntime(root)
    try:
        await rt.start("c" * 40, sh("while read l; do echo got $l; done", stdin=True))
        s = await rt.attach("c" * 40, stdin=True)
        try:
            await s.write_stdin(b"long\n")
            await read_until(s.read_stdout, b"got long")
        finally:
            s.close()
    finally:
        for cid in rt.list():
            rt.remove(cid, force=True)


async def test_attach_large_stdin(rt: ProcessRuntime) -> None:
    await rt.start("big", ContainerSpec(argv=["cat"], stdin=True, stdin_once=True, log_max_bytes=1 << 30))
    s = await rt.attach("big", stdin=True)
    data = os.urandom(2 * 1024 * 1024)

    async def feed() -> None:
        await s.write_stdin(data)
        await s.close_stdin()

    try:
        out, _ = await asyncio.wait_for(asyncio.gather(drain(s.read_stdout), feed()), 10)
    finally:
        s.close()
    assert hashlib.sha256(out).digest() == hashlib.sha256(data).digest()
    assert (await rt.wait("big", 5)).exit_code == 0
