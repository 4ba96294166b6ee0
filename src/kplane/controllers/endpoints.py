"""The endpoints controller: for every Service with a selector, an Endpoints object and EndpointSlices listing the
matching pods' addresses (ready ones as ready, others as not ready), with target ports resolved against each pod.

The desired objects are computed by pure functions (:func:`desired_endpoints`, :func:`desired_slices`) from a
Service and the pods of its namespace; the controller only keeps caches fed by informers, and writes the
difference through the API with the controller-manager's identity. Services without a selector are left alone:
their endpoints belong to whoever writes them (the apiserver itself for ``default/kubernetes``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from typing import Any

from kplane.aio import cancel_and_wait
from kplane.api import meta
from kplane.client import APIClient, informer, path_for
from kplane.errors import StatusError

log = logging.getLogger(__name__)

Obj = dict[str, Any]

MANAGED_BY = "endpointslice.kubernetes.io/managed-by"
CONTROLLER = "endpointslice-controller.k8s.io"
SERVICE_NAME = "kubernetes.io/service-name"


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _ready(pod: Obj) -> bool:
    for c in (pod.get("status") or {}).get("conditions") or []:
        if c.get("type") == "Ready":
            return c.get("status") == "True"
    return False


def _target_port(svc_port: Obj, pod: Obj) -> int | None:
    tp = svc_port.get("targetPort", svc_port.get("port"))
    if isinstance(tp, int):
        return tp if 0 < tp < 65536 else None
    if isinstance(tp, str):
        if tp.isdigit():
            n = int(tp)
            return n if 0 < n < 65536 else None
        proto = svc_port.get("protocol", "TCP")
        for c in (pod.get("spec") or {}).get("containers") or []:
            for cp in c.get("ports") or []:
                if cp.get("name") == tp and cp.get("protocol", "TCP") == proto:
                    port = cp.get("containerPort")
                    return port if isinstance(port, int) else None
    return None


def _members(svc: Obj, pods: list[Obj]) -> list[tuple[Obj, tuple[tuple[str, int, str], ...], bool, bool]]:
    """(pod, resolved ports as (name, port, protocol), ready, terminating) for each pod the Service selects."""
    spec = svc.get("spec") or {}
    selector = spec.get("selector") or {}
    publish = bool(spec.get("publishNotReadyAddresses"))
    out = []
    for pod in sorted(pods, key=lambda p: p["metadata"]["name"]):
        if not _selects(selector, (pod.get("metadata") or {}).get("labels") or {}):
            continue
        st = pod.get("status") or {}
        if not st.get("podIP") or st.get("phase") in ("Succeeded", "Failed"):
            continue
        terminating = bool(pod["metadata"].get("deletionTimestamp"))
        ports = []
        for sp in spec.get("ports") or []:
            n = _target_port(sp, pod)
            if n is not None:
                ports.append((str(sp.get("name") or ""), n, str(sp.get("protocol", "TCP"))))
        ready = (_ready(pod) or publish) and not terminating
        out.append((pod, tuple(ports), ready, terminating))
    return out


def _target_ref(pod: Obj) -> Obj:
    md = pod["metadata"]
    return {"kind": "Pod", "namespace": md.get("namespace", ""), "name": md["name"], "uid": md.get("uid", "")}


def desired_endpoints(svc: Obj, pods: list[Obj]) -> Obj:
    md = svc["metadata"]
    groups: dict[tuple[tuple[str, int, str], ...], Obj] = {}
    for pod, ports, ready, terminating in _members(svc, pods):
        if terminating and not (svc.get("spec") or {}).get("publishNotReadyAddresses"):
            continue
        sub = groups.setdefault(ports, {"addresses": [], "notReadyAddresses": []})
        addr: Obj = {"ip": pod["status"]["podIP"], "targetRef": _target_ref(pod)}
        if pod.get("spec", {}).get("nodeName"):
            addr["nodeName"] = pod["spec"]["nodeName"]
        sub["addresses" if ready else "notReadyAddresses"].append(addr)
    subsets = []
    for ports, sub in groups.items():
        if not ports:
            continue
        s: Obj = {"ports": [{**({"name": n} if n else {}), "port": p, "protocol": pr} for n, p, pr in ports]}
        if sub["addresses"]:
            s["addresses"] = sub["addresses"]
        if sub["notReadyAddresses"]:
            s["notReadyAddresses"] = sub["notReadyAddresses"]
        subsets.append(s)
    out: Obj = {"apiVersion": "v1", "kind": "Endpoints",
                "metadata": {"name": md["name"], "namespace": md.get("namespace", ""),
                             "labels": dict(md.get("labels") or {})}}
    if subsets:
        out["subsets"] = subsets
    return out


def _slice_name(svc_name: str, ports: tuple[tuple[str, int, str], ...]) -> str:
    digest = hashlib.sha256(repr(ports).encode()).hexdigest()[:5]
    base = svc_name[: 253 - 6]
    return f"{base}-{digest}"


def desired_slices(svc: Obj, pods: list[Obj]) -> list[Obj]:
    md = svc["metadata"]
    groups: dict[tuple[tuple[str, int, str], ...], list[Obj]] = {}
    for pod, ports, ready, terminating in _members(svc, pods):
        if not ports:
            continue
        ep: Obj = {"addresses": [pod["status"]["podIP"]],
                   "conditions": {"ready": ready, "serving": _ready(pod), "terminating": terminating},
                   "targetRef": _target_ref(pod)}
        if pod.get("spec", {}).get("nodeName"):
            ep["nodeName"] = pod["spec"]["nodeName"]
        groups.setdefault(ports, []).append(ep)
    if not groups:
        groups[()] = []
    labels = {**(md.get("labels") or {}), SERVICE_NAME: md["name"], MANAGED_BY: CONTROLLER}
    owner = {"apiVersion": "v1", "kind": "Service", "name": md["name"], "uid": md.get("uid", ""),
             "controller": True, "blockOwnerDeletion": True}
    out = []
    for ports, eps in groups.items():
        out.append({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": _slice_name(md["name"], ports), "namespace": md.get("namespace", ""),
                         "labels": labels, "ownerReferences": [owner]},
            "addressType": "IPv4",
            "endpoints": eps,
            "ports": [{"name": n, "port": p, "protocol": pr} for n, p, pr in ports],
        })
    return out


def _differs(current: Obj, desired: Obj, keys: tuple[str, ...]) -> bool:
    if any(current.get(k) != desired.get(k) for k in keys):
        return True
    cur_labels = (current.get("metadata") or {}).get("labels") or {}
    return cur_labels != (desired.get("metadata") or {}).get("labels")


class EndpointsController:
    def __init__(self, client: APIClient, resync_s: float = 30.0) -> None:
        self.client = client
        self.stop = asyncio.Event()
        self.resync_s = resync_s
        self.services: dict[str, Obj] = {}
        self.pods: dict[str, dict[str, Obj]] = {}  # namespace -> name -> pod
        self.dirty: set[str] = set()
        self.wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._watch_services()), asyncio.create_task(self._watch_pods()),
                       asyncio.create_task(self._worker()), asyncio.create_task(self._resync())]

    async def close(self) -> None:
        self.stop.set()
        await cancel_and_wait(self._tasks)

    def _mark(self, key: str) -> None:
        self.dirty.add(key)
        self.wake.set()

    async def _watch_services(self) -> None:
        async for ev, svc in informer(self.client, "/api/v1/services", self.stop):
            md = svc.get("metadata") or {}
            key = f"{md.get('namespace')}/{md.get('name')}"
            if ev == "DELETED":
                self.services.pop(key, None)
            else:
                self.services[key] = svc
            self._mark(key)

    async def _watch_pods(self) -> None:
        async for ev, pod in informer(self.client, "/api/v1/pods", self.stop):
            md = pod.get("metadata") or {}
            ns = str(md.get("namespace", ""))
            old = self.pods.setdefault(ns, {}).get(md.get("name", ""))
            if ev == "DELETED":
                self.pods[ns].pop(md.get("name", ""), None)
            else:
                self.pods[ns][md["name"]] = pod
            labels = [(p.get("metadata") or {}).get("labels") or {} for p in (old, pod) if p]
            for key, svc in list(self.services.items()):
                if key.split("/", 1)[0] != ns:
                    continue
                sel = (svc.get("spec") or {}).get("selector") or {}
                if any(_selects(sel, lb) for lb in labels):
                    self._mark(key)

    async def _resync(self) -> None:
        while not self.stop.is_set():
            await asyncio.sleep(self.resync_s)
            for key in list(self.services):
                self._mark(key)

    async def _worker(self) -> None:
        while not self.stop.is_set():
            await self.wake.wait()
            self.wake.clear()
            await asyncio.sleep(0.05)  # coalesce bursts (a Deployment's pods arrive together)
            batch, self.dirty = self.dirty, set()
            for key in sorted(batch):
                try:
                    await self.sync(key)
                except StatusError as err:
                    if err.code != 404:
                        log.warning("endpoints controller: %s: %s", key, err.message)
                    if err.code in (409, 500, 503):
                        self._mark(key)
                except Exception:
                    log.exception("endpoints controller: %s", key)

    async def sync(self, key: str) -> None:
        ns, name = key.split("/", 1)
        svc = self.services.get(key)
        ep_path = path_for("", "v1", "endpoints", ns, name)
        slices_path = path_for("discovery.k8s.io", "v1", "endpointslices", ns)
        existing = await self.client.get(slices_path, params={"labelSelector": f"{SERVICE_NAME}={name},"
                                                                                f"{MANAGED_BY}={CONTROLLER}"})
        current_slices = {s["metadata"]["name"]: s for s in existing.get("items") or []}
        if svc is None or not (svc.get("spec") or {}).get("selector"):
            # deleted, or endpoints managed by someone else: remove only what this controller wrote
            if svc is None:
                with contextlib.suppress(StatusError):
                    await self.client.delete(ep_path)
            for sname in current_slices:
                with contextlib.suppress(StatusError):
                    await self.client.delete(path_for("discovery.k8s.io", "v1", "endpointslices", ns, sname))
            return
        pods = list(self.pods.get(ns, {}).values())
        want_ep = desired_endpoints(svc, pods)
        try:
            cur = await self.client.get(ep_path)
            if _differs(cur, want_ep, ("subsets",)):
                body = {**want_ep, "metadata": {**cur["metadata"], "labels": want_ep["metadata"]["labels"],
                                                "annotations": {
                                                    **(cur["metadata"].get("annotations") or {}),
                                                    "endpoints.kubernetes.io/last-change-trigger-time":
                                                        meta.now_rfc3339()}}}
                await self.client.update(ep_path, body)
        except StatusError as err:
            if err.code != 404:
                raise
            await self.client.create(path_for("", "v1", "endpoints", ns), want_ep)
        wanted = {s["metadata"]["name"]: s for s in desired_slices(svc, pods)}
        for sname, want in wanted.items():
            cur_slice = current_slices.get(sname)
            if cur_slice is None:
                try:
                    await self.client.create(slices_path, want)
                except StatusError as err:
                    if err.code != 409:
                        raise
                    self._mark(key)
            elif _differs(cur_slice, want, ("endpoints", "ports", "addressType")):
                body = {**want, "metadata": {**cur_slice["metadata"], "labels": want["metadata"]["labels"],
                                             "ownerReferences": want["metadata"]["ownerReferences"]}}
                await self.client.update(path_for("discovery.k8s.io", "v1", "endpointslices", ns, sname), body)
        for sname in current_slices.keys() - wanted.keys():
            with contextlib.suppress(StatusError):
                await self.client.delete(path_for("discovery.k8s.io", "v1", "endpointslices", ns, sname))
