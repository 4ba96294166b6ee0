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
from kplane.aio import cancel_and_wait, freeze_startup_heap
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
from kplane.errors import StatusError
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
    egress: str | None = None  # --egress direct|ssh|konnectivity (None: direct, or the config file's)
    egress_config_file: Path | None = None
    ssh_user: str | None = None
    ssh_keyfile: Path | None = None
    ssh_known_hosts: Path | None = None
    ssh_port: int = 22
    konnectivity_agent_port: int = 8132
    konnectivity_health_port: int | None = 8134

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


KONNECTIVITY_INFO = "kplane-konnectivity"  # kube-public ConfigMap: where nodes' konnectivity agents dial


def _cluster_info_rbac() -> list[dict[str, Any]]:
    """Discovery for joining nodes: anonymous may get exactly kube-public/cluster-info (as kubeadm sets up); nodes
    may get kube-public/kplane-konnectivity (the konnectivity servers to dial out to, when the cluster uses it)."""
    out: list[dict[str, Any]] = []
    for name, cm, subject in (
            ("kplane:bootstrap-signer-clusterinfo", "cluster-info", {"kind": "User", "name": "system:anonymous"}),
            ("kplane:konnectivity-info", KONNECTIVITY_INFO, {"kind": "Group", "name": "system:nodes"})):
        meta_ = {"name": name, "namespace": "kube-public"}
        out += [
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": dict(meta_),
             "rules": [{"apiGroups": [""], "resources": ["configmaps"], "resourceNames": [cm], "verbs": ["get"]}]},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": dict(meta_),
             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
             "subjects": [{"apiGroup": "rbac.authorization.k8s.io", **subject}]},
        ]
    return out


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
        self.egress_mode = "direct"
        self.konnectivity: Any = None  # KonnectivityServer with --egress konnectivity
        self.ssh_tunneler: Any = None  # SSHTunneler with --egress ssh
        self._egress_tasks: list[asyncio.Task[None]] = []

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
        await self._start_egress()
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
        await self._publish_konnectivity()
        if self.ssh_tunneler is not None:
            self._egress_tasks.append(asyncio.create_task(self._feed_ssh_nodes(self.ssh_tunneler)))
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

    async def _start_egress(self) -> None:
        """How the apiserver reaches nodes, pods and services: directly, through SSH tunnels, or through the
        konnectivity server this control plane runs (agents on the nodes dial out to it)."""
        from kplane.apiserver.egress import KONNECTIVITY_UDS, EgressOptions, prepare_egress

        cfg = self.cfg
        assert self.server is not None
        uds = cfg.data_dir / KONNECTIVITY_UDS if cfg.egress == "konnectivity" else None
        plan = prepare_egress(EgressOptions(mode=cfg.egress, config_file=cfg.egress_config_file, konnectivity_uds=uds,
                                            ssh_user=cfg.ssh_user, ssh_keyfile=cfg.ssh_keyfile,
                                            ssh_known_hosts=cfg.ssh_known_hosts, ssh_port=cfg.ssh_port),
                              cfg.data_dir)
        self.egress_mode = plan.mode
        tunneler = None
        if plan.mode == "konnectivity" and uds is not None:
            await self._start_konnectivity(uds)
        elif plan.ssh is not None:
            from kplane.tunnel.ssh import SSHTunneler

            tunneler = SSHTunneler(user=plan.ssh.user, key_file=plan.ssh.keyfile, known_hosts=plan.ssh.known_hosts,
                                   port=plan.ssh.port)
            await tunneler.start()
            self.ssh_tunneler = tunneler  # fed with the Node list once the controllers' client exists
        dialer = plan.dialer("cluster", ssh_tunneler=tunneler)
        if plan.mode != "direct":
            self.server.kubelets.dialer = dialer
            self.server.dialer = dialer
            log.info("egress: the apiserver reaches nodes, pods and services via %s (%s)", plan.mode,
                     plan.config_path)

    async def _start_konnectivity(self, uds: Path) -> None:
        from kplane.tunnel.auth import NodeAgentAuthorizer
        from kplane.tunnel.server import KonnectivityServer

        cfg = self.cfg
        crt, key = cfg.pki_dir / "konnectivity-server.crt", cfg.pki_dir / "konnectivity-server.key"
        api = pki.load_pair(cfg.pki_dir / "apiserver.crt", cfg.pki_dir / "apiserver.key")
        dns, ips = pki._cert_sans(api.cert)
        if not crt.exists() or pki._cert_sans(pki.load_pair(crt, key).cert) != (dns, ips):
            ca = pki.load_pair(cfg.pki_dir / "ca.crt", cfg.pki_dir / "ca.key")
            pki.save_pair(pki.issue(ca, common_name="konnectivity-server", server=True, dns_names=sorted(dns),
                                    ips=sorted(ips)), crt, key)
        store = self.store
        assert store is not None

        async def node_addresses(node: str) -> list[str]:
            # what a node's agent may declare: the node's own addresses and its podCIDRs
            try:
                obj = await store.get(f"/registry/core/nodes/{node}")
            except KeyNotFound:
                return []
            out = [str(a.get("address")) for a in (obj.get("status") or {}).get("addresses") or []
                   if a.get("address")]
            out += [str(c) for c in (obj.get("spec") or {}).get("podCIDRs") or []]
            return out

        self.konnectivity = KonnectivityServer(
            agent_port=cfg.konnectivity_agent_port, uds_path=uds, ca_file=cfg.pki_dir / "ca.crt", cert_file=crt,
            key_file=key, host=cfg.bind_address, mode="http-connect", health_port=cfg.konnectivity_health_port,
            authorizer=NodeAgentAuthorizer(node_addresses=node_addresses))
        await self.konnectivity.start()
        log.info("konnectivity server: agents on %s:%d (mTLS, node certificates), apiserver side %s",
                 cfg.bind_address, self.konnectivity.agent_port, uds)

    async def _publish_konnectivity(self) -> None:
        """Tell nodes where to dial out to (kube-public/kplane-konnectivity, readable by system:nodes)."""
        assert self.client is not None
        port = self.konnectivity.agent_port if self.konnectivity is not None else 0
        body = {"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": KONNECTIVITY_INFO, "namespace": "kube-public"},
                "data": {"servers": f"{self.cfg.advertise_address}:{port}" if port else "", "serverCount": "1"}}
        path = f"/api/v1/namespaces/kube-public/configmaps/{KONNECTIVITY_INFO}"
        try:
            cur = await self.client.get(path)
            if cur.get("data") != body["data"]:
                await self.client.update(path, {**cur, "data": body["data"]})
        except StatusError as err:
            if err.code != 404:
                raise
            if port:
                await self.client.create("/api/v1/namespaces/kube-public/configmaps", body)

    async def _feed_ssh_nodes(self, tunneler: Any) -> None:
        from kplane.client import informer
        from kplane.tunnel.ssh import nodes_from_api

        assert self.client is not None
        nodes: dict[str, dict[str, Any]] = {}
        stop = asyncio.Event()
        async for ev, node in informer(self.client, "/api/v1/nodes", stop):
            name = str((node.get("metadata") or {}).get("name", ""))
            if ev == "DELETED":
                nodes.pop(name, None)
            else:
                nodes[name] = node
            tunneler.set_nodes(nodes_from_api(list(nodes.values())))

    async def stop(self) -> None:
        await cancel_and_wait(self._egress_tasks)
        if self.konnectivity is not None:
            with contextlib.suppress(Exception):
                await self.konnectivity.stop()
        if self.ssh_tunneler is not None:
            with contextlib.suppress(Exception):
                await self.ssh_tunneler.close()
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
        freeze_startup_heap()
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
