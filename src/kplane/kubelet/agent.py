"""The node agent: joins through TLS bootstrapping, registers its Node, keeps its Lease and status fresh, rotates
its certificates, and runs the pods bound to it.

Every call goes to the apiserver over HTTPS with the node's own identity (``system:node:<name>``); the agent never
touches the control plane's store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import platform
import socket
import ssl
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509

from kplane import __version__, pki
from kplane.aio import cancel_and_wait
from kplane.api import meta
from kplane.client import APIClient
from kplane.errors import StatusError
from kplane.kubelet import tlsbootstrap as tb

log = logging.getLogger(__name__)

LEASE_SECONDS = 40
RENEW_SECONDS = 10
CLIENT_USAGES = ["digital signature", "client auth"]
SERVING_USAGES = ["digital signature", "server auth"]


@dataclass
class NodeConfig:
    server: str
    data_dir: Path  # DIR/node/<name>
    name: str
    token: str | None = None
    ca_hash: str | None = None
    ca_file: Path | None = None  # trusted CA already known (kplane up); otherwise discovered with the token
    node_ip: str = "127.0.0.1"
    kubelet_port: int = 10250
    labels: dict[str, str] = field(default_factory=dict)
    client_cert_seconds: int | None = None  # requested lifetime of the client cert (None: the signer's default)
    max_pods: int = 110
    restart_backoff_s: float = 10.0
    discovery_timeout_s: float = 300.0
    pod_network: str = "auto"  # auto: a network namespace per pod when root; host: the host's network
    proxy_healthz_port: int = 10256  # kube-proxy health, on 127.0.0.1 only

    @property
    def pki_dir(self) -> Path:
        return self.data_dir / "pki"


class NodeAgent:
    def __init__(self, cfg: NodeConfig) -> None:
        self.cfg = cfg
        self.client: APIClient | None = None
        self.stop_event = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []
        self.ready = asyncio.Event()
        self.pods: Any = None  # PodManager
        self.net: Any = None  # PodNetwork
        self.node_uid = ""
        self.server: Any = None  # KubeletServer, started once the serving certificate is issued
        self.konnectivity: Any = None  # KonnectivityAgent when the cluster offers a konnectivity server
        self.kube_proxy: Any = None  # Proxier, when this node programs Service VIPs (root and nft/iptables)

    # --- credentials --------------------------------------------------------------------------------------

    @property
    def ca_path(self) -> Path:
        return self.cfg.pki_dir / "ca.crt"

    @property
    def client_pem(self) -> Path:
        return self.cfg.pki_dir / "kubelet-client-current.pem"

    @property
    def serving_pem(self) -> Path:
        return self.cfg.pki_dir / "kubelet-server-current.pem"

    async def ensure_credentials(self) -> None:
        cfg = self.cfg
        cfg.pki_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not self.ca_path.exists():
            if cfg.ca_file is not None:
                pki.atomic_write(self.ca_path, cfg.ca_file.read_bytes(), mode=0o644)
            else:
                if not cfg.token or not cfg.ca_hash:
                    raise tb.BootstrapError("a new node needs --token and --discovery-token-ca-cert-hash")
                ca_pem = await tb.discover_ca(cfg.server, cfg.token, cfg.ca_hash, timeout_s=cfg.discovery_timeout_s)
                pki.atomic_write(self.ca_path, ca_pem, mode=0o644)
        if cfg.ca_hash and pki.ca_cert_hash(x509.load_pem_x509_certificate(self.ca_path.read_bytes())) != cfg.ca_hash:
            raise tb.BootstrapError("the stored cluster CA does not match --discovery-token-ca-cert-hash")
        if tb.cert_valid(self.client_pem):
            return
        if not cfg.token:
            raise tb.BootstrapError("no valid client certificate and no bootstrap token to get one")
        boot = APIClient(cfg.server, ca_file=self.ca_path, token=cfg.token)
        try:
            key = tb.new_key()
            cert = await tb.request_certificate(boot, key, cfg.name, signer=tb.CLIENT_SIGNER, usages=CLIENT_USAGES,
                                                expiration_s=cfg.client_cert_seconds)
        finally:
            await boot.close()
        self._store_pem(self.client_pem, cert, key)
        log.info("node %s: client certificate issued through TLS bootstrap", cfg.name)

    def _store_pem(self, path: Path, cert_pem: bytes, key: Any) -> None:
        stamp = datetime.now(UTC).strftime("%Y-%m-%d-%H-%M-%S")
        target = path.with_name(path.name.replace("-current.pem", f"-{stamp}.pem"))
        pki.atomic_write(target, cert_pem + tb.key_pem(key), mode=0o600)
        tmp = path.with_suffix(".lnk")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        tmp.symlink_to(target.name)
        os.replace(tmp, path)

    def _node_client(self) -> APIClient:
        return APIClient(self.cfg.server, ca_file=self.ca_path, cert_file=self.client_pem, key_file=self.client_pem)

    # --- lifecycle ----------------------------------------------------------------------------------------

    async def start(self) -> None:
        await self.ensure_credentials()
        self.client = self._node_client()
        await self.register()
        from kplane.kubelet.podnet import PodNetwork
        from kplane.kubelet.pods import PodManager

        self.net = PodNetwork(self.cfg, lambda: self.client)
        await self.net.start()
        from kplane.proxy.proxier import start_for_agent

        self.kube_proxy = await start_for_agent(self)  # before pods: their env names the kubernetes VIP
        self.pods = PodManager(self)
        await self.pods.start()
        self.tasks = [
            asyncio.create_task(self._heartbeat()),
            asyncio.create_task(self._rotate_client()),
            asyncio.create_task(self._serving_cert()),
        ]
        await self._start_konnectivity()

    async def stop(self) -> None:
        """Stop the agent; containers keep running (a restarted agent adopts them)."""
        self.stop_event.set()
        await cancel_and_wait(self.tasks)
        if self.konnectivity is not None:
            with contextlib.suppress(Exception):
                await self.konnectivity.stop()
        if self.kube_proxy is not None:
            await self.kube_proxy.stop()  # its Service VIPs go with it
        if self.server is not None:
            await self.server.stop()
        if self.pods is not None:
            await self.pods.stop()
        if self.net is not None:
            await self.net.stop()  # the pods' network stays with them
        if self.client is not None:
            await self.client.close()

    async def _start_konnectivity(self) -> None:
        """When the cluster runs a konnectivity server (kube-public/kplane-konnectivity names it), dial out to it
        and keep the connection: the control plane reaches this node's kubelet, pods and ports through it, so a
        node behind NAT still gets logs, exec and port-forward. Identity: the node's client certificate; declared
        addresses: the node's own and its podCIDRs (the server checks them against the Node object)."""
        from kplane.tunnel.agent import KonnectivityAgent

        assert self.client is not None
        try:
            cm = await self.client.get("/api/v1/namespaces/kube-public/configmaps/kplane-konnectivity")
        except StatusError as err:
            if err.code not in (403, 404):
                log.warning("node %s: cannot read the konnectivity settings: %s", self.cfg.name, err.message)
            return
        servers = [s.strip() for s in str((cm.get("data") or {}).get("servers", "")).split(",") if s.strip()]
        if not servers:
            return
        cidrs: list[str] = []
        for _ in range(50):  # the podCIDR arrives from node IPAM shortly after registration
            node = await self.client.get(f"/api/v1/nodes/{self.cfg.name}")
            cidrs = [str(c) for c in (node.get("spec") or {}).get("podCIDRs") or []]
            if cidrs or self.cfg.pod_network == "host":
                break
            await asyncio.sleep(0.1)
        ids = "&".join([f"ipv4={self.cfg.node_ip}", *(f"cidr={c}" for c in cidrs)])
        self.konnectivity = KonnectivityAgent(servers, ca_file=self.ca_path, cert_file=self.client_pem,
                                              key_file=self.client_pem, agent_id=self.cfg.name, identifiers=ids)
        await self.konnectivity.start()
        log.info("node %s: konnectivity agent dialling out to %s (serving %s)", self.cfg.name, ", ".join(servers),
                 ids)

    # --- node object, status, lease ----------------------------------------------------------------------

    def addresses(self) -> list[dict[str, str]]:
        return [{"type": "InternalIP", "address": self.cfg.node_ip}, {"type": "Hostname", "address": self.cfg.name}]

    def node_status(self, ready: bool = True, message: str = "kubelet is posting ready status") -> dict[str, Any]:
        now = meta.now_rfc3339()
        cpu = str(os.cpu_count() or 1)
        try:
            mem_kib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 1024
        except (ValueError, OSError):
            mem_kib = 1024 * 1024
        resources = {"cpu": cpu, "memory": f"{mem_kib}Ki", "pods": str(self.cfg.max_pods),
                     "ephemeral-storage": "10Gi"}

        def cond(t: str, status: str, reason: str, msg: str) -> dict[str, str]:
            return {"type": t, "status": status, "lastHeartbeatTime": now, "lastTransitionTime": now,
                    "reason": reason, "message": msg}

        uname = platform.uname()
        return {
            "capacity": resources,
            "allocatable": resources,
            "conditions": [
                cond("MemoryPressure", "False", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
                cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
                cond("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
                cond("Ready", "True" if ready else "False", "KubeletReady" if ready else "KubeletNotReady", message),
            ],
            "addresses": self.addresses(),
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self.cfg.kubelet_port}},
            "nodeInfo": {
                "machineID": _machine_id(), "systemUUID": _machine_id(), "bootID": _boot_id(),
                "kernelVersion": uname.release, "osImage": _os_image(), "containerRuntimeVersion":
                f"kplane-process://{__version__}", "kubeletVersion": f"v1.37.0-kplane.{__version__}",
                "kubeProxyVersion": "", "operatingSystem": "linux", "architecture": _arch(),
            },
        }

    async def register(self) -> None:
        assert self.client is not None
        name = self.cfg.name
        labels = {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "kubernetes.io/arch": _arch(),
                  **self.cfg.labels}
        # created with its status, as the kubelet does: a Node never exists without one
        body = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels}, "spec": {},
                "status": self.node_status()}
        try:
            node = await self.client.create("/api/v1/nodes", body)
        except StatusError as err:
            if err.code != 409:
                raise
            node = await self.client.get(f"/api/v1/nodes/{name}")
            self.node_uid = node["metadata"]["uid"]
            await self.post_status(node)  # an existing Node (a restart): refresh its status
            return
        self.node_uid = node["metadata"]["uid"]
        self.ready.set()

    async def post_status(self, node: dict[str, Any] | None = None) -> None:
        assert self.client is not None
        for _ in range(5):
            if node is None:
                node = await self.client.get(f"/api/v1/nodes/{self.cfg.name}")
            old = {c["type"]: c for c in (node.get("status") or {}).get("conditions") or []}
            status = self.node_status()
            for c in status["conditions"]:
                prev = old.get(c["type"])
                if prev and prev.get("status") == c["status"]:
                    c["lastTransitionTime"] = prev.get("lastTransitionTime", c["lastTransitionTime"])
            ours = {c["type"] for c in status["conditions"]}  # others' (NetworkUnavailable: node IPAM) are kept
            status["conditions"] += [c for t, c in old.items() if t not in ours]
            node["status"] = {**(node.get("status") or {}), **status}
            try:
                await self.client.update(f"/api/v1/nodes/{self.cfg.name}/status", node)
                self.ready.set()
                return
            except StatusError as err:
                if err.code != 409:
                    raise
                node = None
        raise StatusError(409, "could not update node status after 5 conflicts")

    async def renew_lease(self) -> None:
        assert self.client is not None
        name = self.cfg.name
        path = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{name}"
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        try:
            lease = await self.client.get(path)
        except StatusError as err:
            if err.code != 404:
                raise
            await self.client.create("/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases", {
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": name, "ownerReferences": [
                    {"apiVersion": "v1", "kind": "Node", "name": name, "uid": self.node_uid}]},
                "spec": {"holderIdentity": name, "leaseDurationSeconds": LEASE_SECONDS, "renewTime": now},
            })
            return
        lease.setdefault("spec", {}).update({"holderIdentity": name, "leaseDurationSeconds": LEASE_SECONDS,
                                             "renewTime": now})
        await self.client.update(path, lease)

    async def _heartbeat(self) -> None:
        while not self.stop_event.is_set():
            try:
                await self.renew_lease()
                await self.post_status()
            except (TimeoutError, StatusError, OSError, ssl.SSLError) as exc:
                log.warning("node %s: heartbeat failed: %s", self.cfg.name, exc)
            except Exception:
                log.exception("node %s: heartbeat failed", self.cfg.name)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop_event.wait(), RENEW_SECONDS)

    # --- certificate rotation ----------------------------------------------------------------------------

    async def _rotate_client(self) -> None:
        while not self.stop_event.is_set():
            cert = x509.load_pem_x509_certificate(self.client_pem.read_bytes())
            wait = (tb.rotation_deadline(cert) - datetime.now(UTC)).total_seconds()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop_event.wait(), max(wait, 0.0))
                return
            try:
                await self.rotate_client_now()
            except Exception as exc:
                log.warning("node %s: client certificate rotation failed, retrying: %s", self.cfg.name, exc)
                await asyncio.sleep(2)

    async def rotate_client_now(self) -> None:
        """A new client certificate requested with the current one (the selfnodeclient path)."""
        assert self.client is not None
        key = tb.new_key()
        cert = await tb.request_certificate(self.client, key, self.cfg.name, signer=tb.CLIENT_SIGNER,
                                            usages=CLIENT_USAGES, expiration_s=self.cfg.client_cert_seconds)
        self._store_pem(self.client_pem, cert, key)
        old = self.client
        self.client = self._node_client()
        if self.pods is not None:
            self.pods.client = self.client
        await old.close()
        log.info("node %s: client certificate rotated", self.cfg.name)

    async def _serve(self) -> None:
        """Start the kubelet's HTTPS server, or load a rotated serving certificate into it."""
        from kplane.kubelet.server import KubeletServer

        if self.server is None:
            self.server = KubeletServer(self)
            await self.server.start()
        else:
            self.server.reload_certificate()

    async def _serving_cert(self) -> None:
        """Request a kubelet-serving certificate for the node's own addresses (used by the kubelet server)."""
        while not self.stop_event.is_set():
            if tb.cert_valid(self.serving_pem):
                await self._serve()
                cert = x509.load_pem_x509_certificate(self.serving_pem.read_bytes())
                wait = (tb.rotation_deadline(cert) - datetime.now(UTC)).total_seconds()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop_event.wait(), max(wait, 0.0))
                    return
            assert self.client is not None
            try:
                key = tb.new_key()
                cert_pem = await tb.request_certificate(self.client, key, self.cfg.name, signer=tb.SERVING_SIGNER,
                                                        usages=SERVING_USAGES, dns=[self.cfg.name],
                                                        ips=[self.cfg.node_ip], timeout_s=600)
                self._store_pem(self.serving_pem, cert_pem, key)
            except Exception as exc:
                log.warning("node %s: serving certificate not issued: %s", self.cfg.name, exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop_event.wait(), 30)


def _arch() -> str:
    m = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(m, m)


def _machine_id() -> str:
    for p in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        with contextlib.suppress(OSError):
            return Path(p).read_text().strip()
    return socket.gethostname()


def _boot_id() -> str:
    with contextlib.suppress(OSError):
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    return ""


def _os_image() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    return "Linux"
