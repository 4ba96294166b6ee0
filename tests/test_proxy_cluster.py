"""The kube-proxy inside the node agent of a real ``kplane up``: a Service with an explicit ClusterIP and a
hand-made EndpointSlice pointing at servers this test runs on the host; the VIP is reached from the host."""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from kplane import pki
from kplane.client import APIClient
from kplane.proxy.model import table_name
from kplane.proxy.proxier import NftBackend, Proxier
from tests.cluster import Cluster, free_port

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="the in-agent kube-proxy needs root"),
    pytest.mark.skipif(shutil.which("nft") is None, reason="needs nft (nftables)"),
]


def serve(name: str) -> tuple[ThreadingHTTPServer, int]:
    class H(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = f"{name}\n".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    srv = ThreadingHTTPServer(("0.0.0.0", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, srv.server_address[1]


@pytest.fixture
def servers() -> Iterator[dict[str, int]]:
    started = [serve("one"), serve("two")]
    yield {"one": started[0][1], "two": started[1][1]}
    for srv, _ in started:
        srv.shutdown()
        srv.server_close()


def get(ip: str, port: int) -> str:
    with socket.create_connection((ip, port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    return data.split(b"\r\n\r\n", 1)[1].decode().strip()


def eventually(check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def answers(ip: str, port: int, name: str) -> bool:
    try:
        return get(ip, port) == name
    except OSError:
        return False


def refused(ip: str, port: int) -> bool:
    try:
        socket.create_connection((ip, port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    return False


def node_facts(cluster: Cluster) -> tuple[str, str, str]:
    """The name, InternalIP and proxy table of the cluster's own node (other tests register fake Nodes too)."""
    name = next(cluster.data_dir.glob("node/*/pki")).parent.name
    node = json.loads(cluster.kubectl("get", "node", name, "-o", "json").stdout)
    ip = next(a["address"] for a in node["status"]["addresses"] if a["type"] == "InternalIP")
    ca = x509.load_pem_x509_certificate((cluster.pki / "ca.crt").read_bytes())
    return node["metadata"]["name"], ip, table_name(node["metadata"]["name"], pki.ca_cert_hash(ca))


def nft_table(table: str) -> str:
    p = subprocess.run(["nft", "list", "table", "ip", table], capture_output=True, text=True, timeout=30)
    return p.stdout if p.returncode == 0 else ""


def create_service(cluster: Cluster, ns: str, name: str) -> str:
    """A selector-less Service with an explicit ClusterIP from the cluster's service CIDR (retrying on the rare
    address somebody else holds)."""
    net = IPv4Network(cluster.service_cidr)
    for _ in range(20):
        vip = str(net[random.randrange(16, net.num_addresses - 16)])
        svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns},
               "spec": {"clusterIP": vip, "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}}
        p = cluster.kubectl("create", "-f", "-", input=json.dumps(svc), check=False)
        if p.returncode == 0:
            return vip
        assert "already allocated" in p.stderr or "provided IP is already" in p.stderr, p.stderr
    raise AssertionError("no free ClusterIP")


def put_slice(cluster: Cluster, ns: str, service: str, ip: str, port: int, *, ready: bool = True) -> None:
    sl = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
          "metadata": {"name": f"{service}-manual", "namespace": ns,
                       "labels": {"kubernetes.io/service-name": service}},
          "addressType": "IPv4", "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
          "endpoints": [{"addresses": [ip], "conditions": {"ready": ready}}]}
    cluster.kubectl("apply", "-f", "-", input=json.dumps(sl))


def test_in_agent_proxier_programs_service_vips(cluster: Cluster, ns: str, servers: dict[str, int]) -> None:
    _, node_ip, table = node_facts(cluster)
    vip = create_service(cluster, ns, "web")
    eventually(lambda: refused(vip, 80), "the VIP without endpoints to be refused")
    assert vip in nft_table(table)

    put_slice(cluster, ns, "web", node_ip, servers["one"])
    eventually(lambda: answers(vip, 80, "one"), "the VIP to reach server one")

    put_slice(cluster, ns, "web", node_ip, servers["two"])
    eventually(lambda: answers(vip, 80, "two"), "the VIP to follow the endpoint change")
    assert {get(vip, 80) for _ in range(5)} == {"two"}

    put_slice(cluster, ns, "web", node_ip, servers["one"], ready=False)
    eventually(lambda: refused(vip, 80), "a not-ready endpoint to leave the VIP")

    put_slice(cluster, ns, "web", node_ip, servers["one"])
    eventually(lambda: answers(vip, 80, "one"), "the endpoint to come back")

    cluster.kubectl("delete", "service", "-n", ns, "web", "--wait=true")
    eventually(lambda: vip not in nft_table(table), "the deleted Service to leave the node's table")
    assert nft_table(table), "the table itself stays while the agent runs"


def udp_serve(name: str) -> tuple[socket.socket, int]:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", 0))

    def loop() -> None:
        while True:
            try:
                _, addr = s.recvfrom(2048)
                if addr is None:  # the socket was shut while this thread waited on it
                    return
                s.sendto(name.encode(), addr)
            except OSError:
                return

    threading.Thread(target=loop, daemon=True).start()
    return s, s.getsockname()[1]


def test_udp_service_flow_moves_with_its_endpoint(cluster: Cluster, ns: str) -> None:
    _, node_ip, _ = node_facts(cluster)
    (one, p1), (two, p2) = udp_serve("one"), udp_serve("two")
    try:
        net = IPv4Network(cluster.service_cidr)
        vip = str(net[random.randrange(16, net.num_addresses - 16)])
        body = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "dns", "namespace": ns},
                "spec": {"clusterIP": vip, "ports": [{"name": "dns", "port": 53, "protocol": "UDP"}]}}
        cluster.kubectl("create", "-f", "-", input=json.dumps(body))

        def slice_to(port: int) -> None:
            sl = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                  "metadata": {"name": "dns-manual", "namespace": ns, "labels": {"kubernetes.io/service-name": "dns"}},
                  "addressType": "IPv4", "ports": [{"name": "dns", "port": port, "protocol": "UDP"}],
                  "endpoints": [{"addresses": [node_ip]}]}
            cluster.kubectl("apply", "-f", "-", input=json.dumps(sl))

        slice_to(p1)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:  # one socket, one conntrack entry
            c.settimeout(1)
            c.connect((vip, 53))

            def ask() -> str:
                try:
                    c.send(b"?")
                    return c.recv(100).decode()
                except OSError:
                    return ""

            eventually(lambda: ask() == "one", "the UDP VIP to answer")
            slice_to(p2)
            # without the proxier deleting the entry, this socket would stay with "one"
            eventually(lambda: ask() == "two", "the same UDP flow to follow the endpoint")
    finally:
        one.close()
        two.close()


def test_proxier_health_on_localhost_only(cluster: Cluster) -> None:
    _, node_ip, _ = node_facts(cluster)
    port = cluster.proxy_healthz_port
    for path in ("/healthz", "/livez"):
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
                    doc = json.loads(r.read())
                    assert r.status == 200 and doc["healthy"] is True and doc["lastUpdated"]
                    break
            except urllib.error.HTTPError as err:  # 503 until the first sync
                assert err.code == 503 and time.monotonic() < deadline
                time.sleep(0.2)
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)
    assert e.value.code == 404
    req = urllib.request.Request(f"http://127.0.0.1:{port}/healthz", data=b"x" * 10, method="POST")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=5)
    assert e.value.code == 405
    for junk in (b"\x00\x01garbage\r\n\r\n", b"GET /healthz HTTP/1.1\r\nX: " + b"a" * 100_000 + b"\r\n\r\n"):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:  # a 400, not a crash or a hang
            s.sendall(junk)
            assert s.recv(100).split(b" ")[1] == b"400"
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
        assert r.status == 200
    if node_ip != "127.0.0.1":
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((node_ip, port), timeout=5)


POD_SERVER = r"""
import os, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"{os.environ['NAME']} {self.client_address[0]}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
ThreadingHTTPServer(("0.0.0.0", 8080), H).serve_forever()
"""

POD_CLIENT = r"""
import sys, urllib.request
print(urllib.request.urlopen(f"http://{sys.argv[1]}:80/", timeout=5).read().decode().strip())
"""


def test_pod_behind_a_vip_reached_from_the_host_and_from_itself(cluster: Cluster, ns: str) -> None:
    body = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "srv"},
            "spec": {"containers": [{"name": "c", "image": "none", "command": [sys.executable, "-c", POD_SERVER],
                                     "env": [{"name": "NAME", "value": "srv"}]}]}}
    cluster.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(body))

    def pod_ip() -> str:
        st = json.loads(cluster.kubectl("get", "pod", "srv", "-n", ns, "-o", "json").stdout)["status"]
        return str(st.get("podIP") or "") if st.get("phase") == "Running" else ""

    eventually(lambda: bool(pod_ip()), "the pod to run with an IP")
    ip = pod_ip()
    _, node_ip, _ = node_facts(cluster)
    if ip == node_ip:
        pytest.skip("pods share the host network here (no pod network)")
    vip = create_service(cluster, ns, "srv")
    put_slice(cluster, ns, "srv", ip, 8080)
    eventually(lambda: answers_prefix(vip, 80, "srv "), "the VIP to reach the pod")

    # the pod reaches itself through its own Service: the hairpin case. With bridge-nf-call-iptables on, the
    # DNATed frame is bridged back out of the port it came in on, which needs hairpin mode on that port (the
    # pod network's job, as the kubelet's hairpin-veth mode does upstream).
    if bridge_netfilter() and not hairpin_mode(pod_uid(cluster, ns, "srv")):
        pytest.xfail("the pod's bridge port has no hairpin mode (pod network), so a pod cannot reach itself "
                     "through a VIP while bridge-nf-call-iptables is on")
    p = cluster.kubectl("exec", "-n", ns, "srv", "--", sys.executable, "-c", POD_CLIENT, vip, check=False)
    assert p.returncode == 0, p.stderr
    name, client = p.stdout.split()
    assert name == "srv" and client != ip  # masqueraded: its own address would come back as a martian


def answers_prefix(ip: str, port: int, prefix: str) -> bool:
    try:
        return get(ip, port).startswith(prefix)
    except OSError:
        return False


def pod_uid(cluster: Cluster, ns: str, name: str) -> str:
    return str(json.loads(cluster.kubectl("get", "pod", name, "-n", ns, "-o", "json").stdout)["metadata"]["uid"])


def bridge_netfilter() -> bool:
    p = Path("/proc/sys/net/bridge/bridge-nf-call-iptables")
    return p.exists() and p.read_text().strip() == "1"


def hairpin_mode(uid: str) -> bool:
    """Whether the host end of the pod's veth (the link whose peer is in the pod's namespace) has hairpin on."""
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, timeout=30).stdout
    m = re.search(rf"^\d+: ([^@:]+)@[^:]+:.*link-netns \S*{re.escape(uid)}\b", links, re.M)
    assert m, f"no veth for pod {uid}"
    return Path(f"/sys/class/net/{m.group(1)}/brport/hairpin_mode").read_text().strip() == "1"


def health(port: int) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())
    except OSError:
        return 0, {}


def run(*argv: str) -> None:
    subprocess.run(list(argv), check=True, capture_output=True, timeout=30)


async def until(check: Callable[[], bool], what: str, limit: float = 30.0) -> None:
    deadline = time.monotonic() + limit
    while not await asyncio.to_thread(check):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


async def test_proxier_fails_visibly_recovers_and_restores_a_deleted_table(cluster: Cluster, ns: str) -> None:
    """A Proxier with the admin's client and its rules in a namespace that does not exist yet: syncs fail (503
    with the reason), succeed once it exists, follow a new Service, and put back a table someone deleted."""
    scratch = f"kpx-{uuid.uuid4().hex[:6]}-late"
    table = f"kplane-proxy-{uuid.uuid4().hex[:8]}"
    client = APIClient(cluster.url, ca_file=cluster.pki / "ca.crt", cert_file=cluster.pki / "admin.crt",
                       key_file=cluster.pki / "admin.key")
    port = free_port()
    proxier = Proxier(lambda: client, NftBackend(table, wrap=["ip", "netns", "exec", scratch]), node_name="test",
                      healthz_port=port, sync_period=1.0, retry_interval=0.2)

    def listed() -> str:
        p = subprocess.run(["ip", "netns", "exec", scratch, "nft", "list", "table", "ip", table],
                           capture_output=True, text=True, timeout=30)
        return p.stdout if p.returncode == 0 else ""

    await proxier.start()
    try:
        await until(lambda: health(port)[0] == 503 and "last sync failed" in health(port)[1].get("reason", ""),
                    "a failed sync to show in /healthz")
        await asyncio.to_thread(run, "ip", "netns", "add", scratch)
        await until(lambda: health(port)[0] == 200, "the proxier to recover")
        vip = await asyncio.to_thread(create_service, cluster, ns, "late")
        await until(lambda: vip in listed(), "the new Service in the table")
        await asyncio.to_thread(run, "ip", "netns", "exec", scratch, "nft", "delete", "table", "ip", table)
        await until(lambda: vip in listed(), "the periodic sync to restore the deleted table")
    finally:
        await proxier.stop()
        await client.close()
        await asyncio.to_thread(subprocess.run, ["ip", "netns", "del", scratch], capture_output=True, timeout=30)
    assert (await asyncio.to_thread(health, port))[0] == 0  # the health endpoint is gone with the proxier
