"""Node IPAM: the pure block allocator, and the controller in a real control plane (assignment, immutability,
exhaustion reported as CIDRNotAvailable, release on deletion, a restart keeps every assignment)."""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterator
from typing import Any

import pytest

from kplane.controllers.nodeipam import CIDRSet
from tests.cluster import Cluster, claim_net_index
from tests.test_node import wait

# --- CIDRSet (no I/O) ------------------------------------------------------------------------------------


def test_cidrset_hands_out_each_block_once_then_none() -> None:
    s = CIDRSet("10.244.0.0/22", 24)
    got = [s.allocate() for _ in range(4)]
    assert got == ["10.244.0.0/24", "10.244.1.0/24", "10.244.2.0/24", "10.244.3.0/24"]
    assert s.allocate() is None and s.free == 0
    s.release("10.244.1.0/24")
    assert s.free == 1
    assert s.allocate() == "10.244.1.0/24"


def test_cidrset_round_robin_does_not_reuse_a_released_block_at_once() -> None:
    s = CIDRSet("10.0.0.0/16", 24)
    a, b = s.allocate(), s.allocate()
    assert (a, b) == ("10.0.0.0/24", "10.0.1.0/24")
    s.release("10.0.0.0/24")
    assert s.allocate() == "10.0.2.0/24"


def test_cidrset_occupy_rebuilds_from_existing_assignments() -> None:
    s = CIDRSet("10.1.0.0/23", 25)
    assert s.occupy("10.1.0.128/25") and s.occupy("10.1.1.0/25")
    assert not s.occupy("10.9.0.0/25")  # outside the cluster CIDR: ignored
    assert not s.occupy("not-a-cidr")
    assert sorted([s.allocate(), s.allocate()]) == ["10.1.0.0/25", "10.1.1.128/25"]  # type: ignore[type-var]
    assert s.allocate() is None
    # a CIDR larger than a block takes every block it covers
    t = CIDRSet("10.2.0.0/22", 24)
    t.occupy("10.2.0.0/23")
    assert t.free == 2 and t.allocate() == "10.2.2.0/24"


def test_cidrset_ipv6_blocks() -> None:
    s = CIDRSet("fd00:10:244::/56", 64)
    assert s.count == 256
    assert s.allocate() == "fd00:10:244::/64"
    assert s.allocate() == "fd00:10:244:1::/64"


@pytest.mark.parametrize(("cidr", "mask", "text"), [
    ("10.0.0.0/16", 8, "must be between"),
    ("10.0.0.0/16", 31, "must be between"),
    ("10.0.0.0/8", 30, r"more than 2\^16"),
    ("10.0.0.1/16", 24, "has host bits set"),
    ("ten/8", 24, "does not appear to be"),
])
def test_cidrset_refuses_bad_configuration(cidr: str, mask: int, text: str) -> None:
    with pytest.raises(ValueError, match=text):
        CIDRSet(cidr, mask)


def test_bad_cluster_cidr_flag_stops_the_server(tmp_path: Any) -> None:
    c = Cluster(tmp_path / "data", node=False, extra_args=["--node-cidr-mask-size", "8"])
    with pytest.raises(RuntimeError, match="exited"):
        c.start(timeout=20)
    assert "node CIDR mask size 8 must be between" in c.log_path.read_text()


# --- the controller in a control plane with a two-block cluster CIDR -------------------------------------


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("ipam") / "data", node=False)
    c.net_index = claim_net_index()
    c.extra_args = ["--cluster-cidr", f"10.{100 + c.net_index}.4.0/23", "--node-cidr-mask-size", "24"]
    c.start()
    yield c
    c.stop()


def node(c: Cluster, name: str) -> dict[str, Any]:
    return json.loads(c.kubectl("get", "node", name, "-o", "json").stdout)  # type: ignore[no-any-return]


def add_node(c: Cluster, name: str) -> None:
    c.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}}))


def cidr_of(c: Cluster, name: str) -> str | None:
    spec = node(c, name).get("spec") or {}
    if spec.get("podCIDR"):
        assert spec["podCIDRs"] == [spec["podCIDR"]]
    return spec.get("podCIDR")


def network_unavailable(c: Cluster, name: str) -> dict[str, Any] | None:
    conds = (node(c, name).get("status") or {}).get("conditions") or []
    return next((x for x in conds if x["type"] == "NetworkUnavailable"), None)


def test_assign_exhaust_release_and_restart(small: Cluster) -> None:
    c = small
    pool = ipaddress.ip_network(f"10.{100 + c.net_index}.4.0/23")
    add_node(c, "ipam-a")
    add_node(c, "ipam-b")
    a = wait(lambda: cidr_of(c, "ipam-a"))
    b = wait(lambda: cidr_of(c, "ipam-b"))
    assert a != b
    assert {a, b} == {str(n) for n in pool.subnets(new_prefix=24)}
    assert "10." in c.kubectl("get", "node", "ipam-a", "-o", "jsonpath={.spec.podCIDRs[0]}").stdout

    # immutable once set (upstream's message); podCIDR and podCIDRs must agree
    p = c.kubectl("patch", "node", "ipam-a", "--type=merge", "-p",
                  '{"spec":{"podCIDR":"10.250.0.0/24","podCIDRs":["10.250.0.0/24"]}}', check=False)
    assert p.returncode != 0
    assert 'spec.podCIDRs: Forbidden: node updates may not change podCIDR except from "" to valid' in p.stderr
    p = c.kubectl("apply", "-f", "-", check=False, input=json.dumps({
        "apiVersion": "v1", "kind": "Node", "metadata": {"name": "ipam-bad"},
        "spec": {"podCIDR": "10.250.0.0/24", "podCIDRs": ["10.250.1.0/24"]}}))
    assert p.returncode != 0 and "must match spec.podCIDR" in p.stderr
    p = c.kubectl("apply", "-f", "-", check=False, input=json.dumps({
        "apiVersion": "v1", "kind": "Node", "metadata": {"name": "ipam-bad"}, "spec": {"podCIDR": "10.250.0.0/33"}}))
    assert p.returncode != 0 and "must be a valid CIDR" in p.stderr

    # the pool is empty: an Event and the NetworkUnavailable condition say so
    add_node(c, "ipam-c")
    cond = wait(lambda: network_unavailable(c, "ipam-c"))
    assert cond["status"] == "True" and cond["reason"] == "CIDRNotAvailable"
    assert cidr_of(c, "ipam-c") is None
    events = wait(lambda: json.loads(c.kubectl(
        "get", "events", "-A", "--field-selector", "involvedObject.name=ipam-c,reason=CIDRNotAvailable",
        "-o", "json").stdout)["items"])
    assert events[0]["involvedObject"]["kind"] == "Node" and "no podCIDR left" in events[0]["message"]
    assert "CIDRNotAvailable" in c.kubectl("describe", "node", "ipam-c").stdout

    # a deleted node gives its block back, and the waiting node gets it
    c.kubectl("delete", "node", "ipam-a")
    assert wait(lambda: cidr_of(c, "ipam-c")) == a
    cond = wait(lambda: (x := network_unavailable(c, "ipam-c")) and x["status"] == "False" and x)
    assert cond["reason"] == "CIDRAssigned"

    # a restarted controller rebuilds its state from the Nodes: nothing moves, nothing is handed out twice
    c.stop()
    c.start()
    add_node(c, "ipam-d")
    wait(lambda: network_unavailable(c, "ipam-d"))
    assert cidr_of(c, "ipam-b") == b and cidr_of(c, "ipam-c") == a and cidr_of(c, "ipam-d") is None
    c.kubectl("delete", "node", "ipam-b")
    assert wait(lambda: cidr_of(c, "ipam-d")) == b
