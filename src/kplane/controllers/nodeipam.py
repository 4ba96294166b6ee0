"""Node IPAM (kube-controller-manager's ``nodeipam`` controller with the range allocator).

Every Node gets ``spec.podCIDR`` and ``spec.podCIDRs``: one block of ``--node-cidr-mask-size`` carved from
``--cluster-cidr``. The allocator's state is never stored: it is rebuilt from the Nodes at every start and after
every re-list, so a restart keeps every assignment, and a block is handed out only when no Node holds it. The
API makes podCIDR immutable once set, so an assignment that races another writer fails instead of overwriting.
A deleted Node's block goes back to the pool. When the pool is empty the Node gets an Event
``CIDRNotAvailable`` and the condition ``NetworkUnavailable=True`` (reason ``CIDRNotAvailable``); it is served as
soon as a block is released, and the condition turns False.

:class:`CIDRSet` is the pure core (no I/O); :class:`NodeIPAM` is the API client around it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import secrets
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import aiohttp

from kplane.aio import cancel_and_wait
from kplane.api import meta
from kplane.client import APIClient
from kplane.errors import StatusError

log = logging.getLogger(__name__)

Obj = dict[str, Any]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
COMPONENT = "node-ipam-controller"
MAX_BLOCKS_BITS = 16  # as upstream: at most 2^16 node blocks per cluster CIDR
UNAVAILABLE_REASON = "CIDRNotAvailable"


class CIDRSet:
    """The ``/mask_size`` blocks of one cluster CIDR and which of them are in use.

    ``allocate`` hands out the next free block after the last one handed out (round robin, so a just-released
    block is not reused at once); ``occupy`` marks a block taken by a Node seen in the API; ``release`` frees one.
    """

    def __init__(self, cluster_cidr: str, mask_size: int) -> None:
        try:
            net = ipaddress.ip_network(cluster_cidr, strict=True)
        except ValueError as exc:
            raise ValueError(f"cluster CIDR {cluster_cidr!r}: {exc}") from None
        host_bits = 2 if net.version == 4 else 8  # room for a gateway and some pods in each block
        if not net.prefixlen <= mask_size <= net.max_prefixlen - host_bits:
            raise ValueError(f"node CIDR mask size {mask_size} must be between the cluster CIDR's prefix length "
                             f"({net.prefixlen}) and {net.max_prefixlen - host_bits}")
        if mask_size - net.prefixlen > MAX_BLOCKS_BITS:
            raise ValueError(f"node CIDR mask size {mask_size} splits {cluster_cidr} into more than "
                             f"2^{MAX_BLOCKS_BITS} blocks")
        self.net: Network = net
        self.mask_size = mask_size
        self.count = 1 << (mask_size - net.prefixlen)
        self._size = 1 << (net.max_prefixlen - mask_size)
        self.used: set[int] = set()
        self._next = 0

    def block(self, index: int) -> str:
        base = int(self.net.network_address) + index * self._size
        return str(ipaddress.ip_network((base, self.mask_size)))

    def indexes(self, cidr: str) -> range:
        """The blocks a CIDR overlaps (empty when it is not inside the cluster CIDR or unparsable)."""
        try:
            net = ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            return range(0)
        if net.version != self.net.version or not net.subnet_of(self.net):  # type: ignore[arg-type]
            return range(0)
        first = (int(net.network_address) - int(self.net.network_address)) // self._size
        last = (int(net.broadcast_address) - int(self.net.network_address)) // self._size
        return range(first, last + 1)

    def occupy(self, cidr: str) -> bool:
        idx = self.indexes(cidr)
        self.used.update(idx)
        return len(idx) > 0

    def release(self, cidr: str) -> None:
        self.used.difference_update(self.indexes(cidr))

    def allocate(self) -> str | None:
        for i in range(self.count):
            idx = (self._next + i) % self.count
            if idx not in self.used:
                self.used.add(idx)
                self._next = (idx + 1) % self.count
                return self.block(idx)
        return None

    @property
    def free(self) -> int:
        return self.count - len(self.used)


def pod_cidrs(node: Obj) -> list[str]:
    spec = node.get("spec") or {}
    cidrs = [str(c) for c in spec.get("podCIDRs") or [] if c]
    if not cidrs and spec.get("podCIDR"):
        cidrs = [str(spec["podCIDR"])]
    return cidrs


class NodeIPAM:
    def __init__(self, client: APIClient, cluster_cidr: str, mask_size: int, *,
                 only: Callable[[str], bool] | None = None) -> None:
        self.client = client
        self.cluster_cidr = cluster_cidr
        self.mask_size = mask_size
        self.cidrs = CIDRSet(cluster_cidr, mask_size)
        self.only = only  # restrict to some nodes (tests that share a cluster)
        self.owner: dict[str, str] = {}  # block -> node name
        self.nodes: dict[str, Obj] = {}
        self.pending: set[str] = set()  # nodes waiting for a block (the pool was empty)
        self._reported: set[str] = set()  # nodes told CIDRNotAvailable (kept across re-lists: told once)
        self.stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._instance = f"{COMPONENT}-{secrets.token_hex(4)}"

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        self.stop.set()
        await cancel_and_wait([self._task])

    # --- state (no I/O) ----------------------------------------------------------------------------------

    def rebuild(self, nodes: list[Obj]) -> None:
        """Forget everything and take the blocks the Nodes hold (oldest Node first, so a duplicate assignment
        made by hand is attributed to the Node that had it first)."""
        self.cidrs = CIDRSet(self.cluster_cidr, self.mask_size)
        self.owner.clear()
        self.nodes.clear()
        self.pending.clear()
        for node in sorted(nodes, key=lambda n: ((n.get("metadata") or {}).get("creationTimestamp", ""),
                                                 (n.get("metadata") or {}).get("name", ""))):
            self.observe(node)

    def observe(self, node: Obj) -> bool:
        """Record a Node; True when it still needs a block."""
        name = str((node.get("metadata") or {}).get("name", ""))
        self.nodes[name] = node
        cidrs = pod_cidrs(node)
        if not cidrs:
            if name in self.owner.values():
                return False  # an event from before our own assignment landed
            return self.only is None or self.only(name)
        self.pending.discard(name)
        self._reported.discard(name)
        for c in cidrs:
            if self.cidrs.indexes(c) and self.owner.get(c, name) != name:
                log.warning("nodeipam: node %s has podCIDR %s, which node %s also holds", name, c, self.owner[c])
                continue
            if self.cidrs.occupy(c):
                self.owner[c] = name
        return False

    def forget(self, name: str) -> list[str]:
        """A Node is gone: free its blocks; returns them."""
        self.nodes.pop(name, None)
        self.pending.discard(name)
        self._reported.discard(name)
        freed = [c for c, owner in self.owner.items() if owner == name]
        for c in freed:
            del self.owner[c]
            self.cidrs.release(c)
        return freed

    # --- the loop ----------------------------------------------------------------------------------------

    async def _run(self) -> None:
        while not self.stop.is_set():
            try:
                lst = await self.client.get("/api/v1/nodes")
                self.rebuild(list(lst.get("items") or []))
                for name in sorted(self.nodes):
                    if not pod_cidrs(self.nodes[name]) and (self.only is None or self.only(name)):
                        await self._assign(name)
                rv = (lst.get("metadata") or {}).get("resourceVersion", "0")
                async for ev in self.client.watch("/api/v1/nodes", resource_version=rv):
                    kind, node = ev.get("type"), ev.get("object") or {}
                    if kind == "ERROR":
                        raise StatusError(int(node.get("code", 500)), "watch error")
                    rv = (node.get("metadata") or {}).get("resourceVersion", rv)
                    if kind in ("ADDED", "MODIFIED"):
                        if self.observe(node):
                            await self._assign(str(node["metadata"]["name"]))
                    elif kind == "DELETED" and self.forget(str((node.get("metadata") or {}).get("name", ""))):
                        await self._serve_pending()
            except asyncio.CancelledError:
                raise
            except (StatusError, aiohttp.ClientError, OSError, TimeoutError) as exc:
                log.debug("nodeipam: re-listing nodes: %s", exc)
                await asyncio.sleep(0.5)
            except Exception:
                log.exception("nodeipam: unexpected error; re-listing")
                await asyncio.sleep(1)

    async def _serve_pending(self) -> None:
        for name in sorted(self.pending):
            if self.cidrs.free == 0:
                return
            await self._assign(name)

    async def _assign(self, name: str) -> None:
        cidr = self.cidrs.allocate()
        if cidr is None:
            self.pending.add(name)
            if name not in self._reported:
                self._reported.add(name)
                await self._report_unavailable(name)
            return
        self.owner[cidr] = name
        self.pending.discard(name)
        self._reported.discard(name)
        try:
            node = await self.client.request(
                "PATCH", f"/api/v1/nodes/{quote(name)}", body={"spec": {"podCIDR": cidr, "podCIDRs": [cidr]}},
                content_type="application/merge-patch+json")
        except BaseException as exc:
            self.owner.pop(cidr, None)
            self.cidrs.release(cidr)
            if isinstance(exc, StatusError) and exc.code == 404:
                self.nodes.pop(name, None)
                return
            if isinstance(exc, StatusError) and exc.code in (409, 422):
                # someone else set it first (the field is immutable): take what the Node holds now
                with contextlib.suppress(StatusError):
                    self.observe(await self.client.get(f"/api/v1/nodes/{quote(name)}"))
                return
            raise
        self.nodes[name] = node
        log.info("nodeipam: node %s gets podCIDR %s", name, cidr)
        await self._set_condition(name, False, "CIDRAssigned", f"node IPAM assigned podCIDR {cidr}",
                                  only_if_present=True)

    async def _report_unavailable(self, name: str) -> None:
        msg = (f"Node {name} status is now: {UNAVAILABLE_REASON}: no podCIDR left in cluster CIDR "
               f"{self.cluster_cidr} (all {self.cidrs.count} /{self.mask_size} blocks are assigned)")
        log.warning("nodeipam: %s", msg)
        node = self.nodes.get(name) or {}
        await self._event(node, "Warning", UNAVAILABLE_REASON, msg)
        await self._set_condition(name, True, UNAVAILABLE_REASON, msg)

    async def _event(self, node: Obj, typ: str, reason: str, message: str) -> None:
        md = node.get("metadata") or {}
        name = str(md.get("name", ""))
        now = meta.now_rfc3339()
        ev = {"apiVersion": "v1", "kind": "Event",
              "metadata": {"name": f"{name}.{secrets.token_hex(8)}", "namespace": "default"},
              "involvedObject": {"apiVersion": "v1", "kind": "Node", "name": name, "uid": md.get("uid", "")},
              "type": typ, "reason": reason, "message": message, "action": "AllocatePodCIDR",
              "source": {"component": COMPONENT}, "reportingComponent": COMPONENT,
              "reportingInstance": self._instance, "firstTimestamp": now, "lastTimestamp": now, "count": 1}
        try:
            await self.client.create("/api/v1/namespaces/default/events", ev)
        except (StatusError, aiohttp.ClientError, OSError, TimeoutError) as exc:
            log.debug("nodeipam: event for node %s: %s", name, exc)

    async def _set_condition(self, name: str, unavailable: bool, reason: str, message: str, *,
                             only_if_present: bool = False) -> None:
        """NetworkUnavailable on the Node's status (the kubelet keeps conditions it does not own)."""
        path = f"/api/v1/nodes/{quote(name)}"
        status = "True" if unavailable else "False"
        for _ in range(5):
            try:
                node = await self.client.get(path)
            except StatusError:
                return
            st = node.setdefault("status", {})
            conds: list[Obj] = list(st.get("conditions") or [])
            cur = next((c for c in conds if c.get("type") == "NetworkUnavailable"), None)
            if cur is None and only_if_present:
                return
            if cur is not None and cur.get("status") == status and cur.get("reason") == reason:
                return
            now = meta.now_rfc3339()
            new = {"type": "NetworkUnavailable", "status": status, "reason": reason, "message": message,
                   "lastHeartbeatTime": now,
                   "lastTransitionTime": cur.get("lastTransitionTime", now) if cur and cur.get("status") == status
                   else now}
            st["conditions"] = [c for c in conds if c.get("type") != "NetworkUnavailable"] + [new]
            try:
                await self.client.update(f"{path}/status", node)
                return
            except StatusError as err:
                if err.code != 409:
                    log.debug("nodeipam: condition on node %s: %s", name, err.message)
                    return
