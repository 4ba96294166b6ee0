"""The proxy subresources (pods, services, nodes) through the real kubectl and ``kubectl proxy``: what reaches the
backend, HTTPS targets, endpoint changes, and every way of pointing the apiserver somewhere it must not go."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from kplane import pki
from tests.cluster import KUBECTL, Cluster, free_port
from tests.test_node import node_name, phase, wait

BACKEND = Path(__file__).with_name("proxy_backend.py")


def admin(cluster: Cluster) -> dict[str, Any]:
    return {"cert": (str(cluster.pki / "admin.crt"), str(cluster.pki / "admin.key")),
            "verify": str(cluster.pki / "ca.crt"), "timeout": 30}


def backend_pod(cluster: Cluster, ns: str, name: str, port: int, *, labels: dict[str, str] | None = None,
                pem: Path | None = None, tag: str = "", port_name: str = "http") -> None:
    body = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels or {}},
            "spec": {"containers": [{
                "name": "c", "image": "none",
                "command": [sys.executable, str(BACKEND), str(port), str(pem) if pem else "-", "0.0.0.0", tag],
                "ports": [{"name": port_name, "containerPort": port}]}]}}
    cluster.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(body))


def raw(cluster: Cluster, path: str, *, check: bool = True) -> subprocess.CompletedProcess[str]:
    return cluster.kubectl("get", "--raw", path, check=check)


def serving(cluster: Cluster, path: str) -> Any:
    def ok() -> Any:
        p = raw(cluster, path, check=False)
        return json.loads(p.stdout) if p.returncode == 0 and p.stdout.startswith("{") else None

    return wait(ok, timeout=30)


@pytest.fixture(scope="module")
def web(cluster: Cluster) -> Iterator[tuple[str, int]]:
    ns = "proxy"
    cluster.kubectl("create", "namespace", ns)
    port = free_port()
    backend_pod(cluster, ns, "web", port, labels={"app": "web"})
    wait(lambda: phase(cluster, ns, "web") == "Running")
    serving(cluster, f"/api/v1/namespaces/{ns}/pods/web:{port}/proxy/ready")
    yield ns, port


def test_pod_proxy_forwards_method_path_query_and_body(cluster: Cluster, web: tuple[str, int]) -> None:
    ns, port = web
    got = serving(cluster, f"/api/v1/namespaces/{ns}/pods/web:{port}/proxy/some/path?a=1&b=two")
    assert got["method"] == "GET" and got["path"] == "/some/path?a=1&b=two" and got["port"] == port
    # no port: the first container port; an explicit http: scheme is the same thing
    assert serving(cluster, f"/api/v1/namespaces/{ns}/pods/web/proxy/x")["path"] == "/x"
    assert serving(cluster, f"/api/v1/namespaces/{ns}/pods/http:web:{port}/proxy/y")["path"] == "/y"
    url = f"{cluster.url}/api/v1/namespaces/{ns}/pods/web:{port}/proxy/post/"
    r = requests.post(url, data=b"hello body", headers={"Authorization": "Bearer should-not-pass",
                                                        "Impersonate-User": "bob", "X-Custom": "kept"},
                      **admin(cluster))
    assert r.status_code == 200, r.text
    seen = r.json()
    assert seen["method"] == "POST" and seen["body"] == "hello body" and seen["path"] == "/post/"
    headers = {k.lower(): v for k, v in seen["headers"].items()}
    assert "authorization" not in headers and "impersonate-user" not in headers
    assert headers["x-custom"] == "kept" and headers["x-forwarded-for"]
    # a large body comes back whole
    big = requests.get(f"{cluster.url}/api/v1/namespaces/{ns}/pods/web:{port}/proxy/big", **admin(cluster))
    assert big.status_code == 200 and len(big.content) == 4 * 1024 * 1024


def test_redirects_are_returned_not_followed(cluster: Cluster, web: tuple[str, int]) -> None:
    ns, port = web
    base = f"/api/v1/namespaces/{ns}/pods/web:{port}/proxy"
    r = requests.get(f"{cluster.url}{base}/redirect-self", allow_redirects=False, **admin(cluster))
    assert r.status_code == 302
    assert r.headers["Location"] == f"{base}/landed?x=1"  # back through the proxy
    r = requests.get(f"{cluster.url}{base}/redirect-away", allow_redirects=False, **admin(cluster))
    assert r.status_code == 307 and r.headers["Location"].startswith("http://169.254.169.254/")


def test_upgrade_answered_with_a_redirect_is_refused(cluster: Cluster, web: tuple[str, int]) -> None:
    ns, port = web
    r = requests.get(f"{cluster.url}/api/v1/namespaces/{ns}/pods/web:{port}/proxy/ws",
                     headers={"Connection": "Upgrade", "Upgrade": "websocket"}, allow_redirects=False,
                     **admin(cluster))
    assert r.status_code == 502
    assert "redirect" in r.json()["message"] and r.json()["kind"] == "Status"


def test_https_pod_target_is_reached_and_reported_unverified(cluster: Cluster, tmp_path_factory: Any) -> None:
    ns = "proxy-https"
    cluster.kubectl("create", "namespace", ns)
    d = tmp_path_factory.mktemp("tls")
    ca = pki.new_ca("backend-ca")
    leaf = pki.issue(ca, common_name="backend", server=True, dns_names=["backend"])
    pem = d / "backend.pem"
    pem.write_bytes(leaf.cert_pem() + leaf.key_pem())
    pem.chmod(0o644)
    port = free_port()
    backend_pod(cluster, ns, "tls", port, pem=pem)
    wait(lambda: phase(cluster, ns, "tls") == "Running")
    path = f"/api/v1/namespaces/{ns}/pods/https:tls:{port}/proxy/secure"

    def ok() -> subprocess.CompletedProcess[str] | None:
        p = raw(cluster, path, check=False)
        return p if p.returncode == 0 else None

    p = wait(ok)
    assert json.loads(p.stdout)["path"] == "/secure"
    assert "was not verified" in p.stderr  # kubectl prints the Warning header
    # plain http to a TLS server is an error from the backend, not a crash
    plain = raw(cluster, f"/api/v1/namespaces/{ns}/pods/http:tls:{port}/proxy/secure", check=False)
    assert plain.returncode != 0


def test_service_proxy_by_port_name_and_number(cluster: Cluster, web: tuple[str, int]) -> None:
    ns, port = web
    cluster.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "websvc"},
        "spec": {"selector": {"app": "web"}, "ports": [{"name": "web", "port": 80, "targetPort": "http"}]}}))
    assert serving(cluster, f"/api/v1/namespaces/{ns}/services/websvc:web/proxy/n")["path"] == "/n"
    assert serving(cluster, f"/api/v1/namespaces/{ns}/services/websvc:80/proxy/p")["port"] == port
    assert serving(cluster, f"/api/v1/namespaces/{ns}/services/http:websvc:web/proxy/q")["path"] == "/q"
    nope = raw(cluster, f"/api/v1/namespaces/{ns}/services/websvc:nope/proxy/", check=False)
    assert nope.returncode != 0 and 'no service port "nope"' in nope.stderr
    cluster.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "empty"},
        "spec": {"selector": {"app": "nothing"}, "ports": [{"port": 80}]}}))
    empty = raw(cluster, f"/api/v1/namespaces/{ns}/services/empty/proxy/", check=False)
    assert empty.returncode != 0 and "no endpoints available" in empty.stderr


def test_service_keeps_working_when_its_endpoint_changes(cluster: Cluster, ns: str) -> None:
    cluster.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "moving"},
        "spec": {"selector": {"app": "moving"}, "ports": [{"name": "h", "port": 80, "targetPort": "http"}]}}))
    first, second = free_port(), free_port()
    backend_pod(cluster, ns, "one", first, labels={"app": "moving"}, tag="one")
    path = f"/api/v1/namespaces/{ns}/services/moving:h/proxy/"
    assert wait(lambda: (serving(cluster, path) or {}).get("tag") == "one")
    cluster.kubectl("delete", "pod", "one", "-n", ns, "--grace-period=0", "--force")
    backend_pod(cluster, ns, "two", second, labels={"app": "moving"}, tag="two")
    wait(lambda: json.loads(p.stdout).get("tag") == "two" if (p := raw(cluster, path, check=False)).returncode == 0
         else False, timeout=40)


def test_node_proxy_to_kubelet_and_to_a_node_port(cluster: Cluster) -> None:
    node = node_name(cluster)  # the cluster's own node (other tests add fake ones)
    assert raw(cluster, f"/api/v1/nodes/{node}/proxy/healthz").stdout == "ok"
    pods = json.loads(raw(cluster, f"/api/v1/nodes/{node}/proxy/pods").stdout)
    assert pods["kind"] == "PodList"
    # another port on the node's address: plain HTTP to whatever listens there
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(BACKEND), str(port), "-", "0.0.0.0", "host"])
    try:
        got = serving(cluster, f"/api/v1/nodes/{node}:{port}/proxy/on-node")
        assert got["path"] == "/on-node" and got["tag"] == "host"
    finally:
        proc.kill()
        proc.wait()


def test_kubectl_proxy(cluster: Cluster, web: tuple[str, int]) -> None:
    ns, port = web
    local = free_port()
    env = {"KUBECONFIG": str(cluster.kubeconfig), "HOME": str(cluster.data_dir.parent), "PATH": "/usr/bin:/bin"}
    proc = subprocess.Popen([KUBECTL, "proxy", f"--port={local}"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{local}/api/v1/namespaces/{ns}/pods/web:{port}/proxy/through-kubectl?z=9"

        def get() -> Any:
            try:
                r = requests.get(url, timeout=5)
            except requests.ConnectionError:
                return None
            return r if r.status_code == 200 else None

        r = wait(get)
        assert r.json()["path"] == "/through-kubectl?z=9"
        svc = requests.get(f"http://127.0.0.1:{local}/api/v1/namespaces/default/services/kubernetes", timeout=5)
        assert svc.json()["metadata"]["name"] == "kubernetes"
    finally:
        proc.terminate()
        proc.wait()


# --- where the proxy must not go -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "code", "text"), [
    ("127.0.0.1:6443", 404, 'pods "127.0.0.1" not found'),
    ("evil.com", 404, 'pods "evil.com" not found'),
    ("evil.com:80", 404, 'pods "evil.com" not found'),
    ("web:0", 400, "invalid port '0'"),
    ("web:99999", 400, "invalid port '99999'"),
    ("web:http", 400, "invalid port 'http'"),
    ("web:-1", 400, "invalid port '-1'"),
    ("ftp:web:21", 400, "scheme http or https"),
    ("a:b:c:d", 400, "is not [scheme:]name[:port]"),
    ("https:127.0.0.1:443", 404, 'pods "127.0.0.1" not found'),
])
def test_bad_pod_proxy_names(cluster: Cluster, web: tuple[str, int], name: str, code: int, text: str) -> None:
    ns, _ = web
    r = requests.get(f"{cluster.url}/api/v1/namespaces/{ns}/pods/{name}/proxy/", **admin(cluster))
    assert r.status_code == code, r.text
    st = r.json()
    assert st["kind"] == "Status" and st["code"] == code and text in st["message"]


def _fake_node(cluster: Cluster, name: str, addresses: list[dict[str, str]]) -> None:
    cluster.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "Node",
                                                            "metadata": {"name": name}}))
    r = requests.patch(f"{cluster.url}/api/v1/nodes/{name}/status", data=json.dumps({"status": {
        "addresses": addresses, "daemonEndpoints": {"kubeletEndpoint": {"Port": 6443}}}}),
        headers={"Content-Type": "application/merge-patch+json"}, **admin(cluster))
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(("node", "addresses"), [
    ("loop-node", [{"type": "InternalIP", "address": "127.0.0.1"}]),
    ("meta-node", [{"type": "InternalIP", "address": "169.254.169.254"}]),
    ("v6-node", [{"type": "InternalIP", "address": "::1"}]),
    ("mapped-node", [{"type": "InternalIP", "address": "::ffff:127.0.0.1"}]),
    ("zero-node", [{"type": "InternalIP", "address": "0.0.0.0"}]),
    ("name-node", [{"type": "Hostname", "address": "localhost"}]),
])
def test_node_with_local_address_is_refused(cluster: Cluster, node: str, addresses: list[dict[str, str]]) -> None:
    _fake_node(cluster, node, addresses)
    try:
        for path in (f"/api/v1/nodes/{node}/proxy/", f"/api/v1/nodes/{node}:6443/proxy/version",
                     f"/api/v1/nodes/https:{node}:6443/proxy/"):
            r = requests.get(cluster.url + path, **admin(cluster))
            assert r.status_code == 400, (path, r.text)
            assert "address not allowed" in r.json()["message"]
    finally:
        cluster.kubectl("delete", "node", node, "--wait=false")


def test_pod_with_local_ip_is_refused(cluster: Cluster, ns: str) -> None:
    body = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "liar"},
            "spec": {"nodeName": "no-such-node", "containers": [{"name": "c", "image": "none"}]}}
    cluster.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(body))
    r = requests.patch(f"{cluster.url}/api/v1/namespaces/{ns}/pods/liar/status",
                       data=json.dumps({"status": {"podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}]}}),
                       headers={"Content-Type": "application/merge-patch+json"}, **admin(cluster))
    assert r.status_code == 200, r.text
    r = requests.get(f"{cluster.url}/api/v1/namespaces/{ns}/pods/liar:6443/proxy/", **admin(cluster))
    assert r.status_code == 400 and "address not allowed" in r.json()["message"]
    # an Endpoints object pointing at loopback is refused too
    cluster.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "loopsvc"}, "spec": {"ports": [{"port": 80}]}}))
    cluster.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps({
        "apiVersion": "v1", "kind": "Endpoints", "metadata": {"name": "loopsvc"},
        "subsets": [{"addresses": [{"ip": "127.0.0.1"}], "ports": [{"port": cluster.port}]}]}))
    r = requests.get(f"{cluster.url}/api/v1/namespaces/{ns}/services/loopsvc/proxy/", **admin(cluster))
    assert r.status_code == 400 and "address not allowed" in r.json()["message"]


def test_proxy_needs_authorization(cluster: Cluster, web: tuple[str, int], tmp_path: Path) -> None:
    ns, port = web
    kc = cluster.token_kubeconfig(tmp_path / "alice.kubeconfig", "static-token-alice-0123456789")
    p = cluster.kubectl("get", "--raw", f"/api/v1/namespaces/{ns}/pods/web:{port}/proxy/", check=False,
                        kubeconfig=kc)
    assert p.returncode != 0 and 'pods/proxy "web:' in p.stderr and "forbidden" in p.stderr
    r = requests.get(f"{cluster.url}/api/v1/namespaces/{ns}/pods/web:{port}/proxy/", verify=str(cluster.pki / "ca.crt"),
                     timeout=10)
    assert r.status_code in (401, 403) and r.json()["kind"] == "Status"


def test_proxy_path_traversal_is_refused(cluster: Cluster, web: tuple[str, int]) -> None:
    ns, port = web
    for path in (f"/api/v1/namespaces/{ns}/pods/web:{port}/proxy/../../../../secrets",
                 f"/api/v1/namespaces/{ns}/pods/web:{port}/proxy/%2e%2e/%2e%2e/x"):
        r = requests.get(cluster.url + path, **admin(cluster))
        assert r.status_code in (400, 404) and r.json()["kind"] == "Status", (path, r.text)
    time.sleep(0)
