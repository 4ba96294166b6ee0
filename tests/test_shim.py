"""The node's container shim: one process per runtime root supervising all of its containers (real processes)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from kplane.kubelet.crilog import read_logs
from kplane.kubelet.runtime import ContainerSpec, ProcessRuntime, _alive, validate_id
from kplane.kubelet.shim import CONTROL_SOCK, MAX_REQUEST, proc_starttime, proc_stat, sock_path

from .test_runtime import sh, until

pytestmark = pytest.mark.timeout(60)


def _cleanup(root: Path) -> None:
    rt = ProcessRuntime(root)
    for cid in rt.list():
        try:
            rt.remove(cid, force=True)
        except Exception:
            rt.kill(cid, signal.SIGKILL)


@pytest.fixture
def rt(tmp_path: Path) -> Iterator[ProcessRuntime]:
    runtime = ProcessRuntime(tmp_path / "rt")
    yield runtime
    _cleanup(runtime.root)



def shim_pid(rt: ProcessRuntime, cid: str) -> int:
    return int((rt.state_dir(cid) / "shim.pid").read_text().split()[0])


def shims_of(root: Path) -> list[int]:
    """Live shim processes whose command line names ``root``."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{d}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        st = proc_stat(int(d))
        if b"kplane.kubelet.shim" in cmd and str(root).encode() in cmd and st is not None and st[0] != "Z":
            out.append(int(d))
    return out


def ppid(pid: int) -> int:
    data = Path(f"/proc/{pid}/stat").read_bytes()
    return int(data[data.rindex(b")") + 2:].split()[1])


def ask(root: Path, payload: bytes) -> dict[str, object]:
    """One raw request on the shim's socket; the decoded answer."""
    addr, dfd = sock_path(root, CONTROL_SOCK)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    try:
        s.connect(addr)
        try:
            s.sendall(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # it answered and hung up before taking everything
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    finally:
        s.close()
        if dfd is not None:
            os.close(dfd)
    doc = json.loads(buf)
    assert isinstance(doc, dict)
    return doc


def ping(root: Path) -> int:
    reply = ask(root, b'{"op": "ping"}\n')
    assert reply["ok"] is True
    pid = reply["pid"]
    assert isinstance(pid, int)
    return pid


async def test_one_shim_supervises_every_container(rt: ProcessRuntime) -> None:
    await rt.start("a", sh("echo a; sleep 30"))
    await asyncio.gather(*(rt.start(f"c{i}", ContainerSpec(["sleep", "30"])) for i in range(4)))
    await rt.start("b", sh("echo b-out; echo b-err >&2; exit 4"))
    pids = {shim_pid(rt, cid) for cid in rt.list()}
    assert len(pids) == 1
    (shim,) = pids
    assert shims_of(rt.root) == [shim] and ping(rt.root) == shim
    for cid in ("a", "c0", "c1", "c2", "c3"):
        st = rt.status(cid)
        assert st.state == "running" and st.pid is not None
        assert ppid(st.pid) == shim  # the shim is every container's parent
    assert (await rt.wait("b", 5)).exit_code == 4
    assert read_logs(rt.log_path("b"), streams={"stderr"}) == b"b-err\n"
    # the control socket is the owner's only
    assert stat.S_IMODE((rt.root / CONTROL_SOCK).stat().st_mode) == 0o600


AGENT = textwrap.dedent("""
    import asyncio, sys
    from kplane.kubelet.runtime import ContainerSpec, ProcessRuntime
    async def main():
        rt = ProcessRuntime(sys.argv[1])
        await rt.start(sys.argv[2], ContainerSpec(sys.argv[3:], stdin=True))
    asyncio.run(main())
""")


async def run_agent(root: Path, cid: str, *argv: str) -> None:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", AGENT, str(root), cid, *argv)
    assert await asyncio.wait_for(proc.wait(), 20) == 0


async def test_agent_processes_share_one_shim_and_restart_keeps_containers(rt: ProcessRuntime) -> None:
    # several agent processes start containers at the same time on a root without a shim: one shim, never two
    loop = "while read l; do echo got-$l; done"
    await asyncio.gather(*(run_agent(rt.root, f"p{i}", "sh", "-c", loop) for i in range(4)))
    assert len({shim_pid(rt, f"p{i}") for i in range(4)}) == 1
    assert len(shims_of(rt.root)) == 1
    # every agent is gone; a fresh runtime (the restarted agent) finds them running, attaches, reads their logs
    fresh = ProcessRuntime(rt.root)
    assert fresh.list() == ["p0", "p1", "p2", "p3"]
    for i in range(4):
        s = await fresh.attach(f"p{i}", stdin=True)
        try:
            await s.write_stdin(f"x{i}\n".encode())
            out = b""
            while b"got-" not in out:
                out += await asyncio.wait_for(s.read_stdout(), 5)
            assert out == f"got-x{i}\n".encode()
        finally:
            s.close()
        await until(lambda i=i: read_logs(fresh.log_path(f"p{i}")) == f"got-x{i}\n".encode())
    # and starts more under the same shim
    await fresh.start("later", ContainerSpec(["sleep", "30"]))
    assert shim_pid(fresh, "later") == shim_pid(fresh, "p0")


async def test_failures_stay_with_their_container(rt: ProcessRuntime, tmp_path: Path) -> None:
    await rt.start("steady", sh("i=0; while :; do i=$((i+1)); echo tick $i; sleep 0.05; done"))
    shim = shim_pid(rt, "steady")
    # start errors
    await rt.start("missing", ContainerSpec(["/nonexistent/binary-xyz"]))
    await rt.start("badcwd", ContainerSpec(["true"], cwd=str(tmp_path / "nodir")))
    await rt.start("badns", ContainerSpec(["true"], netns=str(tmp_path / "no-such-netns")))
    for cid, code in (("missing", 127), ("badcwd", 128), ("badns", 128)):
        info = await rt.wait(cid, 5)
        assert (info.exit_code, info.reason) == (code, "StartError"), (cid, info)
    assert "network namespace" in ((await rt.wait("badns", 1)).message or "")
    # a container killed from outside, and one that dies on its own
    await rt.start("victim", ContainerSpec(["sleep", "30"]))
    await rt.start("crasher", sh("kill -SEGV $$"))
    rt.kill("victim", signal.SIGKILL)
    assert (await rt.wait("victim", 5)).signal == signal.SIGKILL
    assert (await rt.wait("crasher", 5)).signal == signal.SIGSEGV
    # supervising one fails (its log directory disappears, so rotation cannot work): that one is killed and says
    # why, nothing else is touched
    logdir = tmp_path / "logs"
    await rt.start("doomed", sh("echo ready; while :; do echo xxxxxxxxxxxxxxxx; sleep 0.01; done",
                                log_path=logdir / "0.log", log_max_bytes=4000))
    await until(lambda: b"ready" in read_logs(logdir / "0.log"))
    for p in logdir.iterdir():
        p.unlink()
    logdir.rmdir()
    info = await rt.wait("doomed", 10)
    assert info.reason == "Error" and info.message and "kplane shim" in info.message, info
    assert b"killing the container" in (rt.state_dir("doomed") / "shim.log").read_bytes()
    # a misbehaving attach client (an oversized frame) is dropped, alone
    addr, dfd = sock_path(rt.state_dir("steady"))
    assert dfd is None
    bad = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    bad.connect(addr)
    bad.sendall(b"\x00\xff\xff\xff\xff" + b"x" * 100)
    bad.settimeout(5)
    while True:  # it gets the output until the shim hangs up on it
        try:
            if not bad.recv(65536):
                break
        except ConnectionResetError:
            break
    bad.close()
    # the shim and the first container are untouched
    assert rt.status("steady").state == "running" and ping(rt.root) == shim and _alive(shim, None)
    before = read_logs(rt.log_path("steady")).count(b"tick")
    await until(lambda: read_logs(rt.log_path("steady")).count(b"tick") > before + 3)
    s = await rt.attach("steady", stdin=False)
    try:
        assert b"tick" in await asyncio.wait_for(s.read_stdout(), 5)
    finally:
        s.close()
    await rt.start("after", ContainerSpec(["sleep", "30"]))
    assert shim_pid(rt, "after") == shim


async def test_refuses_state_dirs_outside_its_containers(rt: ProcessRuntime, tmp_path: Path) -> None:
    await rt.start("ok", ContainerSpec(["sleep", "30"]))
    shim = ping(rt.root)
    spec = json.dumps({"argv": ["sh", "-c", f"touch {tmp_path}/ran-$$"], "log": str(tmp_path / "evil.log")})
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "spec.json").write_text(spec)
    link = rt.containers_dir / "link"
    link.symlink_to(outside)
    nested = rt.containers_dir / "ok" / "nested"
    nested.mkdir()
    (nested / "spec.json").write_text(spec)
    nospec = rt.containers_dir / "nospec"
    nospec.mkdir()
    badspec = rt.containers_dir / "badspec"
    badspec.mkdir()
    (badspec / "spec.json").write_text('{"argv": "not a list", "log": "/tmp/x.log"}')
    hidden = rt.containers_dir / ".hidden"
    hidden.mkdir()
    (hidden / "spec.json").write_text(spec)
    c = str(rt.containers_dir)
    cases = {
        f"{c}/../containers/ok": "normalized",
        f"{c}/ok/../link": "normalized",
        f"{c}/ok/": "normalized",
        "containers/ok": "absolute",
        str(outside): "not a directory of",
        c: "not a directory of",
        str(rt.root): "not a directory of",
        str(nested): "not a directory of",
        str(link): "symlinks are refused",
        str(hidden): "not a container id",
        f"{c}/missing": "No such file",
        str(nospec): "spec.json",
        str(badspec): "'argv'",
    }
    for path, why in cases.items():
        reply = ask(rt.root, json.dumps({"op": "start", "dir": path}).encode() + b"\n")
        assert reply["ok"] is False and why in str(reply["error"]), (path, reply)
    for d in (outside, nested, hidden, nospec, badspec):
        assert not (d / "shim.pid").exists()
    assert not [n for n in os.listdir(tmp_path) if n.startswith("ran-")]
    assert ping(rt.root) == shim and rt.status("ok").state == "running"
    # a second request for a container it already started: nothing starts twice
    pid = rt.status("ok").pid
    reply = ask(rt.root, json.dumps({"op": "start", "dir": str(rt.state_dir("ok"))}).encode() + b"\n")
    assert reply == {"ok": True, "already": True}
    assert rt.status("ok").pid == pid
    for d in (link, nospec, badspec, hidden):  # never started: not containers to stop
        d.unlink() if d.is_symlink() else shutil.rmtree(d)
    for bad in ("ok\n", "ok/", "..", "a..b"):  # never a path, whatever the regex engine's "$" allows
        with pytest.raises(ValueError):
            validate_id(bad)


async def test_malformed_and_oversized_requests(rt: ProcessRuntime) -> None:
    await rt.start("ok", sh("while :; do echo tick; sleep 0.05; done"))
    shim = ping(rt.root)
    for payload, why in [
        (b"not json\n", "malformed"),
        (b"\xff\xfe\n", "malformed"),
        (b"[1, 2]\n", "not a JSON object"),
        (b'"start"\n', "not a JSON object"),
        (b"{}\n", "unknown op"),
        (b'{"op": "exec", "dir": "/"}\n', "unknown op"),
        (b'{"op": "start"}\n', "'dir'"),
        (b'{"op": "start", "dir": 42}\n', "'dir'"),
        (b'{"op": "start", "dir": ""}\n', "'dir'"),
        (json.dumps({"op": "start", "dir": "/a" * 3000}).encode() + b"\n", "'dir'"),
        (b'{"op": "start", "dir": "/x\\u0000y"}\n', "'dir'"),
        (b"{" * 20000 + b"\n", "malformed"),
        (b"x" * (MAX_REQUEST + 10), "too large"),
        (b'{"op": "ping", "pad": "' + b"x" * (MAX_REQUEST + 10) + b'"}\n', "too large"),
    ]:
        reply = ask(rt.root, payload)
        assert reply["ok"] is False and why in str(reply["error"]), (payload[:40], reply)
    # clients that hang up early, or send half a request and go away
    for payload in (b"", b'{"op": "sta', b"\x00" * 100):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(rt.root / CONTROL_SOCK))
        s.sendall(payload)
        s.close()
    assert ping(rt.root) == shim
    assert rt.status("ok").state == "running"
    assert shims_of(rt.root) == [shim]


async def test_idle_exit_and_restart(tmp_path: Path) -> None:
    root = tmp_path / "rt"
    rt = ProcessRuntime(root, shim_idle_exit=0.3)
    try:
        await rt.start("once", sh("echo one"))
        first = shim_pid(rt, "once")
        assert (await rt.wait("once", 5)).exit_code == 0
        # nothing left to supervise: it goes away by itself, and takes its socket along
        await until(lambda: not _alive(first, None))
        assert not (root / CONTROL_SOCK).exists() and shims_of(root) == []
        # the next start brings up a new one
        await rt.start("twice", sh("echo two; sleep 30"))
        second = shim_pid(rt, "twice")
        assert second != first and _alive(second, None) and shims_of(root) == [second]
        assert rt.status("twice").state == "running"
        assert (await rt.wait("once", 1)).exit_code == 0  # the old container's record is unchanged
        # while a container runs it stays, however long past the idle time
        await asyncio.sleep(1)
        assert _alive(second, None)
        await rt.stop("twice", 1)
        await until(lambda: not _alive(second, None))
        # starts racing the idle exit (some land while it exits): each container runs exactly once
        marks = tmp_path / "marks"
        marks.mkdir()
        for i in range(12):
            await rt.start(f"r{i}", sh(f"echo x >> {marks}/r{i}"))
            assert (await rt.wait(f"r{i}", 5)).exit_code == 0
            await asyncio.sleep(0.25 + 0.01 * i)
        assert all((marks / f"r{i}").read_text() == "x\n" for i in range(12))
    finally:
        _cleanup(root)


async def test_stale_socket_and_killed_shim(rt: ProcessRuntime) -> None:
    await rt.start("orphan", ContainerSpec(["sleep", "30"]))
    old = shim_pid(rt, "orphan")
    os.kill(old, signal.SIGKILL)
    await until(lambda: not _alive(old, None))
    assert (rt.root / CONTROL_SOCK).exists()  # left behind by the killed shim
    # a new shim takes over the root for new containers; the orphan keeps running, unsupervised
    await rt.start("new", ContainerSpec(["sleep", "30"]))
    new = shim_pid(rt, "new")
    assert new != old and rt.status("new").state == "running"
    assert rt.status("orphan").state == "running"
    # a claimed state dir is never started again, by any shim
    pid = rt.status("orphan").pid
    reply = ask(rt.root, json.dumps({"op": "start", "dir": str(rt.state_dir("orphan"))}).encode() + b"\n")
    assert reply == {"ok": True, "already": True} and rt.status("orphan").pid == pid
    rt.kill("orphan", signal.SIGKILL)
    await until(lambda: rt.status("orphan").state == "exited")
    assert rt.status("orphan").exit.reason == "ContainerStatusUnknown"  # type: ignore[union-attr]


def test_single_instance_per_root(tmp_path: Path) -> None:
    root = tmp_path / "rt"
    (root / "containers").mkdir(parents=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parent.parent / "src"),
                                                      os.environ.get("PYTHONPATH", "")]))
    procs = [subprocess.Popen([sys.executable, "-m", "kplane.kubelet.shim", str(root), "--idle-exit", "5"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env) for _ in range(5)]
    outs = [p.communicate(timeout=20) for p in procs]
    assert [p.returncode for p in procs] == [0] * 5, outs
    said = sorted(out.decode().split()[0].rstrip(":") for out, _ in outs)
    assert said == ["busy"] * 4 + ["ready"], outs
    (pid,) = shims_of(root)
    assert ping(root) == pid and proc_starttime(pid) is not None
    # a usage error says so
    bad = subprocess.run([sys.executable, "-m", "kplane.kubelet.shim", str(tmp_path / "nowhere")],
                         capture_output=True, env=env, timeout=20)
    assert bad.returncode == 2 and b"not a directory" in bad.stderr
    os.kill(pid, signal.SIGTERM)


async def test_same_id_again_while_the_old_one_finishes(rt: ProcessRuntime) -> None:
    """The shim tells containers apart by their state dir, not their id: a container removed and started again
    under the same id runs, even while the shim still hands the old one's last output to an attached client."""
    await rt.start("re", sh("sleep 0.3; head -c 3000000 /dev/zero", log_max_bytes=1 << 30))
    slow = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.connect(str(rt.state_dir("re") / "attach.sock"))  # and never reads
    try:
        assert (await rt.wait("re", 10)).exit_code == 0
        rt.remove("re")
        await rt.start("re", sh("echo second"))
        assert (await rt.wait("re", 10)).exit_code == 0
        assert read_logs(rt.log_path("re")) == b"second\n"
    finally:
        slow.close()
