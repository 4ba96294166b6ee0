from __future__ import annotations

import asyncio
import os
import signal
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kplane.kubelet.crilog import follow, parse_line, read_logs, rotated_files
from kplane.kubelet.runtime import (
    ContainerExistsError,
    ContainerRunningError,
    ContainerSpec,
    ProcessRuntime,
    _alive,
    validate_id,
)
from kplane.kubelet.shim import proc_starttime

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def rt(tmp_path: Path) -> Iterator[ProcessRuntime]:
    runtime = ProcessRuntime(tmp_path / "rt")
    yield runtime
    # never leave processes behind
    for cid in ProcessRuntime(tmp_path / "rt").list():
        try:
            runtime.remove(cid, force=True)
        except Exception:
            runtime.kill(cid, signal.SIGKILL)


async def until(pred: Callable[[], bool], limit_s: float = 10.0) -> None:
    for _ in range(int(limit_s / 0.02)):
        if pred():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not met in time")


def sh(script: str, **kw: object) -> ContainerSpec:
    return ContainerSpec(argv=["sh", "-c", script], **kw)  # type: ignore[arg-type]


async def test_exit_code_and_logs(rt: ProcessRuntime) -> None:
    await rt.start("c1", sh("echo hi; echo err >&2; exit 3"))
    info = await rt.wait("c1", 5)
    assert info.exit_code == 3 and info.signal is None and info.reason == "Error"
    assert info.finished_at is not None and info.started_at is not None
    raw = rt.log_path("c1").read_bytes()
    parsed = [parse_line(line) for line in raw.splitlines(keepends=True)]
    assert {(s, c) for _, s, _, c in parsed} == {("stdout", b"hi"), ("stderr", b"err")}
    assert all(not partial for _, _, partial, _ in parsed)
    assert read_logs(rt.log_path("c1"), streams={"stdout"}) == b"hi\n"
    assert read_logs(rt.log_path("c1"), streams={"stderr"}) == b"err\n"
    st = rt.status("c1")
    assert st.state == "exited" and st.exit == info and not st.running


async def test_success_is_completed(rt: ProcessRuntime) -> None:
    await rt.start("ok", ContainerSpec(["true"]))
    info = await rt.wait("ok", 5)
    assert (info.exit_code, info.reason) == (0, "Completed")


async def test_sigterm_graceful(rt: ProcessRuntime) -> None:
    await rt.start("sleeper", ContainerSpec(["sleep", "30"]))
    st = rt.status("sleeper")
    assert st.state == "running" and st.pid is not None and st.started_at is not None
    # the container is not our child, and the shim is not either
    assert os.getpgid(st.pid) == st.pid
    t0 = time.monotonic()
    info = await rt.stop("sleeper", grace_s=1)
    assert time.monotonic() - t0 < 0.9
    assert (info.exit_code, info.signal) == (128 + signal.SIGTERM, signal.SIGTERM)
    assert not _alive(st.pid, None) or proc_starttime(st.pid) is None


async def test_sigkill_after_grace(rt: ProcessRuntime) -> None:
    await rt.start("stubborn", sh('trap "" TERM; echo ready; sleep 30'))
    # make sure the trap is installed before we signal
    await until(lambda: b"ready" in read_logs(rt.log_path("stubborn")))
    t0 = time.monotonic()
    info = await rt.stop("stubborn", grace_s=1)
    elapsed = time.monotonic() - t0
    assert 0.9 <= elapsed < 5
    assert (info.exit_code, info.signal) == (137, 9)
    # stopping again just returns the recorded exit
    assert await rt.stop("stubborn", grace_s=1) == info


async def test_missing_and_non_executable(rt: ProcessRuntime, tmp_path: Path) -> None:
    await rt.start("missing", ContainerSpec(["/nonexistent/binary-xyz", "arg"]))
    info = await rt.wait("missing", 5)
    assert (info.exit_code, info.reason) == (127, "StartError")
    assert info.message and "/nonexistent/binary-xyz" in info.message and "not found" in info.message
    assert b"/nonexistent/binary-xyz" in read_logs(rt.log_path("missing"), streams={"stderr"})

    await rt.start("nopath", ContainerSpec(["no-such-command-xyz"]))
    assert (await rt.wait("nopath", 5)).exit_code == 127

    script = tmp_path / "noexec.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o644)
    await rt.start("noexec", ContainerSpec([str(script)]))
    info = await rt.wait("noexec", 5)
    assert (info.exit_code, info.reason) == (126, "StartError")
    assert info.message and "cannot execute" in info.message

    await rt.start("badcwd", ContainerSpec(["true"], cwd=str(tmp_path / "nodir")))
    info = await rt.wait("badcwd", 5)
    assert info.reason == "StartError" and info.message and "working directory" in info.message


async def test_env_and_cwd(rt: ProcessRuntime, tmp_path: Path) -> None:
    work = tmp_path / "work dir"
    work.mkdir()
    spec = sh('echo "$FOO|$BAR|$(pwd)|${SECRET_AGENT_VAR:-unset}"', env={"FOO": "foo val", "BAR": "b=1"},
              cwd=str(work))
    os.environ["SECRET_AGENT_VAR"] = "leak"
    try:
        await rt.start("envcwd", spec)
    finally:
        del os.environ["SECRET_AGENT_VAR"]
    assert (await rt.wait("envcwd", 5)).exit_code == 0
    assert read_logs(rt.log_path("envcwd")) == f"foo val|b=1|{work}|unset\n".encode()


async def test_log_rotation(rt: ProcessRuntime, tmp_path: Path) -> None:
    log = tmp_path / "logs" / "0.log"
    script = 'i=0; while [ $i -lt 200 ]; do echo "line-$i-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"; i=$((i+1)); done'
    await rt.start("rot", sh(script, log_path=log, log_max_bytes=2000, log_max_files=3))
    assert (await rt.wait("rot", 5)).exit_code == 0
    assert rt.log_path("rot") == log
    assert [p.name for p in rotated_files(log)] == ["0.log.2", "0.log.1"]
    for p in [*rotated_files(log), log]:
        assert p.stat().st_size <= 2000
    lines = read_logs(log).decode().splitlines()
    nums = [int(x.split("-")[1]) for x in lines]
    assert nums == list(range(nums[0], 200)) and nums[0] > 0
    assert read_logs(log, tail=2) == (b"line-198-" + b"x" * 40 + b"\nline-199-" + b"x" * 40 + b"\n")
    rt.remove("rot")
    assert not log.exists() and not rotated_files(log)
    assert "rot" not in rt.list()


async def test_follow(rt: ProcessRuntime) -> None:
    await rt.start("fol", sh("echo a; sleep 0.3; echo b; sleep 0.3; printf c; sleep 0.3; echo d"))
    got: list[bytes] = []
    async for chunk in follow(rt.log_path("fol"), poll_interval=0.02,
                              stop=lambda: rt.status("fol").exit is not None):
        got.append(chunk)
    assert b"".join(got) == b"a\nb\ncd\n"
    assert len(got) >= 3  # delivered incrementally


async def test_remove_refuses_running_and_validation(rt: ProcessRuntime) -> None:
    await rt.start("run", ContainerSpec(["sleep", "30"]))
    with pytest.raises(ContainerExistsError):
        await rt.start("run", ContainerSpec(["true"]))
    with pytest.raises(ContainerRunningError):
        rt.remove("run")
    await rt.stop("run", 0)
    rt.remove("run")
    assert rt.status("run").state == "unknown"
    for bad in ["..", "../x", "a/b", "", ".hidden", "a..b", "x" * 300, "a\0b"]:
        with pytest.raises(ValueError):
            validate_id(bad)
        with pytest.raises(ValueError):
            await rt.start(bad, ContainerSpec(["true"]))
    assert rt.list() == []


def test_pid_reuse_guard() -> None:
    me = os.getpid()
    st = proc_starttime(me)
    assert st is not None
    assert _alive(me, st)
    assert not _alive(me, st + 1)  # same pid, different process start time => not ours


AGENT = textwrap.dedent("""
    import asyncio, sys
    from kplane.kubelet.runtime import ContainerSpec, ProcessRuntime
    async def main():
        rt = ProcessRuntime(sys.argv[1])
        await rt.start(sys.argv[2], ContainerSpec(sys.argv[3:]))
    asyncio.run(main())
""")


async def run_agent(root: Path, cid: str, *argv: str) -> None:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", AGENT, str(root), cid, *argv)
    assert await asyncio.wait_for(proc.wait(), 10) == 0


async def test_agent_restart(rt: ProcessRuntime) -> None:
    # an agent process starts containers and exits (crash/restart)
    await run_agent(rt.root, "long", "sleep", "30")
    await run_agent(rt.root, "short", "sh", "-c", "sleep 0.5; exit 7")
    # in-process runtime object dropped as well
    first = ProcessRuntime(rt.root)
    await first.start("inproc", ContainerSpec(["sleep", "30"]))
    del first

    fresh = ProcessRuntime(rt.root)
    assert fresh.list() == ["inproc", "long", "short"]
    st = fresh.status("long")
    assert st.state == "running" and st.pid is not None
    assert fresh.status("inproc").state == "running"
    # the short one exits while no agent is watching: its exit code is not lost
    info = await fresh.wait("short", 5)
    assert (info.exit_code, info.reason) == (7, "Error")
    assert ProcessRuntime(rt.root).status("short").exit == info
    info = await fresh.stop("long", 2)
    assert info.signal == signal.SIGTERM
    await fresh.stop("inproc", 2)


async def test_lost_shim_reports_unknown(rt: ProcessRuntime) -> None:
    await rt.start("orphan", ContainerSpec(["sleep", "30"]))
    d = rt.state_dir("orphan")
    shim_pid = int((d / "shim.pid").read_text().split()[0])
    os.kill(shim_pid, signal.SIGKILL)
    assert rt.status("orphan").state == "running"  # container still alive
    rt.kill("orphan", signal.SIGKILL)
    await until(lambda: rt.status("orphan").state != "running")
    st = rt.status("orphan")
    assert st.state == "exited" and st.exit is not None and st.exit.reason == "ContainerStatusUnknown"
