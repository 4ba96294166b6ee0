"""The kubelet's HTTPS API and the apiserver -> kubelet path: authentication, authorization, verified certs, logs."""

from __future__ import annotations

import asyncio
import json
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import urllib3

from kplane import pki
from tests.cluster import Cluster, free_port
from tests.test_node import node_cert, node_name, phase, pod_json, run_pod, wait

urllib3.disable_warnings()

KUBELET_PATHS = ["/healthz", "/pods", "/runningpods/", "/configz", "/metrics", "/stats/summary",
                 "/containerLogs/default/p/c", "/exec/default/p/c?command=id&output=1",
                 "/attach/default/p/c?output=1", "/portForward/default/p", "/run/default/p/c?cmd=id"]


def kubelet_url(cluster: Cluster, path: str) -> str:
    return f"https://{cluster.node_ip}:{cluster.kubelet_port}{path}"  # the serving cert names the node's address


def sa_token(cluster: Cluster, ns: str, name: str) -> str:
    cluster.kubectl("create", "serviceaccount", name, "-n", ns)
    return cluster.kubectl("create", "token", name, "-n", ns, "--duration=10m").stdout.strip()


def test_kubelet_refuses_anonymous_and_unauthorized(cluster: Cluster, ns: str) -> None:
    ca = str(cluster.pki / "ca.crt")
    token = sa_token(cluster, ns, "nobody")
    for path in KUBELET_PATHS:
        for method in ("GET", "POST"):
            r = requests.request(method, kubelet_url(cluster, path), verify=ca, timeout=10)
            assert r.status_code == 401, (method, path, r.status_code)  # never 403 for anonymous
            r = requests.request(method, kubelet_url(cluster, path), verify=ca, timeout=10,
                                 headers={"Authorization": "Bearer garbage"})
            assert r.status_code == 401, (method, path)
            r = requests.request(method, kubelet_url(cluster, path), verify=ca, timeout=10,
                                 headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == 403, (method, path, r.status_code, r.text)
            assert "Forbidden (user=system:serviceaccount:" in r.text


def test_kubelet_serves_authorized_callers(cluster: Cluster) -> None:
    ca = str(cluster.pki / "ca.crt")
    admin = (str(cluster.pki / "apiserver-kubelet-client.crt"), str(cluster.pki / "apiserver-kubelet-client.key"))
    assert requests.get(kubelet_url(cluster, "/healthz"), cert=admin, verify=ca, timeout=10).text == "ok"
    pods = requests.get(kubelet_url(cluster, "/pods"), cert=admin, verify=ca, timeout=10).json()
    assert pods["kind"] == "PodList"
    cfg = requests.get(kubelet_url(cluster, "/configz"), cert=admin, verify=ca, timeout=10).json()["kubeletconfig"]
    assert cfg["readOnlyPort"] == 0 and cfg["authentication"]["anonymous"]["enabled"] is False
    assert "kubelet_running_pods" in requests.get(kubelet_url(cluster, "/metrics"), cert=admin, verify=ca,
                                                  timeout=10).text
    summary = requests.get(kubelet_url(cluster, "/stats/summary"), cert=admin, verify=ca, timeout=10).json()
    assert summary["node"]["nodeName"]
    # the kubelet's serving certificate is the one the CSR flow issued, valid for the node's address
    der = ssl.get_server_certificate((cluster.node_ip, cluster.kubelet_port))
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(der.encode())
    assert cert.issuer.rfc4514_string() == x509.load_pem_x509_certificate(
        (cluster.pki / "ca.crt").read_bytes()).subject.rfc4514_string()
    # no read-only port
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get("http://127.0.0.1:10255/pods", timeout=2)


def test_kubelet_bad_paths(cluster: Cluster, ns: str) -> None:
    ca = str(cluster.pki / "ca.crt")
    admin = (str(cluster.pki / "apiserver-kubelet-client.crt"), str(cluster.pki / "apiserver-kubelet-client.key"))
    run_pod(cluster, ns, "lp", ["sleep", "600"])
    wait(lambda: phase(cluster, ns, "lp") == "Running")
    for path in (f"/containerLogs/{ns}/lp/..", f"/containerLogs/{ns}/../lp/c", "/containerLogs/%2e%2e/x/y"):
        r = requests.get(kubelet_url(cluster, path), cert=admin, verify=ca, timeout=10)
        assert 400 <= r.status_code < 500, (path, r.status_code)
    r = requests.get(kubelet_url(cluster, f"/containerLogs/{ns}/lp/nope"), cert=admin, verify=ca, timeout=10)
    assert r.status_code == 404 and "not valid" in r.text
    r = requests.get(kubelet_url(cluster, f"/containerLogs/{ns}/missing/c"), cert=admin, verify=ca, timeout=10)
    assert r.status_code == 404
    r = requests.get(kubelet_url(cluster, f"/containerLogs/{ns}/lp/c?tailLines=abc"), cert=admin, verify=ca,
                     timeout=10)
    assert r.status_code == 400
    cluster.kubectl("delete", "pod", "lp", "-n", ns, "--wait=false")


def test_kubectl_logs(cluster: Cluster, ns: str) -> None:
    run_pod(cluster, ns, "talker", ["sh", "-c", "for i in 1 2 3 4 5; do echo line $i; echo err $i >&2; done; "
                                          "sleep 600"])
    wait(lambda: "line 5" in cluster.kubectl("logs", "talker", "-n", ns, check=False).stdout)
    out = cluster.kubectl("logs", "talker", "-n", ns).stdout.splitlines()
    assert [x for x in out if x.startswith("line")] == [f"line {i}" for i in range(1, 6)]
    assert "err 3" in out
    # stdout and stderr are separate pipes: their interleaving is not ordered, each stream is
    tail = cluster.kubectl("logs", "talker", "-n", ns, "--tail=2").stdout.splitlines()
    assert len(tail) == 2 and "err 5" in tail
    ts = cluster.kubectl("logs", "talker", "-n", ns, "--tail=1", "--timestamps").stdout.strip()
    stamp, text = ts.split(" ", 1)
    assert text in ("err 5", "line 5") and stamp.endswith("Z") and stamp[:4].isdigit()
    p = cluster.kubectl("logs", "talker", "-n", ns, "-c", "nope", check=False)
    assert p.returncode != 0 and "nope" in p.stderr


def test_kubectl_logs_follow_and_previous(cluster: Cluster, ns: str) -> None:
    import os
    import subprocess

    from tests.cluster import KUBECTL

    run_pod(cluster, ns, "ticker", ["sh", "-c", "i=0; while true; do i=$((i+1)); echo tick $i; sleep 0.2; done"])
    wait(lambda: phase(cluster, ns, "ticker") == "Running")
    env = dict(os.environ, KUBECONFIG=str(cluster.kubeconfig), HOME=str(cluster.data_dir.parent))
    f = subprocess.Popen([KUBECTL, "logs", "-f", "ticker", "-n", ns], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert f.stdout is not None
        seen = [f.stdout.readline().strip() for _ in range(8)]
        assert seen[-1].startswith("tick ") and int(seen[-1].split()[1]) >= 8
    finally:
        f.terminate()
        f.wait(5)
    run_pod(cluster, ns, "phoenix", ["sh", "-c", "echo attempt $(date +%s%N); exit 1"])
    wait(lambda: (pod_json(cluster, ns, "phoenix")["status"].get("containerStatuses") or [{}])[0]
         .get("restartCount", 0) >= 1)
    prev = cluster.kubectl("logs", "phoenix", "-n", ns, "--previous").stdout
    assert prev.startswith("attempt ")


def test_user_with_get_nodes_proxy_cannot_exec(cluster: Cluster, ns: str, tmp_path: Path) -> None:
    token = sa_token(cluster, ns, "monitor")
    cluster.kubectl("create", "clusterrole", f"{ns}-proxy-reader", "--verb=get", "--resource=nodes/proxy,pods")
    cluster.kubectl("create", "clusterrolebinding", f"{ns}-proxy-reader", f"--clusterrole={ns}-proxy-reader",
                    f"--serviceaccount={ns}:monitor")
    run_pod(cluster, ns, "target", ["sleep", "600"])
    wait(lambda: phase(cluster, ns, "target") == "Running")
    kc = cluster.token_kubeconfig(tmp_path / "mon", token)
    for env in ({}, {"KUBECTL_REMOTE_COMMAND_WEBSOCKETS": "false"}):
        p = cluster.kubectl("exec", "target", "-n", ns, "--", "id", kubeconfig=kc, env=env, check=False)
        assert p.returncode != 0 and "forbidden" in p.stderr.lower(), p.stderr
    ca = str(cluster.pki / "ca.crt")
    # straight to the kubelet with a GET upgrade is refused too (exec needs create on nodes/proxy)
    r = requests.get(kubelet_url(cluster, f"/exec/{ns}/target/c?command=id&output=1"), verify=ca, timeout=10,
                     headers={"Authorization": f"Bearer {token}", "Connection": "Upgrade", "Upgrade": "websocket",
                              "Sec-WebSocket-Version": "13", "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                              "Sec-WebSocket-Protocol": "v5.channel.k8s.io"})
    assert r.status_code == 403
    # ...and through the apiserver's node proxy, where the kubelet sees the apiserver's own identity: the
    # apiserver asks for create on nodes/proxy for any upgrade (and any streaming kubelet path)
    node = node_name(cluster)
    ws = {"Authorization": f"Bearer {token}", "Connection": "Upgrade", "Upgrade": "websocket",
          "Sec-WebSocket-Version": "13", "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
          "Sec-WebSocket-Protocol": "v5.channel.k8s.io"}
    for path in (f"/exec/{ns}/target/c?command=id&output=1", f"/attach/{ns}/target/c?output=1",
                 f"/run/{ns}/target/c?cmd=id", f"/portForward/{ns}/target"):
        r = requests.get(f"{cluster.url}/api/v1/nodes/{node}/proxy{path}", verify=ca, timeout=10, headers=ws)
        assert r.status_code == 403, (path, r.status_code, r.text)
        assert r.json()["kind"] == "Status" and "create" in r.json()["message"]
        r = requests.get(f"{cluster.url}/api/v1/nodes/{node}/proxy{path}", verify=ca, timeout=10,
                         headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 403, (path, r.status_code, r.text)
    # what get nodes/proxy is for still works
    r = requests.get(f"{cluster.url}/api/v1/nodes/{node}/proxy/healthz", verify=ca, timeout=10,
                     headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200 and r.text == "ok"
    cluster.kubectl("delete", "pod", "target", "-n", ns, "--wait=false")


# --- a rogue kubelet ----------------------------------------------------------------------------------------


class RogueKubelet:
    """An HTTPS server on a node's kubelet port with a certificate from a CA the apiserver does not trust."""

    def __init__(self, tmp: Path) -> None:
        ca = pki.new_ca("rogue-ca")
        pair = pki.issue(ca, common_name="system:node:rogue", organizations=["system:nodes"], server=True,
                         ips=["127.0.0.1"], dns_names=["rogue"])
        pki.save_pair(pair, tmp / "rogue.crt", tmp / "rogue.key")
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(tmp / "rogue.crt", tmp / "rogue.key")
        self.port = free_port()
        self.requests: list[bytes] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            data = await reader.read(4096)
            self.requests.append(data)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\n\r\nstolen logs\r\n")
            await writer.drain()
        except (OSError, ssl.SSLError):
            pass
        finally:
            writer.close()

    def __enter__(self) -> RogueKubelet:
        self.thread.start()
        fut = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, "127.0.0.1", self.port, ssl=self.ctx), self.loop)
        self.server = fut.result(5)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def rogue(tmp_path: Path) -> Iterator[RogueKubelet]:
    with RogueKubelet(tmp_path) as r:
        yield r


def test_rogue_kubelet_certificate_is_refused(cluster: Cluster, ns: str, rogue: RogueKubelet) -> None:
    admin = (str(cluster.pki / "admin.crt"), str(cluster.pki / "admin.key"))
    ca = str(cluster.pki / "ca.crt")
    node = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": f"rogue-{ns}"}}
    requests.post(cluster.url + "/api/v1/nodes", json=node, cert=admin, verify=ca, timeout=10)
    try:
        cur = requests.get(cluster.url + f"/api/v1/nodes/rogue-{ns}", cert=admin, verify=ca, timeout=10).json()
        cur["status"] = {"addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
                         "daemonEndpoints": {"kubeletEndpoint": {"Port": rogue.port}},
                         "conditions": [{"type": "Ready", "status": "False"}]}
        requests.put(cluster.url + f"/api/v1/nodes/rogue-{ns}/status", json=cur, cert=admin, verify=ca, timeout=10)
        body = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "victim"},
                "spec": {"nodeName": f"rogue-{ns}", "containers": [{"name": "c", "image": "x", "command": ["x"]}]}}
        cluster.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(body))
        p = cluster.kubectl("logs", "victim", "-n", ns, "--pod-running-timeout=2s", check=False)
        assert p.returncode != 0
        assert "certificate" in p.stderr and "stolen" not in p.stdout, p.stderr
        # nothing was sent to the rogue kubelet: the handshake failed before any request
        time.sleep(0.5)
        assert all(b"GET /containerLogs" not in r for r in rogue.requests)
        for env in ({}, {"KUBECTL_REMOTE_COMMAND_WEBSOCKETS": "false"}):
            p = cluster.kubectl("exec", "victim", "-n", ns, "--", "id", env=env, check=False)
            assert p.returncode != 0 and "certificate" in p.stderr, p.stderr
    finally:
        cluster.kubectl("delete", "pod", "victim", "-n", ns, "--grace-period=0", "--force", check=False)
        requests.delete(cluster.url + f"/api/v1/nodes/rogue-{ns}", cert=admin, verify=ca, timeout=10)


def test_node_cert_cannot_be_used_as_kubelet_client_for_other_paths(cluster: Cluster) -> None:
    # a node's own client certificate may not use another kubelet's API (no nodes/proxy for nodes)
    r = requests.get(kubelet_url(cluster, "/pods"), cert=node_cert(cluster), verify=str(cluster.pki / "ca.crt"),
                     timeout=10)
    assert r.status_code == 403


class RedirectingKubelet(RogueKubelet):
    """A kubelet with a valid (cluster-CA-signed) certificate that answers upgrades with a redirect."""

    def __init__(self, tmp: Path, cluster: Cluster, target_port: int) -> None:
        super().__init__(tmp)
        ca = pki.load_pair(cluster.pki / "ca.crt", cluster.pki / "ca.key")
        pair = pki.issue(ca, common_name="system:node:redirector", organizations=["system:nodes"], server=True,
                         ips=["127.0.0.1"])
        pki.save_pair(pair, tmp / "redir.crt", tmp / "redir.key")
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(tmp / "redir.crt", tmp / "redir.key")
        self.target_port = target_port

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            data = await reader.readuntil(b"\r\n\r\n")
            self.requests.append(data)
            writer.write(f"HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:{self.target_port}/steal\r\n"
                         "Content-Length: 0\r\n\r\n".encode())
            await writer.drain()
        except (OSError, ssl.SSLError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


def test_upgrade_redirects_from_a_kubelet_are_not_followed(cluster: Cluster, ns: str, tmp_path: Path) -> None:
    import socket

    bait = socket.socket()
    bait.bind(("127.0.0.1", 0))
    bait.listen(4)
    bait.settimeout(0.2)
    admin = (str(cluster.pki / "admin.crt"), str(cluster.pki / "admin.key"))
    ca = str(cluster.pki / "ca.crt")
    with RedirectingKubelet(tmp_path, cluster, bait.getsockname()[1]) as redir:
        name = f"redir-{ns}"[:60]
        requests.post(cluster.url + "/api/v1/nodes", json={"apiVersion": "v1", "kind": "Node",
                                                           "metadata": {"name": name}},
                      cert=admin, verify=ca, timeout=10)
        try:
            cur = requests.get(cluster.url + f"/api/v1/nodes/{name}", cert=admin, verify=ca, timeout=10).json()
            cur["status"] = {"addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
                             "daemonEndpoints": {"kubeletEndpoint": {"Port": redir.port}}}
            requests.put(cluster.url + f"/api/v1/nodes/{name}/status", json=cur, cert=admin, verify=ca, timeout=10)
            body = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "redirected"},
                    "spec": {"nodeName": name, "containers": [{"name": "c", "image": "x", "command": ["x"]}]}}
            cluster.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(body))
            for env in ({}, {"KUBECTL_REMOTE_COMMAND_WEBSOCKETS": "false"}):
                p = cluster.kubectl("exec", "redirected", "-n", ns, "--", "id", env=env, check=False)
                assert p.returncode != 0 and "redirect" in p.stderr, p.stderr
            assert any(b"/exec/" in r for r in redir.requests)  # the kubelet was reached, with a verified cert
            with pytest.raises(TimeoutError):
                bait.accept()  # ... and its Location was never followed
        finally:
            cluster.kubectl("delete", "pod", "redirected", "-n", ns, "--grace-period=0", "--force", check=False)
            requests.delete(cluster.url + f"/api/v1/nodes/{name}", cert=admin, verify=ca, timeout=10)
            bait.close()
