"""``kplane`` command line: ``up``, ``server``, ``agent``, ``token create``, ``version``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

from kplane import __version__


def _server_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", type=Path, default=Path(".kplane"), help="state, PKI and kubeconfigs")
    p.add_argument("--apiserver-port", type=int, default=6443)
    p.add_argument("--bind-address", default="0.0.0.0")
    p.add_argument("--advertise-address", default=None,
                   help="address pods and nodes use to reach the apiserver (default: the default-route interface's)")
    p.add_argument("--tls-san", action="append", default=[], help="extra apiserver certificate SANs")
    p.add_argument("--anonymous-auth", choices=["true", "false"], default="true")
    p.add_argument("--token-auth-file", type=Path, default=None, help="static tokens (CSV token,user,uid,groups)")
    p.add_argument("--kubelet-certificate-authority", type=Path, default=None,
                   help="CA that signs kubelet serving certificates (default: the cluster CA)")
    p.add_argument("--kubelet-insecure-tls", action="store_true",
                   help="do not verify kubelet serving certificates (logged as a warning; not recommended)")
    p.add_argument("--service-cluster-ip-range", default="10.96.0.0/12",
                   help="CIDR the ClusterIPs of Services are allocated from (the first is the kubernetes Service)")
    p.add_argument("--cluster-cidr", default="10.244.0.0/16", help="CIDR the nodes' podCIDRs are carved from")
    p.add_argument("--node-cidr-mask-size", type=int, default=24, help="prefix length of each node's podCIDR")
    p.add_argument("--egress", choices=["direct", "ssh", "konnectivity"], default=None,
                   help="how the apiserver reaches nodes, pods and services (default direct); writes an upstream "
                        "EgressSelectorConfiguration to DATA/egress-selector-configuration.yaml")
    p.add_argument("--egress-selector-config-file", type=Path, default=None,
                   help="an upstream EgressSelectorConfiguration file (instead of --egress)")
    p.add_argument("--ssh-user", default=None, help="--egress ssh: the user the apiserver logs in as on nodes")
    p.add_argument("--ssh-keyfile", type=Path, default=None, help="--egress ssh: the apiserver's private key")
    p.add_argument("--ssh-known-hosts", type=Path, default=None,
                   help="--egress ssh: the nodes' host keys (default DATA/ssh/known_hosts; required)")
    p.add_argument("--ssh-port", type=int, default=22, help="--egress ssh: the nodes' sshd port")
    p.add_argument("--konnectivity-agent-port", type=int, default=8132,
                   help="--egress konnectivity: where node agents dial in (mTLS with their node certificates)")
    p.add_argument("--konnectivity-health-port", type=int, default=8134,
                   help="--egress konnectivity: the server's health and metrics port on 127.0.0.1")
    p.add_argument("-v", "--verbose", action="store_true")


def _node_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--node-name", default=None, help="default: this host's name")
    p.add_argument("--node-ip", default=None, help="the node's InternalIP (default: the default-route interface's)")
    p.add_argument("--pod-network", choices=["auto", "host"], default="auto",
                   help="auto: each pod in its own network namespace when running as root; host: host network")
    p.add_argument("--kubelet-port", type=int, default=10250)
    p.add_argument("--proxy-healthz-port", type=int, default=10256,
                   help="kube-proxy /healthz and /livez, on 127.0.0.1 only")
    p.add_argument("--pod-restart-backoff", type=float, default=10.0,
                   help="first crash-loop back-off in seconds (doubles up to 300)")


def default_node_name() -> str:
    name = re.sub(r"[^a-z0-9.-]", "-", socket.gethostname().lower()).strip("-.")
    return name or "node"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kplane")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("version", help="print the kplane version")
    up = sub.add_parser("up", help="run the control plane and one node in the foreground (all-in-one)")
    _server_args(up)
    _node_args(up)
    up.add_argument("--no-node", action="store_true", help="run no node (same as `kplane server`)")
    _server_args(sub.add_parser("server", help="run only the control plane"))
    agent = sub.add_parser("agent", help="join this machine as a node")
    agent.add_argument("--server", required=True, help="https://HOST:PORT of the apiserver")
    agent.add_argument("--token", default=None, help="bootstrap token (needed until the node has a certificate)")
    agent.add_argument("--discovery-token-ca-cert-hash", dest="ca_hash", default=None, help="sha256:HEX")
    agent.add_argument("--data-dir", type=Path, default=Path(".kplane-agent"))
    agent.add_argument("--discovery-timeout", type=float, default=300.0, help="seconds to wait for cluster-info")
    agent.add_argument("-v", "--verbose", action="store_true")
    _node_args(agent)
    token = sub.add_parser("token", help="bootstrap tokens")
    tsub = token.add_subparsers(dest="tcmd", required=True)
    tc = tsub.add_parser("create", help="create a bootstrap token and print the join command")
    tc.add_argument("--data-dir", type=Path, default=Path(".kplane"))
    tc.add_argument("--ttl", default="24h", help="lifetime, e.g. 30m, 24h (0 = never expires)")
    tc.add_argument("--description", default="created by kplane token create")
    args = parser.parse_args(argv)
    if args.cmd == "version":
        print(__version__)
        return 0
    logging.basicConfig(level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.cmd == "token":
        return asyncio.run(_token_create(args))
    if args.cmd == "agent":
        return _run(_agent(args))
    return _run(_up(args, node=args.cmd == "up" and not args.no_node))


def _run(coro_fn: object) -> int:
    async def run() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        return await coro_fn(stop)  # type: ignore[operator]

    from kplane.aio import tune_malloc

    tune_malloc()
    try:
        return asyncio.run(run())
    except Exception as exc:  # a clear one-line reason, not a traceback, for refusals
        from kplane.apiserver.egress import EgressConfigError
        from kplane.kubelet.tlsbootstrap import BootstrapError

        if isinstance(exc, BootstrapError | EgressConfigError):
            print(f"kplane: {exc}", file=sys.stderr)
            return 1
        raise


def parse_duration(text: str) -> int:
    m = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", text.strip())
    if not m or not text.strip():
        raise SystemExit(f"kplane: bad duration {text!r} (use e.g. 30m, 24h, 1h30m)")
    h, mi, s = (int(x or 0) for x in m.groups())
    return h * 3600 + mi * 60 + s


def _up(args: argparse.Namespace, *, node: bool) -> Callable[[asyncio.Event], Awaitable[int]]:
    async def go(stop: asyncio.Event) -> int:
        from kplane.controlplane import Config, run_forever
        from kplane.netutil import default_ipv4, parse_cidr

        try:
            svc_net = parse_cidr(args.service_cluster_ip_range, "--service-cluster-ip-range")
        except ValueError as exc:
            raise SystemExit(f"kplane: {exc}") from None
        if svc_net.num_addresses < 8:
            raise SystemExit(f"kplane: --service-cluster-ip-range {svc_net} is too small (at least a /29)")

        cfg = Config(data_dir=args.data_dir.resolve(), port=args.apiserver_port, bind_address=args.bind_address,
                     advertise_address=args.advertise_address or default_ipv4(), extra_sans=args.tls_san,
                     anonymous=args.anonymous_auth == "true", token_file=args.token_auth_file,
                     kubelet_ca=args.kubelet_certificate_authority, kubelet_insecure_tls=args.kubelet_insecure_tls,
                     service_cidr=args.service_cluster_ip_range, cluster_cidr=args.cluster_cidr,
                     node_cidr_mask_size=args.node_cidr_mask_size, egress=args.egress,
                     egress_config_file=args.egress_selector_config_file, ssh_user=args.ssh_user,
                     ssh_keyfile=args.ssh_keyfile, ssh_known_hosts=args.ssh_known_hosts, ssh_port=args.ssh_port,
                     konnectivity_agent_port=args.konnectivity_agent_port,
                     konnectivity_health_port=args.konnectivity_health_port)
        node_opts = None
        if node:
            node_opts = {"name": args.node_name or default_node_name(), "node_ip": args.node_ip or default_ipv4(),
                         "kubelet_port": args.kubelet_port, "restart_backoff_s": args.pod_restart_backoff,
                         "pod_network": args.pod_network, "proxy_healthz_port": args.proxy_healthz_port}
        await run_forever(cfg, stop, node=node_opts)
        return 0

    return go


def _agent(args: argparse.Namespace) -> Callable[[asyncio.Event], Awaitable[int]]:
    async def go(stop: asyncio.Event) -> int:
        from kplane.aio import freeze_startup_heap
        from kplane.kubelet.agent import NodeAgent, NodeConfig
        from kplane.netutil import default_ipv4

        name = args.node_name or default_node_name()
        cfg = NodeConfig(server=args.server, data_dir=(args.data_dir / "node" / name).resolve(), name=name,
                         token=args.token, ca_hash=args.ca_hash, node_ip=args.node_ip or default_ipv4(),
                         kubelet_port=args.kubelet_port, restart_backoff_s=args.pod_restart_backoff,
                         discovery_timeout_s=args.discovery_timeout, pod_network=args.pod_network,
                         proxy_healthz_port=args.proxy_healthz_port)
        agent = NodeAgent(cfg)
        await agent.start()
        print(f"kplane: node {name} joined {args.server}", flush=True)
        freeze_startup_heap()
        try:
            await stop.wait()
        finally:
            await agent.stop()
        return 0

    return go


async def _token_create(args: argparse.Namespace) -> int:
    from cryptography import x509

    from kplane import bootstraptoken, pki
    from kplane.client import APIClient

    data = args.data_dir.resolve()
    pki_dir = data / "pki"
    if not (pki_dir / "admin.crt").exists():
        print(f"kplane: no cluster in {data} (run kplane up or kplane server first)", file=sys.stderr)
        return 1
    server = _server_from_kubeconfig(data / "admin.kubeconfig")
    token = bootstraptoken.generate()
    secret = bootstraptoken.secret_for(token, ttl_s=parse_duration(args.ttl), description=args.description,
                                       groups=["system:bootstrappers:kplane:default-node-token"])
    client = APIClient(server, ca_file=pki_dir / "ca.crt", cert_file=pki_dir / "admin.crt",
                       key_file=pki_dir / "admin.key")
    try:
        await client.create("/api/v1/namespaces/kube-system/secrets", secret)
    finally:
        await client.close()
    ca_hash = pki.ca_cert_hash(x509.load_pem_x509_certificate((pki_dir / "ca.crt").read_bytes()))
    print(token)
    print(f"kplane agent --server {server} --token {token} --discovery-token-ca-cert-hash {ca_hash}")
    return 0


def _server_from_kubeconfig(path: Path) -> str:
    m = re.search(r"server:\s*\"?([^\s\"]+)", path.read_text())
    if not m:
        raise SystemExit(f"kplane: no server in {path}")
    return m.group(1)


if __name__ == "__main__":
    sys.exit(main())
