"""Assemble and run the control plane: PKI, store, bootstrap objects, the HTTPS apiserver and the controllers."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from kplane import pki
from kplane.api import meta
from kplane.apiserver.authn import Authenticator
from kplane.apiserver.authz import Authorizer
from kplane.apiserver.policy import bootstrap_objects
from kplane.apiserver.server import APIServer, ServerOptions
from kplane.client import APIClient
from kplane.controllers.bootstrap import BootstrapSigner, TokenCleaner
from kplane.controllers.certificates import CSRApprover, CSRSigner
from kplane.controllers.core import NamespaceControllers
from kplane.controllers.endpoints import EndpointsController
from kplane.controllers.nodeipam import CIDRSet, NodeIPAM
from kplane.controllers.nodelifecycle import NodeLifecycle
from kplane.controllers.scheduler import Scheduler
from kplane.storage.base import KeyExists, KeyNotFound, Store
from kplane.storage.sqlite import SQLiteStore

log = logging.getLogger(__name__)

SYSTEM_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")


@dataclass
class Config:
    data_dir: Path
    port: int = 6443
    bind_address: str = "0.0.0.0"
    advertise_address: str = "127.0.0.1"
    extra_sans: list[str] = field(default_factory=list)
    anonymous: bool = True
    token_file: Path | None = None
    kubelet_ca: Path | None = None  # default: the cluster CA (kubelet serving certs are signed by it)
    kubelet_insecure_tls: bool = False
    service_cidr: str = "10.96.0.0/12"  # Services' ClusterIPs; the first address is the kubernetes Service
    cluster_cidr: str = "10.244.0.0/16"  # node IPAM carves each node's podCIDR from it
    node_cidr_mask_size: int = 24

    @property
    def pki_dir(self) -> Path:
        return self.data_dir / "pki"

    @property
    def url(self) -> str:
        return f"https://{self.advertise_address}:{self.port}"


def prepare_pki(cfg: Config) -> None:
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    cfg.data_dir.chmod(0o700)
    # pods reach the apiserver as https://<first address of the service range> (the kubernetes Service)
    kubernetes_vip = str(ipaddress.ip_network(cfg.service_cidr, strict=True).network_address + 1)
    ips = sorted({"127.0.0.1", cfg.advertise_address, kubernetes_vip, *[s for s in cfg.extra_sans if _is_ip(s)]})
    dns = sorted({socket.gethostname(), *[s for s in cfg.extra_sans if not _is_ip(s)]})
    pki.ensure_pki(cfg.pki_dir, sans_dns=dns, sans_ips=ips)
    ca_pem = (cfg.pki_dir / "ca.crt").read_bytes()
    pki.write_kubeconfig(cfg.data_dir / "admin.kubeconfig", server=cfg.url, ca_pem=ca_pem,
                         cert_pem=(cfg.pki_dir / "admin.crt").read_bytes(),
                         key_pem=(cfg.pki_dir / "admin.key").read_bytes())


def _is_ip(s: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in s else socket.AF_INET, s)
        return True
    except OSError:
        return False


async def bootstrap(store: Store) -> None:
    """Objects the apiserver itself keeps: system namespaces and the default RBAC policy."""
    for ns in SYSTEM_NAMESPACES:
        key = f"/registry/core/namespaces/{ns}"
        try:
            await store.get(key)
        except KeyNotFound:
            obj: dict[str, Any] = {"apiVersion": "v1", "kind": "Namespace",
                   "metadata": {"name": ns, "uid": str(uuid.uuid4()), "creationTimestamp": meta.now_rfc3339(),
                                "labels": {"kubernetes.io/metadata.name": ns}},
                   "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}}
            with contextlib.suppress(KeyExists):
                await store.create(key, obj)
    for obj in [*bootstrap_objects(), *_cluster_info_rbac()]:
        plural = {"ClusterRole": "clusterroles", "ClusterRoleBinding": "clusterrolebindings", "Role": "roles",
                  "RoleBinding": "rolebindings"}[obj["kind"]]
        ns = obj["metadata"].get("namespace")
        key = f"/registry/rbac.authorization.k8s.io/{plural}/" + (f"{ns}/" if ns else "") + obj["metadata"]["name"]
        try:
            cur = await store.get(key)
        except KeyNotFound:
            obj["metadata"]["uid"] = str(uuid.uuid4())
            obj["metadata"]["creationTimestamp"] = meta.now_rfc3339()
            with contextlib.suppress(KeyExists):
                await store.create(key, obj)
            continue
        ann = cur.get("metadata", {}).get("annotations") or {}
        if ann.get("rbac.authorization.kubernetes.io/autoupdate") == "false":
            continue
        changed = False
        for f in ("rules", "roleRef", "subjects", "aggregationRule"):
            if f in obj and cur.get(f) != obj[f]:
                cur[f] = obj[f]
                changed = True
        if changed:
            await store.update(key, cur)


def _cluster_info_rbac() -> list[dict[str, Any]]:
    """Discovery for joining nodes: anonymous may get exactly kube-public/cluster-info (as kubeadm sets up)."""
    name = "kplane:bootstrap-signer-clusterinfo"
    meta_ = {"name": name, "namespace": "kube-public"}
    return [
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": dict(meta_),
         "rules": [{"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["cluster-info"],
                    "verbs": ["get"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": dict(meta_),
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
         "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "system:anonymous"}]},
    ]


class ControlPlane:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.store: Store | None = None
        self.server: APIServer | None = None
        self.runner: web.AppRunner | None = None
        self.controllers: list[Any] = []
        self.client: APIClient | None = None
        self.scheduler_client: APIClient | None = None
        self.kubernetes_service: Any = None

    async def start(self) -> None:
        cfg = self.cfg
        CIDRSet(cfg.cluster_cidr, cfg.node_cidr_mask_size)  # a bad --cluster-cidr or --node-cidr-mask-size fails first
        prepare_pki(cfg)
        self.store = await SQLiteStore.open(str(cfg.data_dir / "state.db"))
        await bootstrap(self.store)
        sa_key = pki.load_private_key(cfg.pki_dir / "sa.key")
        opts = ServerOptions(advertise_address=cfg.advertise_address, port=cfg.port)
        sa_tokens = pki.ServiceAccountTokens(sa_key, issuer=opts.issuer, api_audiences=list(opts.api_audiences))
        authn = Authenticator(store=self.store, sa_tokens=sa_tokens, api_audiences=list(opts.api_audiences),
                              token_file=cfg.token_file, anonymous=cfg.anonymous)
        authz = Authorizer(self.store)
        await authz.rbac.start()
        ca_pem = (cfg.pki_dir / "ca.crt").read_bytes()
        self.server = APIServer(store=self.store, authn=authn, authz=authz, sa_tokens=sa_tokens, ca_pem=ca_pem,
                                options=opts)
        from kplane.apiserver.kubelet import KubeletConnector

        self.server.kubelets = KubeletConnector(
            client_cert=cfg.pki_dir / "apiserver-kubelet-client.crt",
            client_key=cfg.pki_dir / "apiserver-kubelet-client.key",
            ca_file=None if cfg.kubelet_insecure_tls else (cfg.kubelet_ca or cfg.pki_dir / "ca.crt"))
        from kplane.apiserver.services import KubernetesServiceReconciler, ServiceIPAM

        self.server.ipam = ServiceIPAM(self.store, cfg.service_cidr)
        await self.server.ipam.repair()
        self.runner = web.AppRunner(self.server.make_app(), access_log=None, handle_signals=False,
                                    shutdown_timeout=2.0)
        await self.runner.setup()
        site = web.TCPSite(self.runner, cfg.bind_address, cfg.port, ssl_context=APIServer.ssl_context(cfg.pki_dir),
                           reuse_address=True)
        await site.start()
        log.info("apiserver listening on https://%s:%d", cfg.bind_address, cfg.port)
        self.client = APIClient(f"https://127.0.0.1:{cfg.port}", ca_file=cfg.pki_dir / "ca.crt",
                                cert_file=cfg.pki_dir / "controller-manager.crt",
                                key_file=cfg.pki_dir / "controller-manager.key")
        self.scheduler_client = APIClient(f"https://127.0.0.1:{cfg.port}", ca_file=cfg.pki_dir / "ca.crt",
                                          cert_file=cfg.pki_dir / "scheduler.crt",
                                          key_file=cfg.pki_dir / "scheduler.key")
        self.kubernetes_service = KubernetesServiceReconciler(self.server, cfg.advertise_address, cfg.port)
        self.kubernetes_service.start()
        ca = pki.load_pair(cfg.pki_dir / "ca.crt", cfg.pki_dir / "ca.key")
        self.controllers = [
            NamespaceControllers(self.client, ca_pem),
            BootstrapSigner(self.client, server=cfg.url, ca_pem=ca_pem),
            TokenCleaner(self.client),
            CSRApprover(self.client),
            CSRSigner(self.client, ca),
            NodeLifecycle(self.client),
            NodeIPAM(self.client, cfg.cluster_cidr, cfg.node_cidr_mask_size),
            EndpointsController(self.client),
            Scheduler(self.scheduler_client),
        ]
        for c in self.controllers:
            c.start()

    async def stop(self) -> None:
        if self.kubernetes_service is not None:
            await self.kubernetes_service.stop()
        for c in reversed(self.controllers):
            with contextlib.suppress(Exception):
                await c.close()
        for cl in (self.client, self.scheduler_client):
            if cl:
                await cl.close()
        if self.server:
            await self.server.close()
            await self.server.authz.rbac.stop()
        if self.runner:
            await self.runner.cleanup()
        if self.store:
            await self.store.close()


async def run_forever(cfg: Config, stop: asyncio.Event, *, node: dict[str, Any] | None = None) -> None:
    cp = ControlPlane(cfg)
    await cp.start()
    print(f"kplane: apiserver ready at {cfg.url}", flush=True)
    agent = None
    try:
        if node is not None:
            agent = await join_local_node(cfg, node, stop)
        print(f"kplane: export KUBECONFIG={cfg.data_dir / 'admin.kubeconfig'}", flush=True)
        await stop.wait()
    finally:
        if agent is not None:
            await agent.stop()
        await cp.stop()
        print("kplane: stopped", flush=True)


async def join_local_node(cfg: Config, node: dict[str, Any], stop: asyncio.Event) -> Any:
    """Join one node the way any node joins: a bootstrap token, discovery pinned by the CA hash, TLS bootstrap,
    all over HTTPS. A node that already has a valid certificate reuses it."""
    from cryptography import x509

    from kplane import bootstraptoken
    from kplane.kubelet.agent import NodeAgent, NodeConfig

    name = node["name"]
    node_dir = cfg.data_dir / "node" / name
    token = None
    if not (node_dir / "pki" / "kubelet-client-current.pem").exists():
        token = bootstraptoken.generate()
        admin = APIClient(f"https://127.0.0.1:{cfg.port}", ca_file=cfg.pki_dir / "ca.crt",
                          cert_file=cfg.pki_dir / "admin.crt", key_file=cfg.pki_dir / "admin.key")
        try:
            await admin.create("/api/v1/namespaces/kube-system/secrets", bootstraptoken.secret_for(
                token, ttl_s=3600, description=f"kplane up: join of node {name}",
                groups=["system:bootstrappers:kplane:default-node-token"]))
        finally:
            await admin.close()
        print(f"kplane: node {name}: bootstrap token created, joining", flush=True)
    ca_hash = pki.ca_cert_hash(x509.load_pem_x509_certificate((cfg.pki_dir / "ca.crt").read_bytes()))
    agent = NodeAgent(NodeConfig(server=f"https://127.0.0.1:{cfg.port}", data_dir=node_dir, name=name, token=token,
                                 ca_hash=ca_hash, node_ip=node.get("node_ip", "127.0.0.1"),
                                 kubelet_port=int(node.get("kubelet_port", 10250)),
                                 restart_backoff_s=float(node.get("restart_backoff_s", 10.0)),
                                 pod_network=str(node.get("pod_network", "auto")),
                                 proxy_healthz_port=int(node.get("proxy_healthz_port", 10256))))
    await agent.start()
    print(f"kplane: node {name}: registered with a certificate from TLS bootstrap", flush=True)
    await agent.ready.wait()
    print(f"kplane: node {name} Ready", flush=True)
    return agent
