"""kube-proxy rules in the real kernel, without a control plane: test hosts are network namespaces joined to the
host by veth pairs (two on their own links, two on one bridge), each running a small HTTP + UDP server that
answers with its own name and the client address it sees. The rendered table is applied in the host namespace
with ``nft -f``; clients run in the host namespace and inside the test hosts.

Every name (namespaces, links, the nft table) and every subnet is unique to this test process, and all of it is
removed at the end, also when a test fails.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kplane.proxy import conntrack, nftables
from kplane.proxy.model import Endpoint, ServicePort, table_name
from tests.cluster import claim_net_index

NFT = shutil.which("nft")
IP = shutil.which("ip")

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces and nftables need root"),
    pytest.mark.skipif(NFT is None or IP is None, reason="needs nft (nftables) and ip (iproute2)"),
]

SERVER = r"""
import socket, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
name = sys.argv[1]
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"{name} {self.client_address[0]}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
def udp():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", 5353))
    while True:
        data, addr = s.recvfrom(2048)
        s.sendto(f"{name} {addr[0]}".encode(), addr)
threading.Thread(target=udp, daemon=True).start()
ThreadingHTTPServer(("0.0.0.0", 8080), H).serve_forever()
"""

CLIENT = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
s.sendall(b"GET / HTTP/1.0\r\n\r\n")
data = b""
while chunk := s.recv(4096):
    data += chunk
print(data.split(b"\r\n\r\n", 1)[1].decode().strip())
"""

UDP_CLIENT = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
s.connect((sys.argv[1], int(sys.argv[2])))
s.send(b"hello")
print(s.recv(2048).decode())
"""


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(list(args), capture_output=True, text=True, timeout=30)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({p.returncode}): {p.stderr.strip()}")
    return p


def http_get(ip: str, port: int, timeout: float = 5.0) -> str:
    """One new TCP connection, one request; the body (``<server name> <client address it saw>``)."""
    with socket.create_connection((ip, port), timeout=timeout) as s:
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    return data.split(b"\r\n\r\n", 1)[1].decode().strip()


def udp_ask(ip: str, port: int, timeout: float = 5.0) -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.connect((ip, port))
        s.send(b"hello")
        return s.recv(2048).decode()


@dataclass
class Host:
    name: str  # short name the server answers with
    netns: str
    ip: str
    gateway: str
    proc: subprocess.Popen[bytes] | None = None

    def get(self, ip: str, port: int) -> str:
        return sh("ip", "netns", "exec", self.netns, sys.executable, "-c", CLIENT, ip, str(port)).stdout.strip()


@dataclass
class Topology:
    token: str
    index: int
    table: str
    node_ns: str | None = None  # None: the host namespace; else a namespace playing the node
    hosts: dict[str, Host] = field(default_factory=dict)
    links: list[str] = field(default_factory=list)
    namespaces: list[str] = field(default_factory=list)

    def vip(self, n: int) -> str:
        return f"172.31.{self.index}.{n}"

    def on_node(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.node_ns, *args] if self.node_ns else list(args)

    def nft(self, script: str) -> None:
        p = subprocess.run(self.on_node(NFT or "nft", "-f", "-"), input=script, capture_output=True, text=True,
                           timeout=30)
        assert p.returncode == 0, p.stderr

    def apply(self, ports: list[ServicePort]) -> None:
        """As the proxier's nftables backend applies: given the chains the table holds, if it exists."""
        p = subprocess.run(self.on_node(NFT or "nft", "-j", "list", "table", "ip", self.table), capture_output=True,
                           text=True, timeout=30)
        existing = nftables.chains_in_json(p.stdout) if p.returncode == 0 else None
        self.nft(nftables.render(self.table, ports, existing=existing))

    def tables(self) -> str:
        return sh(*self.on_node("nft", "list", "tables")).stdout

    def add_host(self, key: str, gateway: str, ip: str, prefix: int, bridge: str | None = None) -> Host:
        """A test host: a namespace with eth0 = ``ip``, joined to the node by a veth pair (routed, or on a
        bridge), default route via ``gateway``, running the answering server."""
        netns, outer = f"kpx-{self.token}-{key}", f"kp{self.token}{key}"
        sh("ip", "netns", "add", netns)
        self.namespaces.append(netns)
        sh(*self.on_node("ip", "link", "add", outer, "type", "veth", "peer", "name", "eth0", "netns", netns))
        self.links.append(outer)
        if bridge is None:
            sh(*self.on_node("ip", "addr", "add", f"{gateway}/{prefix}", "dev", outer))
            sh(*self.on_node("sysctl", "-qw", f"net.ipv4.conf.{outer}.forwarding=1"))
        else:  # hairpin mode on the port, as the kubelet's hairpin-veth sets it: a pod can reach itself via a VIP
            sh(*self.on_node("ip", "link", "set", outer, "master", bridge))
            sh(*self.on_node("ip", "link", "set", outer, "type", "bridge_slave", "hairpin", "on"))
        sh(*self.on_node("ip", "link", "set", outer, "up"))
        sh("ip", "-n", netns, "addr", "add", f"{ip}/{prefix}", "dev", "eth0")
        sh("ip", "-n", netns, "link", "set", "eth0", "up")
        sh("ip", "-n", netns, "link", "set", "lo", "up")
        sh("ip", "-n", netns, "route", "add", "default", "via", gateway)
        host = Host(key, netns, ip, gateway)
        host.proc = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-c", SERVER, key],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.hosts[key] = host
        return host

    def add_bridge(self, name: str, cidr: str) -> None:
        sh(*self.on_node("ip", "link", "add", name, "type", "bridge"))
        self.links.append(name)
        sh(*self.on_node("ip", "addr", "add", cidr, "dev", name))
        sh(*self.on_node("sysctl", "-qw", f"net.ipv4.conf.{name}.forwarding=1"))
        sh(*self.on_node("ip", "link", "set", name, "up"))

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 30
        for h in self.hosts.values():
            while True:
                p = subprocess.run(["ip", "netns", "exec", h.netns, sys.executable, "-c", CLIENT, "127.0.0.1",
                                    "8080"], capture_output=True, text=True, timeout=30)
                if p.returncode == 0 and p.stdout.startswith(f"{h.name} "):
                    break
                assert time.monotonic() < deadline, p.stderr
                time.sleep(0.1)

    def remove_rules(self) -> None:
        subprocess.run(self.on_node(NFT or "nft", "-f", "-"), input=nftables.render_delete(self.table),
                       capture_output=True, text=True, timeout=30)

    def teardown(self) -> None:
        for h in self.hosts.values():
            if h.proc is not None:
                h.proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    h.proc.wait(timeout=10)
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            self.remove_rules()
        for link in reversed(self.links):
            sh(*self.on_node("ip", "link", "del", link), check=False)
        for ns in reversed(self.namespaces):
            sh("ip", "netns", "del", ns, check=False)


@pytest.fixture(scope="module")
def topo() -> Iterator[Topology]:
    """In the host namespace: test hosts a and b on their own links, c and d on one bridge (the host has
    bridge-nf-call-iptables on, so bridged frames pass its netfilter hooks)."""
    token = uuid.uuid4().hex[:6]
    index = claim_net_index()
    topo = Topology(token, index, table_name(f"test-{token}", "test_proxy_nft"))
    base = f"172.30.{index}"
    try:
        topo.add_host("a", f"{base}.1", f"{base}.2", 30)
        topo.add_host("b", f"{base}.5", f"{base}.6", 30)
        topo.add_bridge(f"kp{token}br", f"{base}.129/26")
        topo.add_host("c", f"{base}.129", f"{base}.130", 26, bridge=f"kp{token}br")
        topo.add_host("d", f"{base}.129", f"{base}.131", 26, bridge=f"kp{token}br")
        topo.wait_ready()
        yield topo
    finally:
        topo.teardown()


@pytest.fixture(scope="module")
def plain_bridge_node() -> Iterator[Topology]:
    """A node in its own namespace whose bridge does not pass frames to netfilter (bridge-nf-call-iptables=0,
    per namespace): pods e and f on one bridge."""
    token = uuid.uuid4().hex[:6]
    node = f"kpx-{token}-node"
    sh("ip", "netns", "add", node)
    topo = Topology(token, 0, table_name(f"test-{token}", "test_proxy_nft"), node_ns=node)
    try:
        sh(*topo.on_node("sysctl", "-qw", "net.ipv4.ip_forward=1"))
        sh(*topo.on_node("sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=0"))
        sh(*topo.on_node("ip", "link", "set", "lo", "up"))
        topo.add_bridge("br0", "10.10.0.1/24")
        topo.add_host("e", "10.10.0.1", "10.10.0.2", 24, bridge="br0")
        topo.add_host("f", "10.10.0.1", "10.10.0.3", 24, bridge="br0")
        topo.wait_ready()
        yield topo
    finally:
        topo.teardown()
        sh("ip", "netns", "del", node, check=False)


def sp(topo: Topology, vip: int, port: int, *hosts: str, proto: str = "TCP", target: int = 8080,
       name: str = "web") -> ServicePort:
    eps = tuple(Endpoint(topo.hosts[h].ip, target) for h in hosts)
    return ServicePort("test", name, proto.lower(), proto, topo.vip(vip), port, eps)


def test_vip_answers_and_round_robin_reaches_both(topo: Topology) -> None:
    topo.apply([sp(topo, 10, 80, "a", "b")])
    assert topo.table in topo.tables()
    names = [http_get(topo.vip(10), 80).split()[0] for _ in range(6)]
    assert sorted(names) == ["a", "a", "a", "b", "b", "b"]
    assert all(x != y for x, y in itertools.pairwise(names)), f"not round robin: {names}"


def test_udp_vip(topo: Topology) -> None:
    topo.apply([sp(topo, 10, 53, "a", proto="UDP", target=5353)])
    assert udp_ask(topo.vip(10), 53).split()[0] == "a"


def test_udp_flow_follows_endpoint_change_once_conntrack_is_cleared(topo: Topology) -> None:
    old = [sp(topo, 21, 53, "a", proto="UDP", target=5353)]
    topo.apply(old)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # one socket: one conntrack entry
        s.settimeout(5)
        s.connect((topo.vip(21), 53))

        def ask() -> str:
            s.send(b"hi")
            return s.recv(2048).decode().split()[0]

        assert ask() == "a"
        new = [sp(topo, 21, 53, "b", proto="UDP", target=5353)]
        topo.apply(new)
        assert ask() == "a"  # the entry still holds the old DNAT: why the proxier clears it
        flows = conntrack.stale_udp_flows(old, new)
        assert flows == [conntrack.StaleFlow(topo.vip(21), 53, Endpoint(topo.hosts["a"].ip, 5353))]
        assert conntrack.clear(flows) == 1
        assert ask() == "b"


def test_udp_flow_made_before_endpoints_is_cleared(topo: Topology) -> None:
    topo.apply([sp(topo, 22, 53, "a", proto="UDP", target=5353, name="other")])  # the VIP is ours, port 53 not
    b = topo.hosts["b"]
    # a client in b whose first datagram went to the VIP before the service had endpoints: never DNATed
    script = (
        "import socket, sys, time\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(5); s.connect((sys.argv[1], 53))\n"
        "sys.stdin.readline(); s.send(b'early')\n"
        "sys.stdin.readline(); s.send(b'late'); print(s.recv(100).decode(), flush=True)\n"
    )
    # No rules for this VIP yet (its service is not synced), but the table still holds another service, as
    # kube-proxy's always does: its NAT chains are what keep connection tracking on in this namespace. With no
    # table at all the kernel tracks nothing and the early entry this test needs is never made.
    topo.apply([sp(topo, 25, 53, "a", proto="UDP", target=5353, name="keeper")])
    p = subprocess.Popen(["ip", "netns", "exec", b.netns, sys.executable, "-c", script, topo.vip(22)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdin is not None
        p.stdin.write("\n")
        p.stdin.flush()
        deadline = time.monotonic() + 10  # until the early datagram has made its (never DNATed) entry
        while not udp_entries_to(topo.vip(22), 53):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        new = [sp(topo, 22, 53, "a", proto="UDP", target=5353)]
        topo.apply(new)
        flows = conntrack.stale_udp_flows(None, new)
        assert flows == [conntrack.StaleFlow(topo.vip(22), 53, None)]
        assert conntrack.clear(flows) >= 1
        p.stdin.write("\n")
        p.stdin.flush()
        out, _ = p.communicate(timeout=20)
        assert out.split() == ["a", b.ip]
    finally:
        p.kill()
        p.wait()


def udp_entries_to(vip: str, port: int) -> list[object]:
    from pyroute2 import Conntrack
    from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

    with Conntrack() as ct:
        orig = NFCTAttrTuple(family=socket.AF_INET, daddr=vip, proto=socket.IPPROTO_UDP, dport=port)
        return [e for e in ct.dump_entries(tuple_orig=orig) if e.tuple_orig.daddr == vip]


def test_endpoint_change_takes_effect(topo: Topology) -> None:
    topo.apply([sp(topo, 11, 80, "a")])
    assert {http_get(topo.vip(11), 80).split()[0] for _ in range(4)} == {"a"}
    topo.apply([sp(topo, 11, 80, "b")])
    assert {http_get(topo.vip(11), 80).split()[0] for _ in range(4)} == {"b"}
    topo.apply([sp(topo, 11, 80, "a", "b")])
    assert {http_get(topo.vip(11), 80).split()[0] for _ in range(4)} == {"a", "b"}


def test_no_endpoints_and_undefined_ports_are_refused_at_once(topo: Topology) -> None:
    topo.apply([sp(topo, 12, 80), sp(topo, 12, 53, proto="UDP"), sp(topo, 13, 80, "a", name="other")])
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((topo.vip(12), 80), timeout=10)
    with pytest.raises((ConnectionRefusedError, PermissionError)):  # a local sender gets EPERM from the reject
        udp_ask(topo.vip(12), 53, timeout=10)
    with pytest.raises(ConnectionRefusedError):  # a port the service does not define
        socket.create_connection((topo.vip(13), 81), timeout=10)
    assert http_get(topo.vip(13), 80).split()[0] == "a"
    # from a test host (the forward path) as well
    p = sh("ip", "netns", "exec", topo.hosts["b"].netns, sys.executable, "-c", CLIENT, topo.vip(12), "80",
           check=False)
    assert p.returncode != 0 and "ConnectionRefusedError" in p.stderr
    p = sh("ip", "netns", "exec", topo.hosts["b"].netns, sys.executable, "-c", UDP_CLIENT, topo.vip(12), "53",
           check=False)
    assert p.returncode != 0 and "ConnectionRefusedError" in p.stderr  # ICMP port unreachable


def test_hairpin_endpoint_reaches_itself(topo: Topology) -> None:
    a = topo.hosts["a"]
    topo.apply([sp(topo, 14, 80, "a")])
    name, client = a.get(topo.vip(14), 80).split()
    # masqueraded to the host's side of a's link: a's own address as source would be dropped as martian
    assert (name, client) == ("a", a.gateway)


def test_client_address_kept_across_links(topo: Topology) -> None:
    a = topo.hosts["a"]
    topo.apply([sp(topo, 15, 80, "b")])
    assert a.get(topo.vip(15), 80).split() == ["b", a.ip]


def test_pods_on_one_bridge(topo: Topology) -> None:
    c = topo.hosts["c"]
    topo.apply([sp(topo, 16, 80, "d"), sp(topo, 17, 80, "c", "d", name="both")])
    # masqueraded to the bridge's address (here bridge-nf-call-iptables is on, so the un-DNAT would also see a
    # bridged reply; the namespace test below shows the case where it would not)
    assert c.get(topo.vip(16), 80).split() == ["d", c.gateway]
    assert sorted(c.get(topo.vip(17), 80).split()[0] for _ in range(4)) == ["c", "c", "d", "d"]
    # a test host on another link keeps its address at d
    assert topo.hosts["a"].get(topo.vip(16), 80).split() == ["d", topo.hosts["a"].ip]


def test_replacing_the_table_never_breaks_new_connections(topo: Topology) -> None:
    topo.apply([sp(topo, 18, 80, "a", "b")])
    errors: list[BaseException] = []
    seen: set[str] = set()
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            try:
                seen.add(http_get(topo.vip(18), 80).split()[0])
            except BaseException as exc:
                errors.append(exc)
                return

    t = threading.Thread(target=client)
    t.start()
    try:
        for i in range(40):
            topo.apply([sp(topo, 18, 80, *(("a", "b") if i % 2 else ("b", "a"))), sp(topo, 19 + i % 3, 80, "a", name="other")])
    finally:
        stop.set()
        t.join(timeout=30)
    assert not errors, errors
    assert seen == {"a", "b"}


def test_a_sync_refills_the_table_in_place(topo: Topology) -> None:
    """After the first sync the table (and so its base chains and their hooks) stays: later syncs flush and refill
    it and delete the chains of services that went away."""
    def listing() -> tuple[int, list[str]]:
        text = sh(*topo.on_node(NFT or "nft", "-j", "list", "table", "ip", topo.table)).stdout
        handle = next(i["table"]["handle"] for i in json.loads(text)["nftables"] if "table" in i)
        return handle, nftables.chains_in_json(text)

    topo.nft(nftables.render_delete(topo.table))
    topo.apply([sp(topo, 23, 80, "a"), sp(topo, 24, 80, "b", name="other")])
    handle, chains = listing()
    assert any(c.startswith("svc-test/other/") for c in chains)
    topo.apply([sp(topo, 23, 80, "b")])  # "other" went away, the endpoint of the first changed
    handle2, chains2 = listing()
    assert handle2 == handle, "the table was replaced"
    assert not any(c.startswith("svc-test/other/") for c in chains2)
    assert sorted(c for c in chains2 if c.startswith("svc-")) == sorted(
        [nftables.service_chain(sp(topo, 23, 80, "b")), nftables.endpoint_chain(
            sp(topo, 23, 80, "b"), topo.hosts["b"].ip, 8080)])
    assert http_get(topo.vip(23), 80).split()[0] == "b"


def test_removing_the_table_cleans_everything(topo: Topology) -> None:
    topo.apply([sp(topo, 20, 80, "a")])
    assert topo.table in topo.tables()
    topo.nft(nftables.render_delete(topo.table))
    assert topo.table not in topo.tables()
    assert topo.table not in sh("nft", "list", "ruleset").stdout
    topo.nft(nftables.render_delete(topo.table))  # deleting again is not an error (a stop after a crash)


def test_pods_on_a_bridge_without_bridge_netfilter(plain_bridge_node: Topology) -> None:
    n = plain_bridge_node
    e = n.hosts["e"]
    n.apply([sp(n, 10, 80, "f"), sp(n, 11, 80, "e", name="self")])
    assert e.get(n.vip(10), 80).split() == ["f", e.gateway]
    assert e.get(n.vip(11), 80).split() == ["e", e.gateway]
    # the masquerade is what makes it work here: without the hairpin check f answers e directly, e drops it
    n.nft(f"flush chain ip {n.table} hairpin-check\n")
    p = sh("ip", "netns", "exec", e.netns, sys.executable, "-c", CLIENT, n.vip(10), "80", check=False)
    assert p.returncode != 0 and ("TimeoutError" in p.stderr or "timed out" in p.stderr), p.stderr


# --- every valid model renders to a script the kernel accepts (checked in a scratch namespace) ---------------

_label = st.from_regex(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", fullmatch=True)
_ip = st.tuples(st.integers(1, 223).filter(lambda x: x not in (127, 169)), st.integers(0, 255), st.integers(0, 255),
                st.integers(1, 254)).map(lambda t: ".".join(map(str, t)))


@st.composite
def _ports(draw: st.DrawFn) -> list[ServicePort]:
    out: list[ServicePort] = []
    used: set[tuple[str, str, int]] = set()
    keys: set[tuple[str, str, str, int]] = set()
    for _ in range(draw(st.integers(0, 4))):
        ns, name, proto, vip, port = draw(_label), draw(_label), draw(st.sampled_from(["TCP", "UDP"])), draw(_ip), \
            draw(st.integers(1, 65535))
        if (vip, proto, port) in used or (ns, name, proto, port) in keys:
            continue
        used.add((vip, proto, port))
        keys.add((ns, name, proto, port))
        eps = draw(st.sets(st.builds(Endpoint, _ip, st.integers(1, 65535)), max_size=4))
        out.append(ServicePort(ns, name, draw(st.one_of(st.just(""), _label)), proto, vip, port, tuple(eps)))
    return out


@pytest.fixture(scope="module")
def scratch_netns() -> Iterator[str]:
    name = f"kpx-{uuid.uuid4().hex[:6]}-check"
    sh("ip", "netns", "add", name)
    try:
        yield name
    finally:
        sh("ip", "netns", "del", name, check=False)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ports=_ports())
def test_kernel_accepts_every_rendered_script(scratch_netns: str, ports: list[ServicePort]) -> None:
    script = nftables.render("kplane-proxy-0123abcd", ports)
    p = subprocess.run(["ip", "netns", "exec", scratch_netns, NFT or "nft", "-c", "-f", "-"], input=script,
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr + script
