"""Pod networking as root: a network namespace per pod with an IP from the node's podCIDR, reachable from the host
and from other pods (on this node, on a second node sharing the host's network, and on a node in another network
namespace standing in for another host, through routes via the nodes' InternalIPs); port-forward to a server bound
to the pod's own 127.0.0.1; exec inside the pod's network; deletion frees everything; an agent restart keeps the
pod's IP and connectivity and reaps what belonged to pods deleted meanwhile; host-network pods and the
``--pod-network host`` fallback (stated in an Event)."""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kplane.kubelet import podnet
from kplane.netutil import default_ipv4
from tests.cluster import KUBECTL, Cluster, claim_net_index, free_port, stop_containers
from tests.test_node import agent_cmd, phase, pod_json, token_create, wait


def root(fn: Any) -> Any:
    for mark in (pytest.mark.root,
                 pytest.mark.skipif(os.geteuid() != 0, reason="pod network namespaces need root"),
                 pytest.mark.skipif(not shutil.which("nft"), reason="nftables (nft) is not installed"),
                 pytest.mark.skipif(not shutil.which("nsenter"), reason="nsenter (util-linux) is not installed")):
        fn = mark(fn)
    return fn


# a TCP server for pods: answers every connection with "<pod name> <peer address>"
SERVE = ("import os, socket, sys\n"
         "s = socket.socket()\n"
         "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
         "s.bind((sys.argv[1], int(sys.argv[2])))\n"
         "s.listen(16)\n"
         "while True:\n"
         "    c, peer = s.accept()\n"
         "    c.sendall(('%s %s\\n' % (os.environ['HOSTNAME'], peer[0])).encode())\n"
         "    c.close()\n")
# and its client, run with kubectl exec inside another pod
FETCH = ("import socket, sys\n"
         "c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)\n"
         "print(c.recv(200).decode().strip())\n")
PORT = 8080


def node_of(c: Cluster) -> str:
    return next(c.data_dir.glob("node/*")).name


def pod_cidr(c: Cluster, node: str) -> str:
    return c.kubectl("get", "node", node, "-o", "jsonpath={.spec.podCIDR}").stdout.strip()


def serve_pod(c: Cluster, ns: str, name: str, *, bind: str = "0.0.0.0", port: int = PORT, node: str | None = None,
              **spec: Any) -> dict[str, Any]:
    body = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"containers": [{"name": "c", "image": "none",
                                     "command": [sys.executable, "-c", SERVE, bind, str(port)]}],
                     "terminationGracePeriodSeconds": 1, **spec}}
    if node:
        body["spec"]["nodeName"] = node
    c.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(body))
    wait(lambda: phase(c, ns, name) == "Running", timeout=40)
    return pod_json(c, ns, name)


def fetch(ip: str, port: int = PORT, timeout: float = 20) -> str:
    """Connect from the host (retrying while the pod's server starts) and read its answer."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((ip, port), timeout=3) as s:
                return s.recv(200).decode().strip()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def fetch_from_pod(c: Cluster, ns: str, pod: str, ip: str, port: int = PORT) -> str:
    def once() -> str | None:
        p = c.kubectl("exec", pod, "-n", ns, "--", sys.executable, "-c", FETCH, ip, str(port), check=False)
        return p.stdout.strip() if p.returncode == 0 else None

    return str(wait(once, timeout=30, every=0.5))


def state(c: Cluster | Path, node: str) -> dict[str, Any]:
    base = c.data_dir if isinstance(c, Cluster) else c
    return json.loads(podnet.state_path(base / "node" / node).read_text())  # type: ignore[no-any-return]


def link_exists(name: str, netns: str | None = None) -> bool:
    cmd = ["ip", "-o", "link", "show", name]
    if netns:
        cmd = ["nsenter", f"--net={netns}", "--", *cmd]
    return subprocess.run(cmd, capture_output=True).returncode == 0


# --- the pure parts (no root) -----------------------------------------------------------------------------


def test_names_are_stable_unique_and_fit_link_names() -> None:
    a, b = podnet.NodeNet("node-a", "10.244.0.0/24"), podnet.NodeNet("node-b", "10.244.1.0/24")
    assert a == podnet.NodeNet("node-a", "10.244.0.0/24") and a.bridge == podnet.NodeNet("node-a",
                                                                                         "10.244.0.0/24").bridge
    assert len({a.bridge, b.bridge, podnet.NodeNet("node-a", "10.244.1.0/24").bridge}) == 3
    uid = "0c4ba6c1-5f5c-4a5e-9a55-3f6a0c0f7e11"
    for name in (a.bridge, b.bridge, a.veth_name(uid), b.veth_name(uid)):
        assert len(name) <= 15 and name.isascii()
    assert a.veth_name(uid) != b.veth_name(uid) != b.veth_name(uid[::-1])
    assert a.netns_name(uid) == f"kp-{a.key}-{uid}" and a.table == f"kplane-podnet-{a.key}"
    assert a.gateway == "10.244.0.1"
    with pytest.raises(ValueError, match="only IPv4"):
        _ = podnet.NodeNet("n", "fd00::/64").network


def test_pod_ipam_skips_reserved_addresses_round_robin_and_exhaustion() -> None:
    ipam = podnet.PodIPAM("10.9.0.0/29")  # .1 is the gateway, .0 and .7 are not hosts: .2-.6 for pods
    got = [ipam.allocate(f"u{i}") for i in range(5)]
    assert got == ["10.9.0.2", "10.9.0.3", "10.9.0.4", "10.9.0.5", "10.9.0.6"]
    assert ipam.allocate("u1") == "10.9.0.3"  # idempotent: a pod keeps its IP
    with pytest.raises(podnet.IPAMExhausted, match=r"no free pod IP left in 10\.9\.0\.0/29"):
        ipam.allocate("u9")
    assert ipam.release("u1") == "10.9.0.3" and ipam.release("u1") is None
    ipam.release("u3")
    assert ipam.allocate("u10") == "10.9.0.3"
    # rebuilt from persisted state: same IPs, and the round robin continues after the last one handed out
    again = podnet.PodIPAM("10.9.0.0/29", dict(ipam.ips), ipam.last)
    assert again.allocate("u10") == "10.9.0.3" and again.last == "10.9.0.3"
    again.release("u0")  # 10.9.0.2
    again.release("u4")  # 10.9.0.6
    assert [again.allocate("u11"), again.allocate("u12"), again.allocate("u13")] == [
        "10.9.0.5", "10.9.0.6", "10.9.0.2"]


def test_route_plan() -> None:
    peers = {"same-host": (["10.244.1.0/24"], "192.0.2.2"), "far": (["10.244.2.0/24"], "198.51.100.7"),
             "no-ip": (["10.244.3.0/24"], None), "loop": (["10.244.4.0/24"], "127.0.0.1"),
             "link-local": (["10.244.5.0/24"], "169.254.1.1"), "mine": (["10.244.0.0/24"], "198.51.100.8"),
             "v6": (["fd00::/64"], "2001:db8::1"), "junk": (["x"], "198.51.100.9"),
             "no-cidr": ([], "198.51.100.10")}
    assert podnet.plan_routes(peers, "10.244.0.0/24", {"192.0.2.2", "127.0.0.1"}) == {
        "10.244.2.0/24": "198.51.100.7"}


def test_masquerade_ruleset_replaces_the_table_atomically() -> None:
    text = podnet.masquerade_ruleset("kplane-podnet-x", "10.244.0.0/24", ["10.244.1.0/24", "10.244.0.0/24",
                                                                           "fd00::/64"])
    lines = text.splitlines()
    assert lines[:2] == ["table ip kplane-podnet-x {}", "delete table ip kplane-podnet-x"]
    assert "elements = { 10.244.0.0/23 }" in text  # collapsed, IPv4 only, no overlaps for the interval set
    assert "ip saddr 10.244.0.0/24 ip daddr != @pod-cidrs masquerade" in text
    if os.geteuid() == 0 and shutil.which("nft"):
        check = subprocess.run(["nft", "-c", "-f", "-"], input=text, capture_output=True, text=True)
        assert check.returncode == 0, check.stderr


# --- one kplane up cluster ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("podnet") / "data")
    c.start(timeout=60)
    try:
        c.kubectl("create", "namespace", "pn")
        yield c
    finally:
        c.stop()


@root
def test_pod_ip_from_podcidr_reachable_from_host(up: Cluster) -> None:
    node = node_of(up)
    cidr = ipaddress.ip_network(pod_cidr(up, node))
    assert cidr.subnet_of(ipaddress.ip_network(up.cluster_cidr))  # type: ignore[arg-type]
    pod = serve_pod(up, "pn", "web")
    ip = pod["status"]["podIP"]
    assert ipaddress.ip_address(ip) in cidr and pod["status"]["podIPs"] == [{"ip": ip}]
    assert ip != pod["status"]["hostIP"]
    wide = up.kubectl("get", "pod", "web", "-n", "pn", "-o", "wide").stdout.splitlines()
    assert wide[0].split()[5] == "IP" and wide[1].split()[5] == ip
    gateway = str(cidr.network_address + 1)
    assert fetch(ip) == f"web {gateway}"  # the host reaches the pod from its bridge address
    # the pod's side: eth0 with its IP, a default route via the gateway, its own namespace and a veth on the bridge
    out = up.kubectl("exec", "web", "-n", "pn", "--", "ip", "-o", "-4", "addr", "show").stdout
    assert f"eth0    inet {ip}/{cidr.prefixlen}" in out and "lo    inet 127.0.0.1/8" in out
    assert f"default via {gateway} dev eth0" in up.kubectl("exec", "web", "-n", "pn", "--", "ip", "route").stdout
    rec = state(up, node)["pods"][pod["metadata"]["uid"]]
    assert rec["ip"] == ip and (podnet.NETNS_DIR / rec["netns"]).exists()
    br = state(up, node)["bridge"]
    link = subprocess.run(["ip", "-d", "link", "show", rec["veth"]], capture_output=True, text=True).stdout
    assert f"master {br}" in link and "hairpin on" in link
    # the downward API sees the same IP
    up.kubectl("apply", "-n", "pn", "-f", "-", input=json.dumps({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "env"},
        "spec": {"restartPolicy": "Never", "containers": [{
            "name": "c", "image": "none", "command": ["sh", "-c", "echo ip=$MY_IP"],
            "env": [{"name": "MY_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}]}]}}))
    wait(lambda: phase(up, "pn", "env") == "Succeeded")
    env_ip = pod_json(up, "pn", "env")["status"]["podIP"]
    assert up.kubectl("logs", "env", "-n", "pn").stdout.strip() == f"ip={env_ip}"
    assert ipaddress.ip_address(env_ip) in cidr and env_ip != ip


@root
def test_two_pods_reach_each_other_by_pod_ip(up: Cluster) -> None:
    web = serve_pod(up, "pn", "web2")
    other = serve_pod(up, "pn", "other")
    ip, other_ip = web["status"]["podIP"], other["status"]["podIP"]
    assert ip != other_ip
    # no address translation between pods: the server sees the client pod's own IP
    assert fetch_from_pod(up, "pn", "other", ip) == f"web2 {other_ip}"
    assert fetch_from_pod(up, "pn", "web2", other_ip) == f"other {ip}"


@root
def test_port_forward_reaches_a_server_bound_to_the_pods_localhost(up: Cluster) -> None:
    pod = serve_pod(up, "pn", "local", bind="127.0.0.1")
    fetch_from_pod(up, "pn", "local", "127.0.0.1")  # listening now
    with pytest.raises(OSError):  # not reachable from outside the pod ...
        socket.create_connection((pod["status"]["podIP"], PORT), timeout=3)
    local = free_port()
    env = dict(os.environ, KUBECONFIG=str(up.kubeconfig), HOME=str(up.data_dir.parent))
    closed = free_port()
    pf = subprocess.Popen([KUBECTL, "port-forward", "-n", "pn", "pod/local", f"{local}:{PORT}", f"{closed}:9"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert pf.stdout is not None and "Forwarding from" in pf.stdout.readline()
        assert fetch("127.0.0.1", local) == "local 127.0.0.1"  # ... but through port-forward, as upstream
        # nothing listens on the pod's port 9: the connection is closed and kubectl reports the kubelet's error
        with socket.create_connection(("127.0.0.1", closed), timeout=5) as s:
            s.settimeout(10)
            assert s.recv(10) == b""
    finally:
        with contextlib.suppress(subprocess.TimeoutExpired):
            pf.wait(5)
        pf.terminate()
        _, err = pf.communicate(timeout=10)
    assert "failed to connect to localhost:9 inside namespace of pod local" in err


@root
def test_host_network_pod_uses_the_node_ip(up: Cluster) -> None:
    node = node_of(up)
    internal = json.loads(up.kubectl("get", "node", node, "-o", "json").stdout)["status"]["addresses"][0]["address"]
    port = free_port()
    pod = serve_pod(up, "pn", "hostnet", hostNetwork=True, bind="127.0.0.1", port=port)
    assert pod["status"]["podIP"] == internal == pod["status"]["hostIP"]
    assert pod["metadata"]["uid"] not in state(up, node)["pods"]
    # it shares the host's network: its port is on the host's loopback
    assert fetch("127.0.0.1", port) == "hostnet 127.0.0.1"
    up.kubectl("delete", "pod", "hostnet", "-n", "pn")


@root
def test_delete_frees_ip_and_removes_netns_and_veth(up: Cluster) -> None:
    node = node_of(up)
    pod = serve_pod(up, "pn", "short")
    uid, ip = pod["metadata"]["uid"], pod["status"]["podIP"]
    rec = state(up, node)["pods"][uid]
    netns = podnet.NETNS_DIR / rec["netns"]
    assert netns.exists() and link_exists(rec["veth"])
    up.kubectl("delete", "pod", "short", "-n", "pn", "--timeout=30s")
    wait(lambda: uid not in state(up, node)["pods"])
    assert ip not in {r["ip"] for r in state(up, node)["pods"].values()}
    assert not netns.exists() and not link_exists(rec["veth"])
    # a finished pod gives its namespace and IP back, and its status keeps the IP (as upstream)
    up.kubectl("apply", "-n", "pn", "-f", "-", input=json.dumps({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "done"},
        "spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "none", "command": ["true"]}]}}))
    wait(lambda: phase(up, "pn", "done") == "Succeeded")
    done = pod_json(up, "pn", "done")
    wait(lambda: done["metadata"]["uid"] not in state(up, node)["pods"])
    assert ipaddress.ip_address(done["status"]["podIP"]) in ipaddress.ip_network(pod_cidr(up, node))


@root
def test_masquerade_table_is_podnets_own(up: Cluster) -> None:
    st = state(up, node_of(up))
    out = subprocess.run(["nft", "list", "table", "ip", st["table"]], capture_output=True, text=True).stdout
    assert f"ip saddr {st['podCIDR']} ip daddr != @pod-cidrs masquerade" in out
    assert st["table"].startswith("kplane-podnet-") and len(st["bridge"]) <= 15


# --- more nodes joined with kplane agent -------------------------------------------------------------------


class Agent:
    def __init__(self, server: Cluster, data: Path, name: str, *extra: str, netns: str | None = None) -> None:
        token, ca_hash = token_create(server)
        self.server, self.data, self.name, self.netns = server, data, name, netns
        self.cmd = agent_cmd(server, data, name, "--token", token, "--discovery-token-ca-cert-hash", ca_hash,
                             *extra)
        if netns:
            self.cmd = ["nsenter", f"--net={netns}", "--", *self.cmd]
        self.log = data.parent / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(self.cmd, stdout=self.log.open("ab"), stderr=subprocess.STDOUT)
        wait(lambda: pod_cidr_ready(self.server, self.name), timeout=60)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(2)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def cleanup(self) -> None:
        self.stop()
        if self.netns:
            podnet.run_in_netns(self.netns, lambda: stop_containers(self.data))
        else:
            stop_containers(self.data)


def pod_cidr_ready(c: Cluster, node: str) -> bool:
    p = c.kubectl("get", "node", node, "-o", "json", check=False)
    if p.returncode != 0:
        return False
    n = json.loads(p.stdout)
    ready = any(x["type"] == "Ready" and x["status"] == "True" for x in n["status"].get("conditions") or [])
    return ready and bool(n["spec"].get("podCIDR"))


@root
def test_second_node_on_the_same_host_restart_and_reaping(up: Cluster, tmp_path: Path) -> None:
    a = Agent(up, tmp_path / "second", "pn-second")
    try:
        a.start()
        first, second = pod_cidr(up, node_of(up)), pod_cidr(up, "pn-second")
        assert first != second and not ipaddress.ip_network(first).overlaps(ipaddress.ip_network(second))
        there = serve_pod(up, "pn", "there", node="pn-second")
        here = serve_pod(up, "pn", "here", node=node_of(up))
        ip = there["status"]["podIP"]
        assert ipaddress.ip_address(ip) in ipaddress.ip_network(second)
        # nodes sharing the host's network namespace reach each other's bridges directly (no routes needed)
        assert fetch_from_pod(up, "pn", "here", ip) == f"there {here['status']['podIP']}"
        assert fetch_from_pod(up, "pn", "there", here["status"]["podIP"]) == f"here {ip}"
        assert state(a.data, "pn-second")["routes"] == {}
        gone = serve_pod(up, "pn", "gone", node="pn-second")
        gone_rec = state(a.data, "pn-second")["pods"][gone["metadata"]["uid"]]

        # the agent stops: pods, their namespaces and their IPs stay
        uid = there["metadata"]["uid"]
        pid = int(next(a.data.glob(f"node/pn-second/containers/containers/{uid}_c_0/pid")).read_text().split()[0])
        a.stop()
        assert fetch(ip) == f"there {ipaddress.ip_network(second).network_address + 1}"
        # a pod deleted while the agent is down leaves an orphaned namespace the restarted agent reaps
        up.kubectl("delete", "pod", "gone", "-n", "pn", "--grace-period=0", "--force")
        a.start()
        wait(lambda: not (podnet.NETNS_DIR / gone_rec["netns"]).exists(), timeout=40)
        assert gone["metadata"]["uid"] not in state(a.data, "pn-second")["pods"]
        assert not link_exists(gone_rec["veth"])
        # the running pod was adopted with its IP and keeps working
        os.kill(pid, 0)
        time.sleep(2)
        after = pod_json(up, "pn", "there")
        assert after["status"]["podIP"] == ip and after["status"]["containerStatuses"][0]["restartCount"] == 0
        assert state(a.data, "pn-second")["pods"][uid]["ip"] == ip
        assert fetch_from_pod(up, "pn", "here", ip) == f"there {here['status']['podIP']}"
        up.kubectl("exec", "there", "-n", "pn", "--", "true")
    finally:
        for p in ("there", "here", "gone"):
            up.kubectl("delete", "pod", p, "-n", "pn", "--wait=false", check=False)
        a.cleanup()
        up.kubectl("delete", "node", "pn-second", check=False)


@root
def test_pod_network_host_is_stated_in_an_event(up: Cluster, tmp_path: Path) -> None:
    a = Agent(up, tmp_path / "hostmode", "pn-hostmode", "--pod-network", "host")
    try:
        a.start()
        pod = serve_pod(up, "pn", "shared", node="pn-hostmode", bind="127.0.0.1", port=free_port())
        assert pod["status"]["podIP"] == pod["status"]["hostIP"] == default_ipv4()
        assert not podnet.state_path(a.data / "node" / "pn-hostmode").exists()
        events = wait(lambda: json.loads(up.kubectl(
            "get", "events", "-n", "pn", "--field-selector", "involvedObject.name=shared,reason=HostNetworkFallback",
            "-o", "json").stdout)["items"])
        assert "shares the host's network namespace" in events[0]["message"]
        assert "--pod-network host" in events[0]["message"]
        assert "HostNetworkFallback" in up.kubectl("describe", "pod", "shared", "-n", "pn").stdout
    finally:
        up.kubectl("delete", "pod", "shared", "-n", "pn", "--wait=false", check=False)
        a.cleanup()
        up.kubectl("delete", "node", "pn-hostmode", check=False)


# --- two "hosts": a node in its own network namespace, joined to the first by a veth ------------------------


@pytest.fixture
def other_host(tmp_path: Path) -> Iterator[tuple[str, str, str]]:
    """A network namespace standing in for another machine, linked to this one by a veth pair; addresses from a
    /30 inside this test process's claimed /16 (outside the cluster CIDR the test uses)."""
    from pyroute2 import IPRoute

    idx = claim_net_index()
    tag = hashlib.sha256(f"{os.getpid()}/{tmp_path}".encode()).hexdigest()[:8]
    name, host_end = f"kpt-{tag}-host", f"kpt{tag}h"
    here, there = f"10.{100 + idx}.200.1", f"10.{100 + idx}.200.2"
    podnet.create_netns(name)
    path = str(podnet.NETNS_DIR / name)
    try:
        with IPRoute() as ipr:
            ipr.link("add", ifname=host_end, kind="veth", peer={"ifname": "eth0", "net_ns_fd": path})
            i = ipr.link_lookup(ifname=host_end)[0]
            ipr.addr("add", index=i, address=here, prefixlen=30)
            ipr.link("set", index=i, state="up")

        def inside() -> None:
            with IPRoute() as ipn:
                for ifname in ("lo", "eth0"):
                    ipn.link("set", index=ipn.link_lookup(ifname=ifname)[0], state="up")
                ipn.addr("add", index=ipn.link_lookup(ifname="eth0")[0], address=there, prefixlen=30)

        podnet.run_in_netns(path, inside)
        yield path, here, there
    finally:
        podnet.remove_link(host_end)
        podnet.remove_pod(name, "")
        (Path("/tmp/kplane-test-nets") / str(idx)).unlink(missing_ok=True)


@root
def test_nodes_on_two_hosts_route_to_each_others_podcidr(tmp_path: Path, other_host: tuple[str, str, str]) -> None:
    ns_path, here, there = other_host
    (tmp_path / "server").mkdir()
    server = Cluster(tmp_path / "server" / "data", node=False)
    server.net_index = claim_net_index()
    server.extra_args = ["--cluster-cidr", f"10.{100 + server.net_index}.0.0/17", "--tls-san", here]
    server.start()
    a = Agent(server, tmp_path / "a", "pn-a", "--node-ip", here)
    b = Agent(server, tmp_path / "b", "pn-b", "--node-ip", there, netns=ns_path)
    b.cmd[b.cmd.index("--server") + 1] = f"https://{here}:{server.port}"
    try:
        a.start()
        b.start()
        cidr_a, cidr_b = pod_cidr(server, "pn-a"), pod_cidr(server, "pn-b")
        assert cidr_a != cidr_b
        # each node routes the other's podCIDR via the other's InternalIP
        def routes(agent: Agent) -> dict[str, str]:
            path = podnet.state_path(agent.data / "node" / agent.name)
            return json.loads(path.read_text())["routes"] if path.exists() else {}  # type: ignore[no-any-return]

        wait(lambda: routes(a) == {cidr_b: there} and routes(b) == {cidr_a: here})
        out = subprocess.run(["ip", "route", "show", cidr_b], capture_output=True, text=True).stdout
        assert f"via {there}" in out
        server.kubectl("create", "namespace", "pn")
        pa = serve_pod(server, "pn", "on-a", node="pn-a")
        pb = serve_pod(server, "pn", "on-b", node="pn-b")
        ip_a, ip_b = pa["status"]["podIP"], pb["status"]["podIP"]
        assert fetch_from_pod(server, "pn", "on-a", ip_b) == f"on-b {ip_a}"  # no NAT between pods
        assert fetch_from_pod(server, "pn", "on-b", ip_a) == f"on-a {ip_b}"
        # traffic leaving the pod networks is masqueraded: a server on the other host (outside any podCIDR)
        # sees node A's address, not the pod's
        port = free_port()
        outside = subprocess.Popen(["nsenter", f"--net={ns_path}", "--", sys.executable, "-c", SERVE, there,
                                    str(port)], env=dict(os.environ, HOSTNAME="other-host"))
        try:
            assert fetch_from_pod(server, "pn", "on-a", there, port) == f"other-host {here}"
        finally:
            outside.kill()
            outside.wait(5)
        # a node that goes away takes its route with it
        b.cleanup()
        server.kubectl("delete", "node", "pn-b")
        wait(lambda: routes(a) == {})
        assert f"via {there}" not in subprocess.run(["ip", "route", "show", cidr_b], capture_output=True,
                                                    text=True).stdout
    finally:
        a.cleanup()
        b.cleanup()
        server.stop()
