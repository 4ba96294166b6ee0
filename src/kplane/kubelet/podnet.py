"""Pod networking on a node: a network namespace per pod, wired to a per-node bridge.

Theory of operation. When the agent runs as root with ``--pod-network auto`` it waits for the node IPAM controller
to give its Node a ``spec.podCIDR``, then builds, in the host's network namespace:

* a bridge ``kpbr<key>`` holding the gateway, the first address of the podCIDR (``<key>`` is a hash of the node's
  name and podCIDR: unique per node, stable across restarts, at most 15 characters as link names must be);
* ``net.ipv4.ip_forward=1``;
* an nftables table ``ip kplane-podnet-<key>`` (its own, apart from kube-proxy's) that masquerades traffic from
  the podCIDR to anything outside the cluster's podCIDRs (the set of every Node's podCIDR);
* a route to every other Node's podCIDR via that Node's InternalIP, unless that address is on this host (nodes
  sharing one host's network namespace reach each other's bridges directly).

Each pod (except ``hostNetwork`` pods) gets a named namespace ``/run/netns/kp-<key>-<pod uid>`` with ``lo`` up, a
veth pair whose host end ``kv<hash>`` is on the bridge (hairpin mode on) and whose pod end is ``eth0`` with the
pod's IP and a default route via the gateway. Pod IPs come from the podCIDR through a small IPAM persisted, with everything
else created here, in ``<node data dir>/network/state.json``: a restarted agent adopts running pods with their
IPs, and :func:`cleanup_node` can remove every trace of a node. Stopping the agent leaves all of it in place
(containers outlive the agent); deleting a pod removes its namespace, veth and IP.

Containers join the pod's namespace between fork and exec, in the child the node's shim starts (``setns(2)``
through ctypes, :mod:`kplane.kubelet.nsutil`: Python 3.11 has no ``os.setns``); exec joins it with
``nsenter --net``; port-forward connects to ``localhost`` inside it from a short-lived thread that ``setns``es
first (a network namespace is per thread) and hands the socket to asyncio.

Without root, or with ``--pod-network host``, pods share the host's network as before and each pod gets an Event
``HostNetworkFallback`` saying so.

The naming, the IPAM, the route plan and the nft ruleset are pure functions (top of the file); the netlink work
(pyroute2, imported lazily so the shim stays light) runs in worker threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import ipaddress
import json
import logging
import os
import secrets
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from kplane.api import meta
from kplane.kubelet import nsutil

if TYPE_CHECKING:
    from kplane.client import APIClient
    from kplane.kubelet.agent import NodeConfig

log = logging.getLogger(__name__)

Obj = dict[str, Any]
T = TypeVar("T")
CLONE_NEWNET = nsutil.CLONE_NEWNET
NETNS_DIR = Path("/run/netns")
TABLE_PREFIX = "kplane-podnet-"
FALLBACK_REASON = "HostNetworkFallback"


class NetworkNotReady(Exception):
    """The pod network cannot be set up yet (no podCIDR) or failed; the message says why."""


# --- pure core ---------------------------------------------------------------------------------------------


def _h(text: str, n: int) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


@dataclass(frozen=True)
class NodeNet:
    """Names and addresses of one node's pod network, derived from its name and podCIDR."""

    node: str
    pod_cidr: str

    @property
    def key(self) -> str:
        return _h(f"{self.node}/{self.pod_cidr}", 10)

    @property
    def bridge(self) -> str:
        return f"kpbr{self.key}"

    @property
    def table(self) -> str:
        return f"{TABLE_PREFIX}{self.key}"

    @property
    def netns_prefix(self) -> str:
        return f"kp-{self.key}-"

    @property
    def network(self) -> ipaddress.IPv4Network:
        net = ipaddress.ip_network(self.pod_cidr, strict=False)
        if not isinstance(net, ipaddress.IPv4Network):
            raise ValueError(f"podCIDR {self.pod_cidr}: only IPv4 pod networks are supported")
        return net

    @property
    def gateway(self) -> str:
        return str(self.network.network_address + 1)

    def netns_name(self, uid: str) -> str:
        return f"{self.netns_prefix}{uid}"

    def veth_name(self, uid: str) -> str:
        return f"kv{_h(f'{self.key}/{uid}', 12)}"


class IPAMExhausted(Exception):
    pass


@dataclass
class PodIPAM:
    """Pod IPs from a podCIDR: never the network, gateway or broadcast address; handed out round robin after
    the last one, so a released IP is reused as late as possible."""

    pod_cidr: str
    ips: dict[str, str] = field(default_factory=dict)  # pod uid -> IP
    last: str = ""

    def _pool(self) -> Iterable[ipaddress.IPv4Address]:
        net = ipaddress.IPv4Network(self.pod_cidr, strict=False)
        gw = net.network_address + 1
        return (a for a in net.hosts() if a != gw)

    def allocate(self, uid: str) -> str:
        if uid in self.ips:
            return self.ips[uid]
        used = set(self.ips.values())
        pool = list(self._pool())
        start = 0
        if self.last:
            with contextlib.suppress(ValueError):
                start = pool.index(ipaddress.IPv4Address(self.last)) + 1
        for i in range(len(pool)):
            ip = str(pool[(start + i) % len(pool)])
            if ip not in used:
                self.ips[uid] = ip
                self.last = ip
                return ip
        raise IPAMExhausted(f"no free pod IP left in {self.pod_cidr} ({len(pool)} in use)")

    def release(self, uid: str) -> str | None:
        return self.ips.pop(uid, None)


def pod_cidrs_of(node: Obj) -> list[str]:
    spec = node.get("spec") or {}
    cidrs = [str(c) for c in spec.get("podCIDRs") or [] if c]
    return cidrs or ([str(spec["podCIDR"])] if spec.get("podCIDR") else [])


def internal_ip(node: Obj) -> str | None:
    for a in (node.get("status") or {}).get("addresses") or []:
        if a.get("type") == "InternalIP" and a.get("address"):
            return str(a["address"])
    return None


def plan_routes(peers: dict[str, tuple[list[str], str | None]], own_cidr: str,
                local_addrs: set[str]) -> dict[str, str]:
    """podCIDR -> next hop for every other node whose InternalIP is another host's (IPv4 only)."""
    own = ipaddress.ip_network(own_cidr, strict=False)
    out: dict[str, str] = {}
    for _name, (cidrs, ip) in sorted(peers.items()):
        if not ip or ip in local_addrs:
            continue
        try:
            hop = ipaddress.ip_address(ip)
        except ValueError:
            continue
        if hop.version != 4 or hop.is_loopback or hop.is_link_local or hop.is_unspecified or hop.is_multicast:
            continue
        for c in cidrs:
            try:
                net = ipaddress.ip_network(c, strict=False)
            except ValueError:
                continue
            if net.version == 4 and not net.overlaps(own) and str(net) not in out:
                out[str(net)] = ip
    return out


def masquerade_ruleset(table: str, pod_cidr: str, cluster_cidrs: Iterable[str]) -> str:
    """An nft script that (re)creates ``table`` atomically: pods' traffic leaving the cluster's pod networks is
    masqueraded behind the node's address."""
    nets = [ipaddress.ip_network(c, strict=False) for c in [pod_cidr, *cluster_cidrs]]
    elems = ", ".join(str(n) for n in ipaddress.collapse_addresses(n for n in nets if n.version == 4))
    return (f"table ip {table} {{}}\n"
            f"delete table ip {table}\n"
            f"table ip {table} {{\n"
            f"  comment \"kplane pod network of podCIDR {pod_cidr}\"\n"
            f"  set pod-cidrs {{ type ipv4_addr; flags interval; elements = {{ {elems} }}; }}\n"
            f"  chain postrouting {{\n"
            f"    type nat hook postrouting priority srcnat; policy accept;\n"
            f"    ip saddr {pod_cidr} ip daddr != @pod-cidrs masquerade\n"
            f"  }}\n"
            f"}}\n")


# --- namespaces from Python (ctypes) -----------------------------------------------------------------------

# the ctypes wrappers live in nsutil (the shim imports only that); these names stay for podnet's callers
_setns = nsutil.setns
enter_netns = nsutil.enter_netns


def _unshare_netns() -> None:
    nsutil.unshare(CLONE_NEWNET)


def _in_fresh_thread(fn: Callable[[], T]) -> T:
    """Run ``fn`` in a new thread that ends afterwards: namespace changes are per thread, and no pooled thread
    must ever be left in a pod's namespace. Blocking: call it from a worker thread (to_thread).

    Nothing here forks: a child forked from the agent's asyncio process would share the parent's signal wakeup
    socket, and a signal sent to the child (pyroute2 terminates its helpers with SIGTERM) would stop the agent."""
    box: list[Any] = []

    def body() -> None:
        try:
            box.append((True, fn()))
        except BaseException as exc:
            box.append((False, exc))

    t = threading.Thread(target=body, name="netns", daemon=True)
    t.start()
    t.join()
    ok, value = box[0]
    if not ok:
        raise value
    return value


def run_in_netns(path: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` inside the network namespace at ``path`` (in a fresh thread)."""
    def body() -> T:
        enter_netns(path)
        return fn()

    return _in_fresh_thread(body)


def create_netns(name: str) -> None:
    """A named network namespace ``/run/netns/<name>``: a fresh thread unshares its own network namespace and
    pyroute2 bind-mounts it there (as ``ip netns add`` does)."""
    from pyroute2 import netns

    path = NETNS_DIR / name
    if path.exists() and not os.path.ismount(path):
        path.unlink()  # left over from an interrupted create

    def body() -> None:
        _unshare_netns()
        netns.attach(str(path), threading.get_native_id())

    _in_fresh_thread(body)


def dial_in_netns(path: str, host: str, port: int, timeout: float) -> socket.socket:
    """A TCP connection to ``host:port`` as seen from inside the namespace (``localhost`` is the pod's)."""
    def connect() -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.settimeout(timeout)
            s.connect((host, port))
            s.setblocking(False)
            return s
        except BaseException:
            s.close()
            raise

    return run_in_netns(path, connect)


async def open_connection_in_netns(path: str, port: int, *, connect_timeout_s: float = 10
                                   ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    sock = await asyncio.to_thread(dial_in_netns, path, "127.0.0.1", port, connect_timeout_s)
    return await asyncio.open_connection(sock=sock)


# --- netlink and nft (blocking; run in worker threads) ------------------------------------------------------


def _ignore(*codes: int) -> contextlib.AbstractContextManager[Any]:
    from pyroute2.netlink.exceptions import NetlinkError

    @contextlib.contextmanager
    def cm() -> Any:
        try:
            yield
        except NetlinkError as exc:
            if exc.code not in codes:
                raise

    return cm()


def _link(ipr: Any, name: str) -> int | None:
    idx = ipr.link_lookup(ifname=name)
    return int(idx[0]) if idx else None


def _has_addr(ipr: Any, index: int, address: str) -> bool:
    return any(a.get_attr("IFA_ADDRESS") == address for a in ipr.get_addr(index=index, family=socket.AF_INET))


def ensure_bridge(bridge: str, gateway: str, prefixlen: int) -> None:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        if _link(ipr, bridge) is None:
            with _ignore(errno.EEXIST):
                ipr.link("add", ifname=bridge, kind="bridge")
        idx = _link(ipr, bridge)
        assert idx is not None
        if not _has_addr(ipr, idx, gateway):
            with _ignore(errno.EEXIST):
                ipr.addr("add", index=idx, address=gateway, prefixlen=prefixlen)
        ipr.link("set", index=idx, state="up")


def enable_forwarding() -> None:
    p = Path("/proc/sys/net/ipv4/ip_forward")
    if p.read_text().strip() != "1":
        p.write_text("1\n")


def _drop_stale_eth0() -> None:  # runs inside a pod's namespace: a half-made pair from an interrupted setup
    from pyroute2 import IPRoute

    with IPRoute() as ipn:
        stale = _link(ipn, "eth0")
        if stale is not None:
            ipn.link("del", index=stale)


def _configure_pod_side(ip: str, prefixlen: int, gateway: str) -> None:  # runs inside the pod's namespace
    from pyroute2 import IPRoute

    with IPRoute() as ipn:
        lo = _link(ipn, "lo")
        if lo is not None:
            ipn.link("set", index=lo, state="up")
        eth0 = _link(ipn, "eth0")
        if eth0 is None:
            raise NetworkNotReady("eth0 is missing in the pod's network namespace")
        if not _has_addr(ipn, eth0, ip):
            ipn.addr("add", index=eth0, address=ip, prefixlen=prefixlen)
        ipn.link("set", index=eth0, state="up")
        ipn.route("replace", dst="0.0.0.0/0", gateway=gateway)


def ensure_pod(netns_name: str, veth: str, bridge: str, ip: str, prefixlen: int, gateway: str) -> None:
    from pyroute2 import IPRoute

    path = str(NETNS_DIR / netns_name)
    if not os.path.ismount(path):
        create_netns(netns_name)
    with IPRoute() as ipr:
        br = _link(ipr, bridge)
        if br is None:
            raise NetworkNotReady(f"bridge {bridge} is missing")
        if _link(ipr, veth) is None:
            run_in_netns(path, _drop_stale_eth0)
            ipr.link("add", ifname=veth, kind="veth", peer={"ifname": "eth0", "net_ns_fd": path})
        idx = _link(ipr, veth)
        assert idx is not None
        ipr.link("set", index=idx, master=br, state="up")
        # hairpin: a pod's packet may leave through the port it came in on (a pod reaching itself through a
        # Service VIP, DNATed on the bridge when bridge-nf-call-iptables is on)
        ipr.brport("set", index=idx, mode=1)
    run_in_netns(path, lambda: _configure_pod_side(ip, prefixlen, gateway))


def remove_pod(netns_name: str, veth: str) -> None:
    from pyroute2 import IPRoute, netns

    if veth:
        with IPRoute() as ipr:
            idx = _link(ipr, veth)
            if idx is not None:
                with _ignore(errno.ENODEV):
                    ipr.link("del", index=idx)
    if netns_name and (NETNS_DIR / netns_name).exists():
        with contextlib.suppress(FileNotFoundError):
            netns.remove(str(NETNS_DIR / netns_name))


def remove_link(name: str) -> None:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        idx = _link(ipr, name)
        if idx is not None:
            with _ignore(errno.ENODEV):
                ipr.link("del", index=idx)


def set_route(cidr: str, via: str) -> None:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        ipr.route("replace", dst=cidr, gateway=via)


def delete_route(cidr: str, via: str) -> None:
    from pyroute2 import IPRoute

    with IPRoute() as ipr, _ignore(errno.ESRCH, errno.ENOENT):
        ipr.route("del", dst=cidr, gateway=via)


def local_addresses() -> set[str]:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        return {str(a.get_attr("IFA_ADDRESS")) for a in ipr.get_addr() if a.get_attr("IFA_ADDRESS")}


def nft(script: str) -> None:
    exe = shutil.which("nft")
    if exe is None:
        raise FileNotFoundError("nft (nftables) is not installed")
    p = subprocess.run([exe, "-f", "-"], input=script, capture_output=True, text=True, timeout=30)
    if p.returncode != 0:
        raise RuntimeError(f"nft: {p.stderr.strip()}")


def delete_table(table: str) -> None:
    with contextlib.suppress(FileNotFoundError, RuntimeError):
        nft(f"table ip {table} {{}}\ndelete table ip {table}\n")


# --- persisted state ----------------------------------------------------------------------------------------


def _load(path: Path) -> Obj:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _save(path: Path, state: Obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(state, indent=1, sort_keys=True))
    os.replace(tmp, path)


def state_path(node_dir: Path) -> Path:
    return node_dir / "network" / "state.json"


def orphan_netns(prefix: str, keep: set[str]) -> list[str]:
    """Named namespaces with this node's prefix whose pod uid is not in ``keep``."""
    if not prefix.startswith("kp-") or not NETNS_DIR.is_dir():
        return []
    return sorted(n for n in os.listdir(NETNS_DIR) if n.startswith(prefix) and n[len(prefix):] not in keep)


def cleanup_node(node_dir: Path) -> None:
    """Remove everything a node's pod network created on this host (its pods' namespaces and veths, routes,
    nft table, bridge) and forget its IPs. For tests and for decommissioning a node; the agent never calls it."""
    path = state_path(node_dir)
    st = _load(path)
    if not st:
        return
    prefix = str(st.get("netns_prefix") or "")
    for rec in (st.get("pods") or {}).values():
        with contextlib.suppress(Exception):
            remove_pod(str(rec.get("netns", "")), str(rec.get("veth", "")))
    for name in orphan_netns(prefix, set()):
        with contextlib.suppress(Exception):
            remove_pod(name, "")
    for cidr, via in (st.get("routes") or {}).items():
        with contextlib.suppress(Exception):
            delete_route(cidr, via)
    if st.get("table"):
        delete_table(str(st["table"]))
    if st.get("bridge"):
        with contextlib.suppress(Exception):
            remove_link(str(st["bridge"]))
    path.unlink(missing_ok=True)


# --- the agent's side ---------------------------------------------------------------------------------------


def decide_mode(cfg: NodeConfig) -> tuple[str, str]:
    """("pod" | "host", why) for this agent."""
    if cfg.pod_network == "host":
        return "host", "--pod-network host was given"
    if os.geteuid() != 0:
        return "host", "the node agent does not run as root, so pods cannot get network namespaces"
    try:
        import pyroute2  # noqa: F401
    except ImportError:
        return "host", "pyroute2 is not installed"
    return "pod", "each pod gets its own network namespace"


def event_for_pod(pod: Obj, node: str, typ: str, reason: str, message: str) -> Obj:
    md = pod.get("metadata") or {}
    now = meta.now_rfc3339()
    return {"apiVersion": "v1", "kind": "Event",
            "metadata": {"name": f"{md.get('name', '')}.{secrets.token_hex(8)}", "namespace": md.get("namespace")},
            "involvedObject": {"apiVersion": "v1", "kind": "Pod", "namespace": md.get("namespace"),
                               "name": md.get("name"), "uid": md.get("uid", "")},
            "type": typ, "reason": reason, "message": message, "source": {"component": "kubelet", "host": node},
            "reportingComponent": "kubelet", "reportingInstance": node, "firstTimestamp": now,
            "lastTimestamp": now, "count": 1}


class PodNetwork:
    """One node's pod network. ``setup_pod``/``teardown_pod`` are called by the pod workers; a Node watch brings
    the bridge up once the podCIDR is known and keeps the routes to other nodes and the masquerade set current."""

    def __init__(self, cfg: NodeConfig, client: Callable[[], APIClient | None]) -> None:
        self.cfg = cfg
        self.client = client
        self.mode, self.reason = decide_mode(cfg)
        self.path = state_path(cfg.data_dir)
        self.state: Obj = _load(self.path)
        self.net: NodeNet | None = None
        self.ipam: PodIPAM | None = None
        self.ready = asyncio.Event()
        self.error = ""
        self._lock = asyncio.Lock()
        self._peers: dict[str, tuple[list[str], str | None]] = {}
        self._applied_peers: object = None
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def pod_mode(self) -> bool:
        return self.mode == "pod"

    async def start(self) -> None:
        if self.pod_mode:
            self._task = asyncio.create_task(self._watch_nodes())
        else:
            log.warning("node %s: pods use the host's network: %s", self.cfg.name, self.reason)

    async def stop(self) -> None:
        """Stop watching; the bridge, namespaces and routes stay (pods keep running)."""
        self._stop.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    # --- node level -----------------------------------------------------------------------------------

    async def _watch_nodes(self) -> None:
        from kplane.client import informer

        client = self.client()
        assert client is not None
        async for ev, node in informer(client, "/api/v1/nodes", self._stop):
            name = str((node.get("metadata") or {}).get("name", ""))
            try:
                if name == self.cfg.name:
                    if ev != "DELETED" and not self.ready.is_set():
                        cidrs = [c for c in pod_cidrs_of(node) if ":" not in c]
                        if cidrs:
                            await self._setup_node(cidrs[0])
                    continue
                if ev == "DELETED":
                    self._peers.pop(name, None)
                else:
                    self._peers[name] = (pod_cidrs_of(node), internal_ip(node))
                if self.ready.is_set():
                    await self._sync_peers()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("node %s: pod network: %s", self.cfg.name, exc)

    async def _setup_node(self, pod_cidr: str) -> None:
        async with self._lock:
            net = NodeNet(self.cfg.name, pod_cidr)
            if self.state.get("podCIDR") not in (None, pod_cidr):
                log.warning("node %s: podCIDR changed from %s to %s; pods set up before keep their addresses",
                            self.cfg.name, self.state.get("podCIDR"), pod_cidr)
            try:
                await asyncio.to_thread(self._setup_node_sync, net)
            except Exception as exc:
                self.error = f"pod network setup failed: {exc}"
                log.error("node %s: %s", self.cfg.name, self.error)
                raise
            ips = {uid: str(rec["ip"]) for uid, rec in (self.state.get("pods") or {}).items() if rec.get("ip")}
            self.ipam = PodIPAM(pod_cidr, ips, str(self.state.get("lastIP", "")))
            self.state.update({"podCIDR": pod_cidr, "bridge": net.bridge, "table": net.table,
                               "netns_prefix": net.netns_prefix, "gateway": net.gateway})
            self.state.setdefault("pods", {})
            self.state.setdefault("routes", {})
            _save(self.path, self.state)
            self.net = net
            self.error = ""
            self.ready.set()
            log.info("node %s: pod network %s on bridge %s (gateway %s)", self.cfg.name, pod_cidr, net.bridge,
                     net.gateway)
        await self._sync_peers(force=True)

    @staticmethod
    def _setup_node_sync(net: NodeNet) -> None:
        ensure_bridge(net.bridge, net.gateway, net.network.prefixlen)
        enable_forwarding()

    async def _sync_peers(self, *, force: bool = False) -> None:
        """Routes to other hosts' podCIDRs and the masquerade exemptions follow the Nodes."""
        if self.net is None:
            return
        snapshot = sorted((k, tuple(v[0]), v[1]) for k, v in self._peers.items())
        if not force and snapshot == self._applied_peers:
            return
        async with self._lock:
            net = self.net
            local = await asyncio.to_thread(local_addresses)
            want = plan_routes(self._peers, net.pod_cidr, local)
            have: dict[str, str] = dict(self.state.get("routes") or {})
            for cidr, via in have.items():
                if want.get(cidr) != via:
                    with contextlib.suppress(Exception):
                        await asyncio.to_thread(delete_route, cidr, via)
                    self.state["routes"].pop(cidr, None)
            for cidr, via in want.items():
                if have.get(cidr) == via:
                    continue
                try:
                    await asyncio.to_thread(set_route, cidr, via)
                    self.state["routes"][cidr] = via
                    log.info("node %s: route %s via %s", self.cfg.name, cidr, via)
                except Exception as exc:
                    log.warning("node %s: no route to %s via %s: %s", self.cfg.name, cidr, via, exc)
            _save(self.path, self.state)
            others = [c for cidrs, _ in self._peers.values() for c in cidrs if ":" not in c]
            try:
                await asyncio.to_thread(nft, masquerade_ruleset(net.table, net.pod_cidr, others))
            except Exception as exc:
                log.warning("node %s: pods' traffic leaving the cluster is not masqueraded: %s", self.cfg.name,
                            exc)
            self._applied_peers = snapshot

    # --- pod level ------------------------------------------------------------------------------------

    def uses_host_network(self, pod: Obj) -> bool:
        return not self.pod_mode or bool((pod.get("spec") or {}).get("hostNetwork"))

    def netns_path(self, uid: str) -> str | None:
        rec = (self.state.get("pods") or {}).get(uid)
        return str(NETNS_DIR / rec["netns"]) if rec and rec.get("netns") else None

    async def setup_pod(self, pod: Obj) -> str:
        """The pod's IP, its namespace wired up (idempotent: an adopted pod keeps its IP)."""
        if self.uses_host_network(pod):
            return self.cfg.node_ip
        if not self.ready.is_set() or self.net is None or self.ipam is None:
            raise NetworkNotReady(self.error or f"waiting for node {self.cfg.name} to be assigned a podCIDR")
        uid = str(pod["metadata"]["uid"])
        async with self._lock:
            net, ipam = self.net, self.ipam
            pods: Obj = self.state.setdefault("pods", {})
            fresh = uid not in ipam.ips
            try:
                ip = ipam.allocate(uid)
            except IPAMExhausted as exc:
                raise NetworkNotReady(str(exc)) from None
            rec = {"ip": ip, "netns": net.netns_name(uid), "veth": net.veth_name(uid),
                   "pod": f"{pod['metadata'].get('namespace')}/{pod['metadata'].get('name')}"}
            pods[uid] = rec
            self.state["lastIP"] = ipam.last
            _save(self.path, self.state)
            try:
                await asyncio.to_thread(ensure_pod, rec["netns"], rec["veth"], net.bridge, ip,
                                        net.network.prefixlen, net.gateway)
            except Exception as exc:
                if fresh:
                    ipam.release(uid)
                    pods.pop(uid, None)
                    with contextlib.suppress(Exception):
                        await asyncio.to_thread(remove_pod, rec["netns"], rec["veth"])
                    _save(self.path, self.state)
                raise NetworkNotReady(f"setting up the pod's network namespace failed: {exc}") from exc
            return ip

    async def teardown_pod(self, uid: str) -> None:
        """Remove the pod's namespace and veth and free its IP (nothing to do when it has none)."""
        rec = (self.state.get("pods") or {}).get(uid)
        if rec is None:
            return
        async with self._lock:
            rec = (self.state.get("pods") or {}).pop(uid, None)
            if rec is None:
                return
            try:
                await asyncio.to_thread(remove_pod, str(rec.get("netns", "")), str(rec.get("veth", "")))
            finally:
                if self.ipam is not None:
                    self.ipam.release(uid)
                _save(self.path, self.state)
            log.info("node %s: pod %s network removed (IP %s freed)", self.cfg.name, rec.get("pod"), rec.get("ip"))

    async def reap(self, known: set[str]) -> None:
        """Namespaces and IPs of pods no longer bound to this node (deleted while the agent was down)."""
        for uid in [u for u in (self.state.get("pods") or {}) if u not in known]:
            with contextlib.suppress(Exception):
                await self.teardown_pod(uid)
        keep = known | set(self.state.get("pods") or {})
        for name in await asyncio.to_thread(orphan_netns, str(self.state.get("netns_prefix") or ""), keep):
            with contextlib.suppress(Exception):
                await asyncio.to_thread(remove_pod, name, "")
            log.info("node %s: removed orphaned network namespace %s", self.cfg.name, name)

    def fallback_event(self, pod: Obj) -> Obj:
        """The Event that tells a user this pod shares the host's network."""
        msg = (f"pod network: the pod shares the host's network namespace on node {self.cfg.name} "
               f"({self.reason}); its IP is the node's ({self.cfg.node_ip}) and its ports are the host's")
        return event_for_pod(pod, self.cfg.name, "Warning" if self.cfg.pod_network == "auto" else "Normal",
                             FALLBACK_REASON, msg)
