"""kubectl exec, attach, cp and port-forward through the apiserver to the kubelet, over WebSocket (kubectl's
default) and SPDY (the fallback); the official Python client's stream() and portforward()."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.cluster import KUBECTL, Cluster, free_port
from tests.test_node import phase, run_pod, wait

MODES = {
    "websocket": {},
    "spdy": {"KUBECTL_REMOTE_COMMAND_WEBSOCKETS": "false", "KUBECTL_PORT_FORWARD_WEBSOCKETS": "false"},
}


@pytest.fixture(scope="module")
def box(cluster: Cluster) -> tuple[Cluster, str]:
    ns = "streaming"
    cluster.kubectl("create", "namespace", ns)
    run_pod(cluster, ns, "box", ["sh", "-c", "echo started; exec sleep 3600"])
    wait(lambda: phase(cluster, ns, "box") == "Running")
    return cluster, ns


@pytest.mark.parametrize("mode", MODES)
def test_exec_stdout_stderr_exit_code(box: tuple[Cluster, str], mode: str) -> None:
    cluster, ns = box
    p = cluster.kubectl("exec", "box", "-n", ns, "--", "sh", "-c", "echo out; echo err >&2; exit 4",
                        env=MODES[mode], check=False)
    assert p.returncode == 4
    assert p.stdout == "out\n" and "err" in p.stderr and "command terminated with exit code 4" in p.stderr
    p = cluster.kubectl("exec", "box", "-n", ns, "--", "true", env=MODES[mode])
    assert p.returncode == 0
    p = cluster.kubectl("exec", "box", "-n", ns, "--", "no-such-binary", env=MODES[mode], check=False)
    assert p.returncode == 127 and "executable file not found" in p.stderr


@pytest.mark.parametrize("mode", MODES)
def test_exec_stdin_2mb(box: tuple[Cluster, str], mode: str) -> None:
    cluster, ns = box
    data = os.urandom(2 * 1024 * 1024).hex()[: 2 * 1024 * 1024]
    p = cluster.kubectl("exec", "-i", "box", "-n", ns, "--", "sha256sum", input=data, env=MODES[mode])
    assert p.stdout.split()[0] == hashlib.sha256(data.encode()).hexdigest()
    p = cluster.kubectl("exec", "-i", "box", "-n", ns, "--", "cat", input="line one\nline two\n", env=MODES[mode])
    assert p.stdout == "line one\nline two\n"


@pytest.mark.parametrize("mode", MODES)
def test_exec_tty(box: tuple[Cluster, str], mode: str) -> None:
    import pty

    cluster, ns = box
    env = dict(os.environ, KUBECONFIG=str(cluster.kubeconfig), HOME=str(cluster.data_dir.parent), **MODES[mode])
    pid, fd = pty.fork()
    if pid == 0:  # kubectl -t needs a terminal on stdin
        os.execvpe(KUBECTL, [KUBECTL, "exec", "-it", "box", "-n", ns, "--", "sh", "-c", "tty; stty size; exit 6"],
                   env)
    out = b""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    _, status = os.waitpid(pid, 0)
    text = out.decode(errors="replace")
    assert "/dev/pts/" in text, text
    assert os.waitstatus_to_exitcode(status) == 6


@pytest.mark.parametrize("mode", MODES)
def test_attach(box: tuple[Cluster, str], mode: str) -> None:
    cluster, ns = box
    name = f"echoer-{mode}"
    body = json.dumps({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": {"containers": [
        {"name": "c", "image": "none", "stdin": True,
         "command": ["sh", "-c", "while read l; do echo got $l; done"]}]}})
    cluster.kubectl("apply", "-n", ns, "-f", "-", input=body)
    wait(lambda: phase(cluster, ns, name) == "Running")
    env = dict(os.environ, KUBECONFIG=str(cluster.kubeconfig), HOME=str(cluster.data_dir.parent), **MODES[mode])
    a = subprocess.Popen([KUBECTL, "attach", "-i", name, "-n", ns], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=env)
    try:
        assert a.stdin is not None and a.stdout is not None
        time.sleep(1.5)
        a.stdin.write(b"hello\n")
        a.stdin.flush()
        line = a.stdout.readline()
        assert line == b"got hello\n"
    finally:
        a.kill()
        a.wait(5)
    cluster.kubectl("delete", "pod", name, "-n", ns, "--wait=false")


@pytest.mark.parametrize("mode", MODES)
def test_cp_both_ways(box: tuple[Cluster, str], mode: str, tmp_path: Path) -> None:
    cluster, ns = box
    src = tmp_path / "payload.bin"
    src.write_bytes(os.urandom(300_000))
    remote = f"/tmp/kplane-cp-{mode}-{os.getpid()}.bin"
    cluster.kubectl("cp", str(src), f"{ns}/box:{remote}", env=MODES[mode])
    back = tmp_path / "back.bin"
    cluster.kubectl("cp", f"{ns}/box:{remote}", str(back), env=MODES[mode])
    assert back.read_bytes() == src.read_bytes()
    cluster.kubectl("exec", "box", "-n", ns, "--", "rm", remote, env=MODES[mode])


# An echo server run in a pod, bound only to the pod's 127.0.0.1 (port-forward must reach it there)
ECHO = ("import socket, sys, threading\n"
        "s = socket.socket()\n"
        "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
        "s.bind(('127.0.0.1', int(sys.argv[1])))\n"
        "s.listen(64)\n"
        "def echo(c):\n"
        "    with c:\n"
        "        while (b := c.recv(65536)):\n"
        "            c.sendall(b)\n"
        "while True:\n"
        "    c, _ = s.accept()\n"
        "    threading.Thread(target=echo, args=(c,), daemon=True).start()\n")


@pytest.fixture(scope="module")
def echo_port(box: tuple[Cluster, str]) -> int:
    """A pod ``echo`` serving on 127.0.0.1:<port> inside its own network (the host's when pods share it)."""
    cluster, ns = box
    port = free_port()
    run_pod(cluster, ns, "echo", [sys.executable, "-c", ECHO, str(port)])
    wait(lambda: phase(cluster, ns, "echo") == "Running")
    probe = f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=1)"
    wait(lambda: cluster.kubectl("exec", "echo", "-n", ns, "--", sys.executable, "-c", probe,
                                 check=False).returncode == 0)
    return port


def _roundtrip(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        got = b""

        def send() -> None:
            s.sendall(payload)

        t = threading.Thread(target=send)
        t.start()
        while len(got) < len(payload):
            b = s.recv(1 << 20)
            if not b:
                break
            got += b
        t.join()
        return got


@pytest.mark.parametrize("mode", MODES)
def test_port_forward_many_connections_and_large_transfer(box: tuple[Cluster, str], echo_port: int,
                                                          mode: str) -> None:
    cluster, ns = box
    target = echo_port
    local = free_port()
    env = dict(os.environ, KUBECONFIG=str(cluster.kubeconfig), HOME=str(cluster.data_dir.parent), **MODES[mode])
    pf = subprocess.Popen([KUBECTL, "port-forward", "-n", ns, "pod/echo", f"{local}:{target}"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert pf.stdout is not None
        assert "Forwarding from" in pf.stdout.readline()
        results: list[bool] = []

        def one(i: int) -> None:
            data = f"conn {i} ".encode() * 1000
            results.append(_roundtrip(local, data) == data)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert results == [True] * 20
        big = os.urandom(16 * 1024 * 1024)
        assert hashlib.sha256(_roundtrip(local, big)).digest() == hashlib.sha256(big).digest()
    finally:
        pf.terminate()
        pf.wait(10)


def test_python_client_exec_and_port_forward(box: tuple[Cluster, str], echo_port: int) -> None:
    from kubernetes import client, config
    from kubernetes.stream import portforward, stream

    cluster, ns = box
    api = client.CoreV1Api(config.new_client_from_config(config_file=str(cluster.kubeconfig)))
    out = stream(api.connect_get_namespaced_pod_exec, "box", ns, command=["sh", "-c", "echo py-exec"],
                 stderr=True, stdin=False, stdout=True, tty=False)
    assert out.strip() == "py-exec"
    resp = stream(api.connect_get_namespaced_pod_exec, "box", ns, command=["sh", "-c", "cat; exit 3"],
                  stderr=True, stdin=True, stdout=True, tty=False, _preload_content=False)
    resp.write_stdin("through stdin\n")
    resp.update(timeout=1)
    resp.close_channel(0) if hasattr(resp, "close_channel") else None
    resp.run_forever(timeout=10)
    assert "through stdin" in resp.read_stdout(timeout=1) + (resp.peek_stdout() or "")
    assert resp.returncode == 3
    target = echo_port
    pf = portforward(api.connect_get_namespaced_pod_portforward, "echo", ns, ports=str(target))
    sock = pf.socket(target)
    sock.setblocking(True)
    sock.sendall(b"ping over portforward")
    got = b""
    deadline = time.monotonic() + 10
    while len(got) < 21 and time.monotonic() < deadline:
        got += sock.recv(1024)
    assert got == b"ping over portforward"
    sock.close()
    pf.close()


def test_exec_refusals(box: tuple[Cluster, str]) -> None:
    cluster, ns = box
    p = cluster.kubectl("exec", "box", "-n", ns, "-c", "nope", "--", "true", check=False)
    assert p.returncode != 0 and "nope" in p.stderr
    p = cluster.kubectl("exec", "missing-pod", "-n", ns, "--", "true", check=False)
    assert p.returncode != 0 and "NotFound" in p.stderr
    run_pod(cluster, ns, "done", ["true"], restartPolicy="Never")
    wait(lambda: phase(cluster, ns, "done") == "Succeeded")
    p = cluster.kubectl("exec", "done", "-n", ns, "--", "true", check=False)
    assert (p.returncode != 0 and "completed pod" in p.stderr) or "not running" in p.stderr
