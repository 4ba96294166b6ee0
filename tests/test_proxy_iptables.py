"""The iptables fallback (used when ``nft`` is missing) in the real kernel, only when iptables, iptables-save and
iptables-restore are installed. Everything runs in a namespace playing the node, so the host's iptables are never
touched; test hosts e and f sit on the node's bridge (bridge-nf-call-iptables on, hairpin mode on the ports, as
a kubelet sets them up), g on a link of its own."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from kplane.proxy import iptables
from kplane.proxy.model import ServicePort, table_name
from kplane.proxy.proxier import IptablesBackend
from tests.test_proxy_nft import CLIENT, Topology, sh, sp

HAVE_IPTABLES = all(shutil.which(t) for t in ("iptables", "iptables-save", "iptables-restore"))

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces and iptables need root"),
    pytest.mark.skipif(not HAVE_IPTABLES or shutil.which("ip") is None,
                       reason="needs iptables, iptables-save and iptables-restore, and ip (iproute2)"),
]


@dataclass
class IptTopology(Topology):
    backend: IptablesBackend | None = None

    def apply(self, ports: list[ServicePort]) -> None:
        assert self.backend is not None
        asyncio.run(self.backend.apply(ports))

    def remove_rules(self) -> None:
        if self.backend is not None:
            asyncio.run(self.backend.cleanup())

    def save(self) -> str:
        return sh(*self.on_node("iptables-save")).stdout

    def get_from_node(self, ip: str, port: int) -> subprocess.CompletedProcess[str]:
        return sh(*self.on_node(sys.executable, "-c", CLIENT, ip, str(port)), check=False)


@pytest.fixture(scope="module")
def node() -> Iterator[IptTopology]:
    token = uuid.uuid4().hex[:6]
    ns = f"kpx-{token}-node"
    sh("ip", "netns", "add", ns)
    topo = IptTopology(token, 0, table_name(f"test-{token}", "test_proxy_iptables"), node_ns=ns)
    topo.backend = IptablesBackend(topo.table, wrap=["ip", "netns", "exec", ns])
    try:
        sh(*topo.on_node("sysctl", "-qw", "net.ipv4.ip_forward=1"))
        sh(*topo.on_node("sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=1"))
        sh(*topo.on_node("ip", "link", "set", "lo", "up"))
        # a default route, as any node has: a host process must route to a VIP before output DNAT sees it
        sh(*topo.on_node("ip", "link", "add", "uplink", "type", "veth", "peer", "name", "uplink-peer"))
        sh(*topo.on_node("ip", "addr", "add", "192.168.255.1/24", "dev", "uplink"))
        sh(*topo.on_node("ip", "link", "set", "uplink", "up"))
        sh(*topo.on_node("ip", "link", "set", "uplink-peer", "up"))
        sh(*topo.on_node("ip", "route", "add", "default", "via", "192.168.255.254"))
        topo.add_bridge("br0", "10.10.0.1/24")
        topo.add_host("e", "10.10.0.1", "10.10.0.2", 24, bridge="br0")
        topo.add_host("f", "10.10.0.1", "10.10.0.3", 24, bridge="br0")
        topo.add_host("g", "10.10.1.1", "10.10.1.2", 30)
        topo.wait_ready()
        yield topo
    finally:
        topo.teardown()
        sh("ip", "netns", "del", ns, check=False)


def test_round_robin_from_the_node_and_from_a_pod(node: IptTopology) -> None:
    node.apply([sp(node, 10, 80, "f", "g")])
    names = [node.get_from_node(node.vip(10), 80).stdout.split()[0] for _ in range(4)]
    assert names in (["f", "g", "f", "g"], ["g", "f", "g", "f"]), names
    assert sorted(node.hosts["e"].get(node.vip(10), 80).split()[0] for _ in range(4)) == ["f", "f", "g", "g"]


def test_endpoint_change_and_stale_chains(node: IptTopology) -> None:
    a, b = sp(node, 11, 80, "f", name="a"), sp(node, 12, 80, "g", name="b")
    node.apply([a, b])
    assert node.hosts["e"].get(node.vip(12), 80).split()[0] == "g"
    prefix = iptables.prefix_for(node.table)
    old_sep = iptables.endpoint_chain(prefix, a, node.hosts["f"].ip, 8080)
    assert iptables.service_chain(prefix, b) in node.save() and old_sep in node.save()
    a2 = sp(node, 11, 80, "g", name="a")
    node.apply([a2])
    assert node.hosts["e"].get(node.vip(11), 80).split()[0] == "g"
    saved = node.save()
    assert iptables.service_chain(prefix, b) not in saved and old_sep not in saved
    p = node.get_from_node(node.vip(12), 80)  # b is gone: its VIP is not ours any more
    assert p.returncode != 0


def test_no_endpoints_refused(node: IptTopology) -> None:
    node.apply([sp(node, 13, 80), sp(node, 14, 80, "f", name="other")])
    for p in (node.get_from_node(node.vip(13), 80), node.get_from_node(node.vip(14), 81),
              sh("ip", "netns", "exec", node.hosts["e"].netns, sys.executable, "-c", CLIENT, node.vip(13), "80",
                 check=False)):
        assert p.returncode != 0 and "ConnectionRefusedError" in p.stderr, p.stderr


def test_hairpin_and_same_bridge(node: IptTopology) -> None:
    e = node.hosts["e"]
    node.apply([sp(node, 15, 80, "e"), sp(node, 16, 80, "f", name="other")])
    assert e.get(node.vip(15), 80).split() == ["e", e.gateway]  # source == endpoint: masqueraded
    assert e.get(node.vip(16), 80).split() == ["f", e.ip]  # bridge netfilter un-DNATs f's reply


def test_jumps_once_and_cleanup_removes_everything(node: IptTopology) -> None:
    for _ in range(3):
        node.apply([sp(node, 17, 80, "f")])
    saved = node.save()
    prefix = iptables.prefix_for(node.table)
    for _, chain, spec in iptables.jumps(prefix):
        assert sum(1 for line in saved.splitlines() if line.startswith(f"-A {chain} ") and spec[-1] in line) == 1
    node.remove_rules()
    assert prefix not in node.save()
    node.remove_rules()  # again: nothing to do, no error
