from __future__ import annotations

import asyncio
import json
import re
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from kplane.client import APIClient
from kplane.controllers.scheduler import (
    Scheduler,
    failure_message,
    filter_node,
    insufficient,
    is_pending,
    matches_node_selector,
    pod_requests,
    score,
    select_node,
    tolerates,
    untolerated_taint,
)
from kplane.errors import StatusError
from tests.cluster import Cluster, update_retrying

Obj = dict[str, Any]

GI = 2**30


def node(name: str, *, cpu: str = "4", memory: str = "8Gi", pods: str = "110", labels: dict[str, str] | None = None,
         taints: list[Obj] | None = None, ready: str | None = "True", unschedulable: bool = False) -> Obj:
    conds = [{"type": "Ready", "status": ready}] if ready is not None else []
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels or {}},
            "spec": {"taints": taints or [], "unschedulable": unschedulable},
            "status": {"conditions": conds, "allocatable": {"cpu": cpu, "memory": memory, "pods": pods}}}


def pod(name: str = "p", *, cpu: str | None = None, memory: str | None = None, node_name: str = "",
        selector: dict[str, str] | None = None, tolerations: list[Obj] | None = None,
        init: list[Obj] | None = None, phase: str = "Pending", scheduler: str = "default-scheduler") -> Obj:
    req = {k: v for k, v in (("cpu", cpu), ("memory", memory)) if v is not None}
    spec: Obj = {"containers": [{"name": "c", "image": "pause", "resources": {"requests": req}}],
                 "schedulerName": scheduler}
    if node_name:
        spec["nodeName"] = node_name
    if selector:
        spec["nodeSelector"] = selector
    if tolerations:
        spec["tolerations"] = tolerations
    if init:
        spec["initContainers"] = init
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "default"}, "spec": spec,
            "status": {"phase": phase}}


# --- pure functions --------------------------------------------------------------------------------------------

def test_pod_requests() -> None:
    assert pod_requests(pod(cpu="500m", memory="1Gi")) == {"cpu": 500, "memory": GI * 1000}
    assert pod_requests(pod()) == {}
    two = pod(cpu="100m")
    two["spec"]["containers"].append({"name": "d", "resources": {"requests": {"cpu": "0.2"}}})
    assert pod_requests(two) == {"cpu": 300}
    # init containers run one at a time, before the others: the max wins
    big_init = pod(cpu="100m", memory="1Gi", init=[{"name": "i", "resources": {"requests": {"cpu": "2"}}}])
    assert pod_requests(big_init) == {"cpu": 2000, "memory": GI * 1000}
    # a limit alone is the request; overhead adds
    lim = pod()
    lim["spec"]["containers"][0]["resources"] = {"limits": {"cpu": "1", "memory": "1Mi"}, "requests": {"cpu": "250m"}}
    lim["spec"]["overhead"] = {"cpu": "10m"}
    assert pod_requests(lim) == {"cpu": 260, "memory": 2**20 * 1000}
    # sidecars (restartable init containers) keep running beside the containers
    side = pod(cpu="1", init=[{"name": "s", "restartPolicy": "Always", "resources": {"requests": {"cpu": "500m"}}},
                              {"name": "i", "resources": {"requests": {"cpu": "1200m"}}}])
    assert pod_requests(side) == {"cpu": 1700}


@pytest.mark.parametrize(("toleration", "taint", "ok"), [
    ({"key": "k", "operator": "Equal", "value": "v", "effect": "NoSchedule"},
     {"key": "k", "value": "v", "effect": "NoSchedule"}, True),
    ({"key": "k", "value": "v"}, {"key": "k", "value": "v", "effect": "NoExecute"}, True),  # Equal by default
    ({"key": "k", "operator": "Equal", "value": "w"}, {"key": "k", "value": "v", "effect": "NoSchedule"}, False),
    ({"key": "k", "operator": "Exists"}, {"key": "k", "value": "v", "effect": "NoSchedule"}, True),
    ({"key": "k", "operator": "Exists", "effect": "NoExecute"}, {"key": "k", "effect": "NoSchedule"}, False),
    ({"key": "j", "operator": "Exists"}, {"key": "k", "effect": "NoSchedule"}, False),
    ({"operator": "Exists"}, {"key": "anything", "value": "x", "effect": "NoExecute"}, True),
    ({"operator": "Exists", "effect": "NoSchedule"}, {"key": "a", "effect": "NoSchedule"}, True),
    ({"operator": "Exists", "effect": "NoSchedule"}, {"key": "a", "effect": "NoExecute"}, False),
    ({"key": "k", "operator": "Equal"}, {"key": "k", "effect": "NoSchedule"}, True),  # empty value == empty value
    ({"operator": "Equal"}, {"key": "k", "effect": "NoSchedule"}, False),
    ({"key": "k", "operator": "Bogus"}, {"key": "k", "effect": "NoSchedule"}, False),
])
def test_tolerates(toleration: Obj, taint: Obj, ok: bool) -> None:
    assert tolerates(toleration, taint) is ok


def test_untolerated_taint() -> None:
    n = node("n", taints=[{"key": "soft", "effect": "PreferNoSchedule"}, {"key": "a", "value": "1", "effect": "NoSchedule"},
                          {"key": "b", "effect": "NoExecute"}])
    assert untolerated_taint(pod(), n) == {"key": "a", "value": "1", "effect": "NoSchedule"}
    p = pod(tolerations=[{"key": "a", "operator": "Exists"}])
    assert untolerated_taint(p, n) == {"key": "b", "effect": "NoExecute"}
    assert untolerated_taint(pod(tolerations=[{"operator": "Exists"}]), n) is None


def test_node_selector_and_affinity() -> None:
    n = node("n1", labels={"disk": "ssd", "zone": "a", "gen": "5"})
    assert matches_node_selector(pod(), n)
    assert matches_node_selector(pod(selector={"disk": "ssd"}), n)
    assert not matches_node_selector(pod(selector={"disk": "hdd"}), n)
    assert not matches_node_selector(pod(selector={"gpu": "yes"}), n)

    def aff(*terms: Obj) -> Obj:
        p = pod()
        p["spec"]["affinity"] = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": list(terms)}}}
        return p

    assert matches_node_selector(aff({"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a", "b"]}]}), n)
    assert not matches_node_selector(aff({"matchExpressions": [{"key": "zone", "operator": "NotIn", "values": ["a"]}]}), n)
    assert matches_node_selector(aff({"matchExpressions": [{"key": "gpu", "operator": "DoesNotExist"}]}), n)
    assert matches_node_selector(aff({"matchExpressions": [{"key": "gen", "operator": "Gt", "values": ["4"]}]}), n)
    assert not matches_node_selector(aff({"matchExpressions": [{"key": "gen", "operator": "Lt", "values": ["4"]}]}), n)
    assert matches_node_selector(aff({"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n1"]}]}), n)
    # terms are ORed, expressions within a term ANDed; an empty term matches nothing
    assert matches_node_selector(aff({"matchExpressions": [{"key": "gpu", "operator": "Exists"}]},
                                     {"matchExpressions": [{"key": "disk", "operator": "Exists"}]}), n)
    assert not matches_node_selector(aff({"matchExpressions": [{"key": "disk", "operator": "Exists"},
                                                               {"key": "gpu", "operator": "Exists"}]}), n)
    assert not matches_node_selector(aff({}), n)


def test_filter_node() -> None:
    p = pod(cpu="1", memory="1Gi")
    assert filter_node(p, node("n")) == []
    assert filter_node(p, node("n", ready="False")) == ["node(s) were not ready"]
    assert filter_node(p, node("n", ready=None)) == ["node(s) were not ready"]
    assert filter_node(p, node("n", unschedulable=True)) == ["node(s) were unschedulable"]
    tol = pod(tolerations=[{"key": "node.kubernetes.io/unschedulable", "operator": "Exists", "effect": "NoSchedule"}])
    assert filter_node(tol, node("n", unschedulable=True)) == []
    assert filter_node(p, node("n", taints=[{"key": "k", "value": "v", "effect": "NoSchedule"}])) == \
        ["node(s) had untolerated taint {k: v}"]
    assert filter_node(pod(selector={"a": "b"}), node("n")) == ["node(s) didn't match Pod's node affinity/selector"]
    assert filter_node(pod(cpu="5", memory="9Gi"), node("n")) == ["Insufficient cpu", "Insufficient memory"]
    # the first failing filter wins
    assert filter_node(pod(cpu="5", selector={"a": "b"}), node("n", ready="False")) == ["node(s) were not ready"]


def test_insufficient_counts_bound_pods() -> None:
    n = node("n", cpu="2", memory="4Gi", pods="2")
    bound = [pod("a", cpu="1500m", node_name="n"), pod("done", cpu="2", node_name="n", phase="Succeeded")]
    assert insufficient(pod(cpu="500m"), n, bound) == []
    assert insufficient(pod(cpu="501m"), n, bound) == ["Insufficient cpu"]
    assert insufficient(pod(), n, [*bound, pod("b", node_name="n")]) == ["Too many pods"]
    assert insufficient(pod(), node("n", pods="0")) == ["Too many pods"]
    # extended resources the node does not have
    ext = pod()
    ext["spec"]["containers"][0]["resources"]["requests"]["example.com/gpu"] = "1"
    assert insufficient(ext, n) == ["Insufficient example.com/gpu"]
    gpu = node("g")
    gpu["status"]["allocatable"]["example.com/gpu"] = "2"
    assert insufficient(ext, gpu) == []


def test_score_least_requested() -> None:
    n = node("n", cpu="4", memory="8Gi")
    assert score(pod(cpu="2", memory="4Gi"), n) == 50.0
    assert score(pod(cpu="1", memory="2Gi"), n, [pod(cpu="1", memory="2Gi", node_name="n")]) == 50.0
    assert score(pod(cpu="4", memory="8Gi"), n) == 0.0
    # empty pods count as 100m / 200Mi, so they still spread
    assert score(pod(), n) > score(pod(), n, [pod(node_name="n")])


def test_failure_message() -> None:
    assert failure_message(0, {}) == "no nodes available to schedule pods"
    msg = failure_message(3, {"a": ["node(s) didn't match Pod's node affinity/selector"],
                              "b": ["Insufficient cpu", "Insufficient memory"], "c": ["Insufficient cpu"]})
    assert msg == ("0/3 nodes are available: 1 Insufficient memory, 1 node(s) didn't match Pod's node "
                   "affinity/selector, 2 Insufficient cpu.")


def test_select_node() -> None:
    small = node("small", cpu="2", memory="4Gi")
    big = node("big", cpu="8", memory="16Gi")
    tainted = node("tainted", cpu="64", memory="128Gi", labels={"disk": "ssd"},
                   taints=[{"key": "dedicated", "value": "db", "effect": "NoSchedule"}])
    nodes = [small, big, tainted]
    assert select_node(pod(cpu="1"), nodes) == ("big", "")
    assert select_node(pod(cpu="1"), nodes, {"big": [pod(cpu="7", node_name="big")]}) == ("small", "")
    tol = [{"key": "dedicated", "operator": "Equal", "value": "db", "effect": "NoSchedule"}]
    assert select_node(pod(cpu="1", tolerations=tol), nodes) == ("tainted", "")
    assert select_node(pod(selector={"disk": "ssd"}, tolerations=tol), nodes) == ("tainted", "")
    assert select_node(pod(selector={"disk": "ssd"}), nodes) == (
        None, "0/3 nodes are available: 1 node(s) had untolerated taint {dedicated: db}, "
              "2 node(s) didn't match Pod's node affinity/selector.")
    assert select_node(pod(cpu="100"), nodes) == (
        None, "0/3 nodes are available: 1 node(s) had untolerated taint {dedicated: db}, 2 Insufficient cpu.")
    # ties break by name
    assert select_node(pod(), [node("b"), node("a")]) == ("a", "")
    assert select_node(pod(), []) == (None, "no nodes available to schedule pods")


def test_is_pending() -> None:
    assert is_pending(pod(), "default-scheduler")
    assert not is_pending(pod(), "other")
    assert not is_pending(pod(node_name="n"), "default-scheduler")
    assert not is_pending(pod(phase="Failed"), "default-scheduler")
    deleting = pod()
    deleting["metadata"]["deletionTimestamp"] = "2024-01-01T00:00:00Z"
    assert not is_pending(deleting, "default-scheduler")
    gated = pod()
    gated["spec"]["schedulingGates"] = [{"name": "wait"}]
    assert not is_pending(gated, "default-scheduler")


# --- against a real control plane ------------------------------------------------------------------------------

async def wait_for(fn: Callable[[], Awaitable[Any]], within: float = 20.0) -> Any:
    deadline = asyncio.get_running_loop().time() + within
    last: Any = None
    while asyncio.get_running_loop().time() < deadline:
        last = await fn()
        if last:
            return last
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out; last value {last!r}")


def _client(cluster: Cluster, who: str) -> APIClient:
    return APIClient(cluster.url, ca_file=cluster.pki / "ca.crt", cert_file=cluster.pki / f"{who}.crt",
                     key_file=cluster.pki / f"{who}.key")


async def test_scheduler_against_cluster(cluster: Cluster, ns: str) -> None:
    suffix = secrets.token_hex(3)
    plain_name, ssd_name = f"sched-{suffix}-plain", f"sched-{suffix}-ssd"
    sched_name = f"test-scheduler-{suffix}"
    admin = _client(cluster, "admin")
    sched = Scheduler(_client(cluster, "scheduler"), name=sched_name, retry_interval=1.0)
    # the cluster has a real node too: every test pod selects this test's pool of fake nodes
    pool = {"sched-test-pool": suffix}
    nodes = {
        plain_name: (dict(pool), [], {"cpu": "2", "memory": "4Gi", "pods": "10"}),
        ssd_name: ({"disk": "ssd", **pool}, [{"key": "dedicated", "value": "gpu", "effect": "NoSchedule"}],
                   {"cpu": "4", "memory": "8Gi", "pods": "10"}),
    }

    def pod_body(name: str, *, cpu: str | None = None, selector: dict[str, str] | None = None,
                 tolerate: bool = False) -> Obj:
        spec: Obj = {"schedulerName": sched_name,
                     "containers": [{"name": "c", "image": "registry.k8s.io/pause:3.10",
                                     "resources": {"requests": {"cpu": cpu}} if cpu else {}}]}
        spec["nodeSelector"] = {**pool, **(selector or {})}
        if tolerate:
            spec["tolerations"] = [{"key": "dedicated", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"}]
        return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}

    async def create(body: Obj) -> None:
        await admin.create(f"/api/v1/namespaces/{ns}/pods", body)

    async def get(name: str) -> Obj:
        return await admin.get(f"/api/v1/namespaces/{ns}/pods/{name}")

    async def bound_to(name: str) -> str:
        return str((await get(name))["spec"].get("nodeName") or "")

    async def unschedulable(name: str) -> Obj | None:
        p = await get(name)
        for c in p.get("status", {}).get("conditions") or []:
            if c.get("type") == "PodScheduled" and c.get("status") == "False" and c.get("reason") == "Unschedulable":
                return dict(c)
        return None

    try:
        for name, (labels, taints, alloc) in nodes.items():
            body = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels},
                    "spec": {"taints": taints}}
            await asyncio.to_thread(cluster.kubectl, "apply", "-f", "-", input=json.dumps(body))
            status = {"conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                                      "message": "fake node for the scheduler test"}],
                      "capacity": alloc, "allocatable": alloc}
            await update_retrying(admin, f"/api/v1/nodes/{name}/status",
                                  lambda cur, st=status: cur.__setitem__("status", st))

        sched.start()
        await create(pod_body("plain"))
        await create(pod_body("ssd", selector={"disk": "ssd"}, tolerate=True))
        await create(pod_body("big", cpu="3", tolerate=True))
        assert await wait_for(lambda: bound_to("plain")) == plain_name  # the other node is tainted
        assert await wait_for(lambda: bound_to("ssd")) == ssd_name
        assert await wait_for(lambda: bound_to("big")) == ssd_name  # 3 cpus only fit there
        plain = await get("plain")
        assert any(c["type"] == "PodScheduled" and c["status"] == "True" for c in plain["status"]["conditions"])

        # no toleration for the ssd node's taint, and no label on the other
        await create(pod_body("picky", selector={"disk": "ssd"}))
        cond = await wait_for(lambda: unschedulable("picky"))
        assert re.fullmatch(r"0/\d+ nodes are available: .*\.", cond["message"]), cond
        assert "1 node(s) had untolerated taint {dedicated: gpu}" in cond["message"]
        assert re.search(r"\d node\(s\) didn't match Pod's node affinity/selector", cond["message"]), cond

        # 3 cpus more fit nowhere while "big" runs ...
        await create(pod_body("big2", cpu="3", tolerate=True))
        cond = await wait_for(lambda: unschedulable("big2"))
        assert "2 Insufficient cpu" in cond["message"], cond
        assert await bound_to("big2") == ""

        async def failed_event() -> bool:
            evs = (await admin.get(f"/api/v1/namespaces/{ns}/events"))["items"]
            return any(e.get("reason") == "FailedScheduling" and e.get("type") == "Warning"
                       and e["involvedObject"]["name"] == "big2" and "Insufficient cpu" in e.get("message", "")
                       for e in evs)

        assert await wait_for(failed_event)

        # ... and once it is gone, the waiting pod gets its place
        await admin.request("DELETE", f"/api/v1/namespaces/{ns}/pods/big", params={"gracePeriodSeconds": "0"})
        assert await wait_for(lambda: bound_to("big2")) == ssd_name

        # a new node that fits makes the picky pod schedulable
        extra = f"sched-{suffix}-extra"
        nodes[extra] = ({"disk": "ssd", **pool}, [], {"cpu": "1", "memory": "1Gi", "pods": "10"})
        await admin.create("/api/v1/nodes", {"apiVersion": "v1", "kind": "Node",
                                             "metadata": {"name": extra, "labels": {"disk": "ssd", **pool}}})
        assert await bound_to("picky") == ""
        await update_retrying(admin, f"/api/v1/nodes/{extra}/status", lambda cur: cur.__setitem__("status", {
            "conditions": [{"type": "Ready", "status": "True"}],
            "allocatable": {"cpu": "1", "memory": "1Gi", "pods": "10"}}))
        assert await wait_for(lambda: bound_to("picky")) == extra
    finally:
        await sched.close()
        for pod_name in ("plain", "ssd", "big", "picky", "big2"):
            try:
                await admin.request("DELETE", f"/api/v1/namespaces/{ns}/pods/{pod_name}", params={"gracePeriodSeconds": "0"})
            except StatusError:
                pass
        for name in nodes:
            try:
                await admin.delete(f"/api/v1/nodes/{name}")
            except StatusError:
                pass
        await sched.client.close()
        await admin.close()
