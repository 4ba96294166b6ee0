"""Services: ClusterIP and NodePort allocation, the apiserver's own ``kubernetes`` Service, and the endpoints
controller (Endpoints and EndpointSlices from selected pods), all through the real kubectl."""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from kplane.controllers.endpoints import desired_endpoints, desired_slices
from tests.cluster import Cluster
from tests.test_node import phase, run_pod, wait


def get(cluster: Cluster, *args: str) -> Any:
    return json.loads(cluster.kubectl("get", *args, "-o", "json").stdout)


def svc(name: str, *, ports: list[dict[str, Any]] | None = None, **spec: Any) -> str:
    body = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
            "spec": {"ports": ports or [{"port": 80}], **spec}}
    return json.dumps(body)


def test_kubernetes_service_endpoints_and_slice(cluster: Cluster) -> None:
    net = ipaddress.ip_network(cluster.service_cidr)
    s = get(cluster, "service", "kubernetes", "-n", "default")
    assert s["spec"]["clusterIP"] == str(net.network_address + 1)
    assert s["spec"]["clusterIPs"] == [s["spec"]["clusterIP"]]
    assert [(p["name"], p["port"], p["targetPort"]) for p in s["spec"]["ports"]] == [("https", 443, cluster.port)]
    assert s["metadata"]["labels"] == {"component": "apiserver", "provider": "kubernetes"}
    ep = get(cluster, "endpoints", "kubernetes", "-n", "default")
    [subset] = ep["subsets"]
    [addr] = subset["addresses"]
    kubeconfig_host = cluster.kubeconfig.read_text().split("server: ")[1].split()[0].strip('"')
    assert f"https://{addr['ip']}:{cluster.port}" == kubeconfig_host  # the advertise address
    assert subset["ports"] == [{"name": "https", "port": cluster.port, "protocol": "TCP"}]
    es = get(cluster, "endpointslice", "kubernetes", "-n", "default")
    assert es["metadata"]["labels"]["kubernetes.io/service-name"] == "kubernetes"
    assert es["endpoints"][0]["addresses"] == [addr["ip"]] and es["endpoints"][0]["conditions"]["ready"] is True


def test_kubernetes_service_is_recreated(cluster: Cluster) -> None:
    cluster.kubectl("delete", "endpoints", "kubernetes", "-n", "default")
    wait(lambda: cluster.kubectl("get", "endpoints", "kubernetes", "-n", "default", check=False).returncode == 0,
         timeout=20)


def test_cluster_ip_allocation(cluster: Cluster, ns: str) -> None:
    net = ipaddress.ip_network(cluster.service_cidr)
    cluster.kubectl("apply", "-n", ns, "-f", "-", input=svc("a"))
    cluster.kubectl("apply", "-n", ns, "-f", "-", input=svc("b"))
    a, b = get(cluster, "svc", "a", "-n", ns), get(cluster, "svc", "b", "-n", ns)
    ips = {a["spec"]["clusterIP"], b["spec"]["clusterIP"]}
    assert len(ips) == 2
    for ip in ips:
        addr = ipaddress.ip_address(ip)
        assert addr in net and addr not in (net.network_address, net.network_address + 1, net.broadcast_address)
    # a chosen address inside the range; then the same one again; then one outside
    fixed = str(net.network_address + 200)
    cluster.kubectl("apply", "-n", ns, "-f", "-", input=svc("fixed", clusterIP=fixed))
    assert get(cluster, "svc", "fixed", "-n", ns)["spec"]["clusterIPs"] == [fixed]
    dup = cluster.kubectl("apply", "-n", ns, "-f", "-", input=svc("dup", clusterIP=fixed), check=False)
    assert dup.returncode != 0 and "provided IP is already allocated" in dup.stderr
    outside = cluster.kubectl("apply", "-n", ns, "-f", "-", input=svc("out", clusterIP="192.0.2.77"), check=False)
    assert outside.returncode != 0 and f"The range of valid IPs is {net}" in outside.stderr
    garbage = cluster.kubectl("apply", "-n", ns, "-f", "-", input=svc("junk", clusterIP="10.0.0.999"), check=False)
    assert garbage.returncode != 0 and "must be a valid IP address" in garbage.stderr
    # the address is immutable, but an update that leaves it out keeps it (kubectl replace of a bare manifest)
    moved = cluster.kubectl("patch", "svc", "fixed", "-n", ns, "-p",
                            json.dumps({"spec": {"clusterIP": str(net.network_address + 201)}}), check=False)
    assert moved.returncode != 0 and "may not change once set" in moved.stderr
    cluster.kubectl("replace", "-n", ns, "-f", "-", input=svc("fixed", ports=[{"port": 81}]))
    assert get(cluster, "svc", "fixed", "-n", ns)["spec"]["clusterIP"] == fixed
    # deleting frees it; dry-run reserves nothing
    cluster.kubectl("delete", "svc", "fixed", "-n", ns)
    cluster.kubectl("apply", "--dry-run=server", "-n", ns, "-f", "-", input=svc("again", clusterIP=fixed))
    cluster.kubectl("apply", "-n", ns, "-f", "-", input=svc("again", clusterIP=fixed))
    assert get(cluster, "svc", "again", "-n", ns)["spec"]["clusterIP"] == fixed
    # headless and ExternalName services hold no address
    cluster.kubectl("apply", "-n", ns, "-f", "-", input=svc("headless", clusterIP="None"))
    assert get(cluster, "svc", "headless", "-n", ns)["spec"]["clusterIPs"] == ["None"]
    cluster.kubectl("create", "service", "externalname", "ext", "-n", ns, "--external-name", "example.test")
    assert "clusterIP" not in get(cluster, "svc", "ext", "-n", ns)["spec"]


def test_node_port_allocation(cluster: Cluster, ns: str) -> None:
    cluster.kubectl("create", "service", "nodeport", "np", "-n", ns, "--tcp=80:8080")
    port = get(cluster, "svc", "np", "-n", ns)["spec"]["ports"][0]["nodePort"]
    assert 30000 <= port <= 32767
    taken = cluster.kubectl("apply", "-n", ns, "-f", "-", check=False,
                            input=svc("np2", type="NodePort", ports=[{"port": 80, "nodePort": port}]))
    assert taken.returncode != 0 and "provided port is already allocated" in taken.stderr
    bad = cluster.kubectl("apply", "-n", ns, "-f", "-", check=False,
                          input=svc("np3", type="NodePort", ports=[{"port": 80, "nodePort": 80}]))
    assert bad.returncode != 0 and "30000-32767" in bad.stderr
    forbidden = cluster.kubectl("apply", "-n", ns, "-f", "-", check=False,
                                input=svc("np4", ports=[{"port": 80, "nodePort": 31000}]))
    assert forbidden.returncode != 0 and "nodePort" in forbidden.stderr
    # NodePort -> ClusterIP gives the port back
    cluster.kubectl("patch", "svc", "np", "-n", ns, "--type=json", "-p",
                    json.dumps([{"op": "replace", "path": "/spec/type", "value": "ClusterIP"},
                                {"op": "remove", "path": "/spec/ports/0/nodePort"}]))
    cluster.kubectl("apply", "-n", ns, "-f", "-", input=svc("np5", type="NodePort",
                                                                 ports=[{"port": 80, "nodePort": port}]))


def test_endpoints_follow_pods(cluster: Cluster, ns: str) -> None:
    ports = [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    for name in ("web-1", "web-2"):
        body = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"app": "web"}},
                "spec": {"containers": [{"name": "c", "image": "none", "command": ["sleep", "3600"],
                                         "ports": ports}]}}
        cluster.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(body))
    run_pod(cluster, ns, "other", ["sleep", "3600"])
    cluster.kubectl("apply", "-n", ns, "-f", "-",
                    input=svc("web", selector={"app": "web"},
                              ports=[{"name": "named", "port": 80, "targetPort": "http"},
                                     {"name": "num", "port": 81, "targetPort": 9090}]))
    wait(lambda: phase(cluster, ns, "web-1") == "Running" and phase(cluster, ns, "web-2") == "Running")
    ips = {get(cluster, "pod", n, "-n", ns)["status"]["podIP"] for n in ("web-1", "web-2")}

    def endpoints() -> set[tuple[str, int]]:
        ep = get(cluster, "endpoints", "web", "-n", ns)
        return {(a["ip"], p["port"]) for s in ep.get("subsets") or [] for a in s.get("addresses") or []
                for p in s["ports"]}

    want = {(ip, port) for ip in ips for port in (8080, 9090)}
    wait(lambda: endpoints() == want)
    ep = get(cluster, "endpoints", "web", "-n", ns)
    refs = sorted(a["targetRef"]["name"] for s in ep["subsets"] for a in s["addresses"])
    assert set(refs) == {"web-1", "web-2"}
    slices = get(cluster, "endpointslices", "-n", ns, "-l", "kubernetes.io/service-name=web")["items"]
    assert len(slices) == 1
    assert {p["name"]: p["port"] for p in slices[0]["ports"]} == {"named": 8080, "num": 9090}
    assert slices[0]["metadata"]["labels"]["endpointslice.kubernetes.io/managed-by"] == \
        "endpointslice-controller.k8s.io"
    assert slices[0]["metadata"]["ownerReferences"][0]["kind"] == "Service"
    assert sorted(e["targetRef"]["name"] for e in slices[0]["endpoints"]) == ["web-1", "web-2"]
    # a pod going away leaves the endpoints
    cluster.kubectl("delete", "pod", "web-2", "-n", ns, "--grace-period=0", "--force")
    wait(lambda: {a["targetRef"]["name"] for s in get(cluster, "endpoints", "web", "-n", ns).get("subsets") or []
                  for a in s.get("addresses") or []} == {"web-1"})
    # the Service going away removes its endpoints and slices
    cluster.kubectl("delete", "svc", "web", "-n", ns)
    wait(lambda: cluster.kubectl("get", "endpoints", "web", "-n", ns, check=False).returncode != 0)
    wait(lambda: not get(cluster, "endpointslices", "-n", ns, "-l", "kubernetes.io/service-name=web")["items"])


def test_service_without_selector_keeps_hand_written_endpoints(cluster: Cluster, ns: str) -> None:
    cluster.kubectl("apply", "-n", ns, "-f", "-", input=svc("manual", ports=[{"port": 80}]))
    ep = {"apiVersion": "v1", "kind": "Endpoints", "metadata": {"name": "manual"},
          "subsets": [{"addresses": [{"ip": "10.1.2.3"}], "ports": [{"port": 80}]}]}
    cluster.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(ep))
    time.sleep(1)  # the endpoints controller has seen the Service by now
    got = get(cluster, "endpoints", "manual", "-n", ns)
    assert got["subsets"][0]["addresses"][0]["ip"] == "10.1.2.3"


# --- the pure part of the controller -------------------------------------------------------------------------------

def _pod(name: str, ip: str | None, *, ready: bool = True, labels: dict[str, str] | None = None,
         deleting: bool = False, phase_: str = "Running", ports: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    md: dict[str, Any] = {"name": name, "namespace": "n", "uid": f"uid-{name}", "labels": labels or {"a": "b"}}
    if deleting:
        md["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    st: dict[str, Any] = {"phase": phase_, "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}
    if ip:
        st["podIP"] = ip
    return {"metadata": md, "spec": {"nodeName": "n1", "containers": [{"name": "c", "ports": ports or []}]},
            "status": st}


SVC = {"metadata": {"name": "s", "namespace": "n", "uid": "svc-uid"},
       "spec": {"selector": {"a": "b"}, "ports": [{"name": "p", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}}


def test_desired_endpoints_pure() -> None:
    pods = [_pod("r", "10.0.0.1"), _pod("nr", "10.0.0.2", ready=False), _pod("noip", None),
            _pod("done", "10.0.0.3", phase_="Succeeded"), _pod("gone", "10.0.0.4", deleting=True),
            _pod("other", "10.0.0.5", labels={"a": "c"})]
    ep = desired_endpoints(SVC, pods)
    [sub] = ep["subsets"]
    assert [a["ip"] for a in sub["addresses"]] == ["10.0.0.1"]
    assert [a["ip"] for a in sub["notReadyAddresses"]] == ["10.0.0.2"]
    assert sub["ports"] == [{"name": "p", "port": 8080, "protocol": "TCP"}]
    [sl] = desired_slices(SVC, pods)
    conds = {e["addresses"][0]: e["conditions"] for e in sl["endpoints"]}
    assert conds["10.0.0.1"] == {"ready": True, "serving": True, "terminating": False}
    assert conds["10.0.0.2"]["ready"] is False
    assert conds["10.0.0.4"] == {"ready": False, "serving": True, "terminating": True}
    assert "10.0.0.3" not in conds and "10.0.0.5" not in conds


def test_named_target_port_resolved_per_pod() -> None:
    svc_named = {**SVC, "spec": {"selector": {"a": "b"},
                                 "ports": [{"name": "p", "port": 80, "targetPort": "web", "protocol": "TCP"}]}}
    pods = [_pod("x", "10.0.0.1", ports=[{"name": "web", "containerPort": 8000}]),
            _pod("y", "10.0.0.2", ports=[{"name": "web", "containerPort": 9000}]),
            _pod("z", "10.0.0.3", ports=[{"name": "other", "containerPort": 9000}])]
    ep = desired_endpoints(svc_named, pods)
    got = {(a["ip"], s["ports"][0]["port"]) for s in ep["subsets"] for a in s["addresses"]}
    assert got == {("10.0.0.1", 8000), ("10.0.0.2", 9000)}
    assert len(desired_slices(svc_named, pods)) == 2


def test_no_pods_gives_an_empty_slice_and_no_subsets() -> None:
    assert "subsets" not in desired_endpoints(SVC, [])
    [sl] = desired_slices(SVC, [])
    assert sl["endpoints"] == [] and sl["ports"] == []


def test_bad_service_specs(cluster: Cluster, ns: str) -> None:
    bad = cluster.kubectl("apply", "-n", ns, "-f", "-", check=False,
                          input=svc("b1", ports=[{"port": 80, "nodePort": "x"}], type="NodePort"))
    assert bad.returncode != 0
    bad = cluster.kubectl("apply", "-n", ns, "-f", "-", check=False,
                          input=svc("b2", type="ExternalName", externalName="x.test", clusterIP="10.0.0.1"))
    assert bad.returncode != 0


def test_service_environment_variables(cluster: Cluster, ns: str) -> None:
    cluster.kubectl("apply", "-n", ns, "-f", "-", input=svc("env-svc", ports=[{"name": "web", "port": 80},
                                                                               {"name": "dns", "port": 53,
                                                                                "protocol": "UDP"}]))
    ip = get(cluster, "svc", "env-svc", "-n", ns)["spec"]["clusterIP"]
    run_pod(cluster, ns, "linked", ["env"], restartPolicy="Never")
    run_pod(cluster, ns, "unlinked", ["env"], restartPolicy="Never", enableServiceLinks=False)
    wait(lambda: phase(cluster, ns, "linked") == "Succeeded" and phase(cluster, ns, "unlinked") == "Succeeded")

    def env_of(pod: str) -> dict[str, str]:
        out = cluster.kubectl("logs", pod, "-n", ns).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    linked, unlinked = env_of("linked"), env_of("unlinked")
    assert linked["ENV_SVC_SERVICE_HOST"] == ip and linked["ENV_SVC_SERVICE_PORT"] == "80"
    assert linked["ENV_SVC_SERVICE_PORT_WEB"] == "80" and linked["ENV_SVC_SERVICE_PORT_DNS"] == "53"
    assert linked["ENV_SVC_PORT"] == f"tcp://{ip}:80"
    assert linked["ENV_SVC_PORT_53_UDP"] == f"udp://{ip}:53" and linked["ENV_SVC_PORT_53_UDP_PROTO"] == "udp"
    assert linked["ENV_SVC_PORT_80_TCP_ADDR"] == ip and linked["ENV_SVC_PORT_80_TCP_PORT"] == "80"
    assert not any(k.startswith("ENV_SVC_") for k in unlinked)
    for env in (linked, unlinked):  # always there: the in-cluster config reads these two
        assert env["KUBERNETES_SERVICE_HOST"] and env["KUBERNETES_SERVICE_PORT"]


def test_bad_service_range_flag_is_a_clear_error(tmp_path: Path) -> None:
    for bad, text in (("10.0.0.1/24", "has host bits set"), ("10.0.0.0/30", "too small"),
                      ("fe80::/64", "only IPv4"), ("banana", "does not appear to be")):
        p = subprocess.run([sys.executable, "-m", "kplane.cli", "up", "--data-dir", str(tmp_path / "d"),
                            "--service-cluster-ip-range", bad], capture_output=True, text=True, timeout=30)
        assert p.returncode == 1 and text in p.stderr and "Traceback" not in p.stderr, (bad, p.stderr)
