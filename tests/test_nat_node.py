"""A node behind NAT: it lives in its own network namespace (the project's own test host) whose firewall drops every
new inbound connection, so the control plane cannot dial its kubelet or its pods. It joins with `kplane agent`
over its outbound connection, and:

* with ``--egress konnectivity`` its agent dials out to the konnectivity server and kubectl logs, exec,
  port-forward, node proxy and pod proxy all work through that connection;
* the konnectivity server is killed and restarted: the agent is back and streams work again within 5 s;
* with ``--egress direct`` the same requests fail (the firewall is real);
* with ``--egress ssh`` (sshd in the node's namespace, port 22 opened) they work through an SSH tunnel.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tests.cluster import KUBECTL, Cluster, free_port, stop_containers
from tests.test_node import wait

BACKEND = Path(__file__).with_name("proxy_backend.py")
SSHD = "/usr/sbin/sshd"

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
    pytest.mark.skipif(not shutil.which("ip") or not shutil.which("nft"), reason="needs iproute2 and nftables"),
]


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, check=check, timeout=30)


@dataclass
class NatHost:
    ns: str
    host_if: str
    host_ip: str
    node_ip: str

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return sh("ip", "netns", "exec", self.ns, *args, check=check)


@pytest.fixture(scope="module")
def nat_host() -> Iterator[NatHost]:
    tag = f"{os.getpid() % 100000}"
    idx = os.getpid() % 200
    h = NatHost(ns=f"kpnat{tag}", host_if=f"kpnh{tag}", host_ip=f"10.250.{idx}.1", node_ip=f"10.250.{idx}.2")
    peer = f"kpnn{tag}"
    try:
        sh("ip", "netns", "add", h.ns)
        sh("ip", "link", "add", h.host_if, "type", "veth", "peer", "name", peer)
        sh("ip", "link", "set", peer, "netns", h.ns)
        sh("ip", "addr", "add", f"{h.host_ip}/24", "dev", h.host_if)
        sh("ip", "link", "set", h.host_if, "up")
        h.run("ip", "addr", "add", f"{h.node_ip}/24", "dev", peer)
        h.run("ip", "link", "set", peer, "up")
        h.run("ip", "link", "set", "lo", "up")
        h.run("ip", "route", "add", "default", "via", h.host_ip)
        # the NAT: nothing new gets in; what the node opened itself gets its answers
        rules = ("table inet natnode {\n chain input {\n  type filter hook input priority 0; policy accept;\n"
                 "  ct state established,related accept\n  iif lo accept\n  ct state new drop\n }\n}\n")
        subprocess.run(["ip", "netns", "exec", h.ns, "nft", "-f", "-"], input=rules, text=True, check=True,
                       timeout=30)
        yield h
    finally:
        sh("ip", "link", "del", h.host_if, check=False)
        sh("ip", "netns", "del", h.ns, check=False)


def _agent(cluster: Cluster, h: NatHost, data: Path, kubelet_port: int) -> subprocess.Popen[bytes]:
    out = subprocess.run([sys.executable, "-m", "kplane.cli", "token", "create", "--data-dir", str(cluster.data_dir)],
                         capture_output=True, text=True, check=True).stdout.split()
    token, ca_hash = out[0], out[-1]
    log = (data.parent / "nat-agent.log").open("ab")
    return subprocess.Popen(
        ["ip", "netns", "exec", h.ns, sys.executable, "-m", "kplane.cli", "agent",
         "--server", f"https://{h.host_ip}:{cluster.port}", "--token", token,
         "--discovery-token-ca-cert-hash", ca_hash, "--data-dir", str(data), "--node-name", "natnode",
         "--node-ip", h.node_ip, "--kubelet-port", str(kubelet_port), "--pod-network", "host",
         "--pod-restart-backoff", "1"],
        stdout=log, stderr=subprocess.STDOUT)


def _restart(cluster: Cluster, *extra: str) -> float:
    cluster.stop(keep_pods=True)
    cluster.extra_args = list(extra)
    cluster.start(timeout=60)
    return time.monotonic()


def _checks(cluster: Cluster, port: int) -> dict[str, bool]:
    """Which control plane -> node paths work right now (each with a short timeout)."""
    ok: dict[str, bool] = {}
    ok["logs"] = "serving on" in cluster.kubectl("logs", "web", "-n", "nat", check=False, timeout=20).stdout
    ok["exec"] = cluster.kubectl("exec", "web", "-n", "nat", "--", "echo", "exec-ok", check=False,
                                 timeout=20).stdout.strip() == "exec-ok"
    node_proxy = cluster.kubectl("get", "--raw", "/api/v1/nodes/natnode/proxy/healthz", check=False, timeout=20)
    ok["node-proxy"] = node_proxy.returncode == 0 and node_proxy.stdout == "ok"
    pod_proxy = cluster.kubectl("get", "--raw", f"/api/v1/namespaces/nat/pods/web:{port}/proxy/through",
                                check=False, timeout=20)
    ok["pod-proxy"] = pod_proxy.returncode == 0 and '"/through"' in pod_proxy.stdout
    local = free_port()
    env = dict(os.environ, KUBECONFIG=str(cluster.kubeconfig), HOME=str(cluster.data_dir.parent))
    pf = subprocess.Popen([KUBECTL, "port-forward", "-n", "nat", "pod/web", f"{local}:{port}"], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        got = None
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and pf.poll() is None:
            try:
                got = requests.get(f"http://127.0.0.1:{local}/forwarded", timeout=5).json()
                break
            except (requests.RequestException, ValueError):
                time.sleep(0.3)
        ok["port-forward"] = bool(got and got["path"] == "/forwarded")
    finally:
        pf.kill()
        pf.wait()
    return ok


def _sshd(h: NatHost, root: Path, client_pub: Path) -> tuple[subprocess.Popen[bytes], str]:
    sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / "host_key"))
    shutil.copy(client_pub, root / "authorized_keys")
    (root / "sshd_config").write_text(f"""\
Port 22
ListenAddress {h.node_ip}
HostKey {root}/host_key
PidFile {root}/sshd.pid
AuthorizedKeysFile {root}/authorized_keys
StrictModes no
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
AllowTcpForwarding yes
""")
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    proc = subprocess.Popen(["ip", "netns", "exec", h.ns, SSHD, "-D", "-e", "-f", str(root / "sshd_config")],
                            stdout=(root / "sshd.log").open("ab"), stderr=subprocess.STDOUT)
    pub = (root / "host_key.pub").read_text().split()
    return proc, f"{h.node_ip} {pub[0]} {pub[1]}\n"


@pytest.mark.timeout(600)
def test_node_behind_nat(nat_host: NatHost, tmp_path: Path) -> None:
    h = nat_host
    agent_port, health_port = free_port(), free_port()
    base = ["--egress", "konnectivity", "--advertise-address", h.host_ip, "--konnectivity-agent-port",
            str(agent_port), "--konnectivity-health-port", str(health_port)]
    cluster = Cluster(tmp_path / "cp", node=False, extra_args=list(base))
    cluster.start(timeout=60)
    agent_data = tmp_path / "agent"
    agent = _agent(cluster, h, agent_data, kubelet_port := free_port())
    sshd: subprocess.Popen[bytes] | None = None
    try:
        wait(lambda: "Ready" in cluster.kubectl("get", "node", "natnode", check=False).stdout, timeout=60)
        node = json.loads(cluster.kubectl("get", "node", "natnode", "-o", "json").stdout)
        assert {"type": "InternalIP", "address": h.node_ip} in node["status"]["addresses"]
        # the firewall: the control plane's host cannot open a connection to the node's kubelet
        with socket.socket() as s:
            s.settimeout(2)
            with pytest.raises(OSError):
                s.connect((h.node_ip, kubelet_port))
        cluster.kubectl("create", "namespace", "nat")
        port = free_port()
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web"},
               "spec": {"nodeName": "natnode", "containers": [{
                   "name": "c", "image": "none", "ports": [{"containerPort": port}],
                   "command": [sys.executable, str(BACKEND), str(port), "-", "0.0.0.0", "nat"]}]}}
        cluster.kubectl("apply", "-n", "nat", "-f", "-", input=json.dumps(pod))
        wait(lambda: cluster.kubectl("get", "pod", "web", "-n", "nat", "-o", "jsonpath={.status.phase}",
                                     check=False).stdout == "Running", timeout=60)

        # 1. through konnectivity: every path works
        wait(lambda: _checks(cluster, port)["logs"], timeout=30)
        assert _checks(cluster, port) == dict.fromkeys(("logs", "exec", "node-proxy", "pod-proxy", "port-forward"),
                                                        True)
        metrics = requests.get(f"http://127.0.0.1:{health_port}/metrics", timeout=5).text
        assert "konnectivity_network_proxy_server_ready_backends 1" in metrics

        # 2. the server is killed and comes back: the agent reconnects and streams work within 5 s
        back = _restart(cluster, *base)

        def logs_ok() -> bool:
            return "serving on" in cluster.kubectl("logs", "web", "-n", "nat", check=False, timeout=10).stdout

        wait(logs_ok, timeout=5, every=0.2)
        took = time.monotonic() - back
        print(f"streams back {took:.2f} s after the restarted server was ready")

        # 3. --egress direct: the apiserver dials the node itself and the firewall stops it
        _restart(cluster, "--egress", "direct", "--advertise-address", h.host_ip)
        direct = _checks(cluster, port)
        assert not any(direct.values()), direct
        p = cluster.kubectl("logs", "web", "-n", "nat", check=False, timeout=30)
        assert p.returncode != 0 and "error dialing the kubelet" in p.stderr, p.stderr

        # 4. --egress ssh: sshd in the node's namespace, port 22 let in; the apiserver's key authorized there
        h.run("nft", "insert", "rule", "inet", "natnode", "input", "tcp", "dport", "22", "accept")
        ssh_dir = tmp_path / "ssh"
        ssh_dir.mkdir()
        key = ssh_dir / "apiserver_key"
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key))
        sshd, known = _sshd(h, ssh_dir, key.with_suffix(".pub"))
        (ssh_dir / "known_hosts").write_text(known)
        _restart(cluster, "--egress", "ssh", "--advertise-address", h.host_ip, "--ssh-user", "root",
                 "--ssh-keyfile", str(key), "--ssh-known-hosts", str(ssh_dir / "known_hosts"))
        wait(lambda: _checks(cluster, port)["logs"], timeout=40)
        assert _checks(cluster, port) == dict.fromkeys(("logs", "exec", "node-proxy", "pod-proxy", "port-forward"),
                                                        True)
        assert "deprecated" in cluster.log_path.read_text().lower()
    finally:
        if sshd is not None:
            sshd.kill()
            sshd.wait()
        agent.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            agent.wait(15)
        if agent.poll() is None:
            agent.kill()
        stop_containers(agent_data)
        with contextlib.suppress(Exception):
            cluster.stop()
