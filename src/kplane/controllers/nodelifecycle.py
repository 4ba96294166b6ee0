"""Node lifecycle (the health half of kube-controller-manager's ``nodelifecycle`` controller).

A node is healthy while its kubelet renews its Lease in ``kube-node-lease`` or posts a new Ready heartbeat. Like
upstream, freshness is judged on this controller's clock: the time it *observed* a new renewTime/heartbeat, so
skewed node clocks do not matter and a controller restart gives every node a full grace period. When neither has
changed for ``grace_s``, the node's Ready/MemoryPressure/DiskPressure/PIDPressure conditions become ``Unknown``.
Taints follow the Ready condition: Unknown -> ``node.kubernetes.io/unreachable``, False ->
``node.kubernetes.io/not-ready`` (NoSchedule and NoExecute each); True removes both. Pods are not evicted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from kplane.aio import cancel_and_wait
from kplane.api import meta
from kplane.client import APIClient, informer
from kplane.errors import StatusError

log = logging.getLogger(__name__)

Obj = dict[str, Any]

UNREACHABLE = "node.kubernetes.io/unreachable"
NOT_READY = "node.kubernetes.io/not-ready"
CONDITION_TYPES = ("Ready", "MemoryPressure", "DiskPressure", "PIDPressure")
LEASE_NS = "kube-node-lease"


def _ready(node: Obj) -> Obj | None:
    for c in (node.get("status") or {}).get("conditions") or []:
        if c.get("type") == "Ready":
            return dict(c)
    return None


def wanted_taint_key(node: Obj) -> str | None:
    c = _ready(node)
    status = c.get("status") if c else None
    if status == "True":
        return None
    if status == "False":
        return NOT_READY
    return UNREACHABLE if c is not None else None


class NodeLifecycle:
    def __init__(self, client: APIClient, grace_s: float = 40, poll_s: float = 5, *,
                 only: Callable[[str], bool] | None = None) -> None:
        self.client = client
        self.only = only  # restrict to some nodes (tests that share a cluster)
        self.grace_s = grace_s
        self.poll_s = poll_s
        self.stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._nodes: dict[str, Obj] = {}
        # name -> (last seen lease renewTime, last seen Ready heartbeat, monotonic time either last changed)
        self._seen: dict[str, tuple[str | None, str | None, float]] = {}
        self._leases: dict[str, str | None] = {}
        self._dirty = asyncio.Event()

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._watch_nodes()), asyncio.create_task(self._watch_leases()),
                       asyncio.create_task(self._loop())]

    async def close(self) -> None:
        self.stop.set()
        await cancel_and_wait(self._tasks)
        self._tasks = []

    async def _watch_nodes(self) -> None:
        async for ev, node in informer(self.client, "/api/v1/nodes", self.stop):
            name = (node.get("metadata") or {}).get("name", "")
            if ev == "DELETED":
                self._nodes.pop(name, None)
                self._seen.pop(name, None)
            else:
                self._nodes[name] = node
                self._observe(name)
            self._dirty.set()

    async def _watch_leases(self) -> None:
        async for ev, lease in informer(self.client, f"/apis/coordination.k8s.io/v1/namespaces/{LEASE_NS}/leases",
                                        self.stop):
            name = (lease.get("metadata") or {}).get("name", "")
            if ev == "DELETED":
                self._leases.pop(name, None)
            else:
                self._leases[name] = (lease.get("spec") or {}).get("renewTime")
            self._observe(name)

    def _observe(self, name: str) -> None:
        node = self._nodes.get(name)
        if node is None:
            return
        ready = _ready(node)
        hb = ready.get("lastHeartbeatTime") if ready else None
        renew = self._leases.get(name)
        prev = self._seen.get(name)
        if prev is None or (renew is not None and renew != prev[0]) or (hb is not None and hb != prev[1]):
            self._seen[name] = (renew, hb, time.monotonic())

    async def _loop(self) -> None:
        while not self.stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._dirty.wait(), min(self.poll_s, max(self.grace_s / 2, 0.2)))
            self._dirty.clear()
            for name in list(self._nodes):
                if self.only is not None and not self.only(name):
                    continue
                try:
                    await self.reconcile(name)
                except StatusError as err:
                    if err.code != 404:
                        log.warning("nodelifecycle: %s: %s", name, err.message)
                except (OSError, TimeoutError) as err:
                    log.warning("nodelifecycle: %s: %s", name, err)
                except Exception:
                    log.exception("nodelifecycle: %s", name)

    def stale(self, name: str) -> bool:
        seen = self._seen.get(name)
        return seen is not None and time.monotonic() - seen[2] > self.grace_s

    async def reconcile(self, name: str) -> None:
        node = self._nodes.get(name)
        if node is None:
            return
        if self.stale(name) and any(c.get("status") != "Unknown" for c in self._tracked_conditions(node)):
            node = await self._mark_unknown(name)
            self._nodes[name] = node
        await self._sync_taints(node)

    @staticmethod
    def _tracked_conditions(node: Obj) -> list[Obj]:
        conds = {c.get("type"): c for c in (node.get("status") or {}).get("conditions") or []}
        return [conds.get(t) or {"type": t} for t in CONDITION_TYPES]

    async def _mark_unknown(self, name: str) -> Obj:
        path = f"/api/v1/nodes/{name}"
        for _ in range(3):
            node = await self.client.get(path)
            now = meta.now_rfc3339()
            st = node.setdefault("status", {})
            conds: list[Obj] = list(st.get("conditions") or [])
            by_type = {c.get("type"): c for c in conds}
            # a kubelet that never posted Ready never posted anything (upstream's NodeStatusNeverUpdated)
            never = "Ready" not in by_type
            reason = "NodeStatusNeverUpdated" if never else "NodeStatusUnknown"
            message = "Kubelet never posted node status." if never else "Kubelet stopped posting node status."
            for t in CONDITION_TYPES:
                c = by_type.get(t)
                if c is None:
                    conds.append({"type": t, "status": "Unknown", "reason": reason, "message": message,
                                  "lastHeartbeatTime": now, "lastTransitionTime": now})
                    continue
                if c.get("status") != "Unknown":
                    c["lastTransitionTime"] = now
                c.update(status="Unknown", reason=reason, message=message)
            st["conditions"] = conds
            try:
                out = await self.client.update(f"{path}/status", node)
                log.info("nodelifecycle: node %s stopped posting status; marked Unknown", name)
                return out
            except StatusError as err:
                if err.code != 409:
                    raise
        raise StatusError(409, f"node {name}: too many conflicts")

    async def _sync_taints(self, node: Obj) -> None:
        want = wanted_taint_key(node)
        taints: list[Obj] = list((node.get("spec") or {}).get("taints") or [])
        ours = {(t.get("key"), t.get("effect")) for t in taints if t.get("key") in (UNREACHABLE, NOT_READY)}
        desired = {(want, "NoSchedule"), (want, "NoExecute")} if want else set()
        if ours == desired:
            return
        name = node["metadata"]["name"]
        path = f"/api/v1/nodes/{name}"
        for _ in range(3):
            cur = await self.client.get(path)
            want = wanted_taint_key(cur)
            desired = {(want, "NoSchedule"), (want, "NoExecute")} if want else set()
            spec = cur.setdefault("spec", {})
            kept = [t for t in spec.get("taints") or [] if t.get("key") not in (UNREACHABLE, NOT_READY)
                    or (t.get("key"), t.get("effect")) in desired]
            have = {(t.get("key"), t.get("effect")) for t in kept}
            for key, effect in sorted(d for d in desired if d not in have):
                t: Obj = {"key": key, "effect": effect}
                if effect == "NoExecute":
                    t["timeAdded"] = meta.now_rfc3339()
                kept.append(t)
            if kept == (spec.get("taints") or []):
                self._nodes[name] = cur
                return
            if kept:
                spec["taints"] = kept
            else:
                spec.pop("taints", None)
            try:
                self._nodes[name] = await self.client.update(path, cur)
                log.info("nodelifecycle: node %s taints now %s", name, sorted(desired))
                return
            except StatusError as err:
                if err.code != 409:
                    raise
