"""Service address allocation and the ``kubernetes`` Service, both kept by the apiserver.

Allocation: every ClusterIP and NodePort a Service holds is a reservation key in the store, created atomically
(``/registry/kplane/clusterips/<ip>``, ``/registry/kplane/nodeports/<port>``). The store's create-if-absent is
the only lock, so two apiservers on one etcd never hand out the same address, and a restart loses nothing. A
repair pass (at start, then every minute) drops reservations whose Service is gone and re-creates missing ones,
so a crash between the reservation and the Service write cannot leak an address for long.

The ``kubernetes`` Service in ``default`` gets the first address of the service range; its Endpoints and
EndpointSlice name the apiserver's advertise address. The apiserver reconciles all three every 10 seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from kplane.aio import cancel_and_wait
from kplane.errors import StatusError, invalid
from kplane.storage.base import KeyExists, KeyNotFound, Store

log = logging.getLogger(__name__)

Obj = dict[str, Any]

IP_PREFIX = "/registry/kplane/clusterips/"
PORT_PREFIX = "/registry/kplane/nodeports/"
NODE_PORT_RANGE = (30000, 32767)
REPAIR_GRACE_S = 30.0  # a reservation younger than this may belong to a Service being written right now


@dataclass(frozen=True)
class Allocation:
    """What one Service holds: its ClusterIP (or none) and its node ports."""

    ip: str | None = None
    node_ports: frozenset[int] = field(default_factory=frozenset)


def _service_ref(obj: Obj) -> str:
    md = obj.get("metadata") or {}
    return f"{md.get('namespace', '')}/{md.get('name', '')}"


def wants_cluster_ip(spec: Obj) -> bool:
    return spec.get("type", "ClusterIP") != "ExternalName" and spec.get("clusterIP") != "None"


def wants_node_ports(spec: Obj) -> bool:
    return spec.get("type") in ("NodePort", "LoadBalancer")


def allocation_of(obj: Obj) -> Allocation:
    spec = obj.get("spec") or {}
    ip = spec.get("clusterIP") if wants_cluster_ip(spec) and spec.get("clusterIP") not in (None, "", "None") else None
    ports = frozenset(int(p["nodePort"]) for p in spec.get("ports") or []
                      if isinstance(p, dict) and isinstance(p.get("nodePort"), int) and p["nodePort"])
    return Allocation(ip=str(ip) if ip else None, node_ports=ports)


class ServiceIPAM:
    def __init__(self, store: Store, service_cidr: str, node_port_range: tuple[int, int] = NODE_PORT_RANGE) -> None:
        net = ipaddress.ip_network(service_cidr, strict=True)
        if not isinstance(net, ipaddress.IPv4Network) or net.num_addresses < 8:
            raise ValueError(f"service CIDR {service_cidr}: need an IPv4 range of at least 8 addresses")
        self.store = store
        self.net = net
        self.node_port_range = node_port_range
        self.kubernetes_ip = str(net.network_address + 1)

    # --- pure checks ---------------------------------------------------------------------------------------

    def check_ip(self, name: str, ip: str) -> None:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            raise invalid("Service", name, [("spec.clusterIPs", "FieldValueInvalid",
                                             f'Invalid value: []string{{"{ip}"}}: must be a valid IP address')]) from None
        if addr not in self.net or addr in (self.net.network_address, self.net.broadcast_address):
            raise invalid("Service", name, [(
                "spec.clusterIPs", "FieldValueInvalid",
                f'Invalid value: []string{{"{ip}"}}: failed to allocate IP {ip}: the provided IP ({ip}) is not in '
                f"the valid range. The range of valid IPs is {self.net}")])

    def check_node_port(self, name: str, port: int) -> None:
        lo, hi = self.node_port_range
        if not lo <= port <= hi:
            raise invalid("Service", name, [(
                "spec.ports.nodePort", "FieldValueInvalid",
                f"Invalid value: {port}: provided port is not in the valid range. The range of valid ports is "
                f"{lo}-{hi}")])

    # --- reservations ----------------------------------------------------------------------------------------

    async def _reserve(self, key: str, owner: str) -> bool:
        try:
            await self.store.create(key, {"metadata": {}, "key": key, "owner": owner, "created": time.time()})
            return True
        except KeyExists:
            return False

    async def _release(self, key: str) -> None:
        with contextlib.suppress(KeyNotFound):
            await self.store.delete(key)

    async def _reserve_ip(self, name: str, owner: str, ip: str | None) -> str:
        if ip is not None:
            self.check_ip(name, ip)
            if not await self._reserve(IP_PREFIX + ip, owner):
                raise invalid("Service", name, [(
                    "spec.clusterIPs", "FieldValueInvalid",
                    f'Invalid value: []string{{"{ip}"}}: failed to allocate IP {ip}: provided IP is already allocated')])
            return ip
        used = {k[len(IP_PREFIX):] for k in await self._keys(IP_PREFIX)}
        first, size = int(self.net.network_address), self.net.num_addresses
        # dynamic addresses skip the network address, the first address (the kubernetes Service) and broadcast
        candidates = size - 3
        start = random.randrange(candidates)
        for i in range(candidates):
            cand = str(ipaddress.IPv4Address(first + 2 + (start + i) % candidates))
            if cand in used:
                continue
            if await self._reserve(IP_PREFIX + cand, owner):
                return cand
        raise StatusError(500, f"Internal error occurred: failed to allocate a serviceIP: range is full ({self.net})")

    async def _reserve_port(self, name: str, owner: str, port: int | None) -> int:
        if port is not None:
            self.check_node_port(name, port)
            if not await self._reserve(f"{PORT_PREFIX}{port}", owner):
                raise invalid("Service", name, [(
                    "spec.ports.nodePort", "FieldValueInvalid",
                    f"Invalid value: {port}: provided port is already allocated")])
            return port
        used = {k[len(PORT_PREFIX):] for k in await self._keys(PORT_PREFIX)}
        lo, hi = self.node_port_range
        span = hi - lo + 1
        start = random.randrange(span)
        for i in range(span):
            cand = lo + (start + i) % span
            if str(cand) not in used and await self._reserve(f"{PORT_PREFIX}{cand}", owner):
                return cand
        raise StatusError(500, "Internal error occurred: failed to allocate a nodePort: range is full")

    async def _keys(self, prefix: str) -> list[str]:
        items, _, _ = await self.store.list(prefix)
        return [str(i.get("key", "")) for i in items]

    async def release(self, alloc: Allocation) -> None:
        if alloc.ip:
            await self._release(IP_PREFIX + alloc.ip)
        for p in alloc.node_ports:
            await self._release(f"{PORT_PREFIX}{p}")

    # --- the strategy hooks the apiserver calls -------------------------------------------------------------

    async def prepare_create(self, obj: Obj, *, dry_run: bool = False) -> Allocation:
        """Fill in and reserve the Service's ClusterIP and node ports; returns what was reserved (released by
        :meth:`release` when the write fails)."""
        spec = obj.setdefault("spec", {})
        name = str((obj.get("metadata") or {}).get("name", ""))
        owner = _service_ref(obj)
        if spec.get("type") == "ExternalName":
            if spec.get("clusterIP"):
                raise invalid("Service", name, [("spec.clusterIP", "FieldValueForbidden",
                                                 "Forbidden: may not be set for ExternalName services")])
            spec.pop("clusterIPs", None)
            return Allocation()
        ips = spec.get("clusterIPs")
        requested = spec.get("clusterIP") or (ips[0] if isinstance(ips, list) and ips else None)
        if isinstance(ips, list) and ips and spec.get("clusterIP") and ips[0] != spec["clusterIP"]:
            raise invalid("Service", name, [("spec.clusterIPs[0]", "FieldValueInvalid",
                                             "Invalid value: must match spec.clusterIP")])
        if requested is not None and not isinstance(requested, str):
            raise invalid("Service", name, [("spec.clusterIP", "FieldValueInvalid", "Invalid value: must be a string")])
        reserved_ip: str | None = None
        ports_done: list[int] = []
        try:
            if requested == "None":
                spec["clusterIP"], spec["clusterIPs"] = "None", ["None"]
            elif dry_run:
                if requested:
                    self.check_ip(name, requested)
                    spec["clusterIP"], spec["clusterIPs"] = requested, [requested]
            else:
                reserved_ip = await self._reserve_ip(name, owner, requested or None)
                spec["clusterIP"], spec["clusterIPs"] = reserved_ip, [reserved_ip]
            if wants_node_ports(spec):
                for p in spec.get("ports") or []:
                    want = p.get("nodePort")
                    if want is not None and not isinstance(want, int):
                        raise invalid("Service", name, [("spec.ports.nodePort", "FieldValueInvalid",
                                                         "Invalid value: must be an integer")])
                    if dry_run:
                        if want:
                            self.check_node_port(name, want)
                        continue
                    p["nodePort"] = await self._reserve_port(name, owner, want or None)
                    ports_done.append(p["nodePort"])
            else:
                for i, p in enumerate(spec.get("ports") or []):
                    if p.get("nodePort"):
                        raise invalid("Service", name, [(f"spec.ports[{i}].nodePort", "FieldValueForbidden",
                                                         "Forbidden: may not be used when `type` is 'ClusterIP'")])
        except BaseException:
            await self.release(Allocation(reserved_ip, frozenset(ports_done)))
            raise
        return Allocation(reserved_ip, frozenset(ports_done))

    async def prepare_update(self, old: Obj, new: Obj, *, dry_run: bool = False) -> tuple[Allocation, Allocation]:
        """Carry the allocated values over when the update leaves them out (as upstream's patchAllocatedValues),
        refuse changes to them, and reserve/release across type changes. Returns (added, dropped): ``added`` must
        be released if the write fails, ``dropped`` once it succeeded."""
        ospec, nspec = old.get("spec") or {}, new.setdefault("spec", {})
        name = str((old.get("metadata") or {}).get("name", ""))
        owner = _service_ref(old)
        had_ip = wants_cluster_ip(ospec) and ospec.get("clusterIP") not in (None, "")
        if wants_cluster_ip(nspec) or nspec.get("clusterIP") == "None":
            if not nspec.get("clusterIP") and had_ip:
                nspec["clusterIP"] = ospec["clusterIP"]
            if not nspec.get("clusterIPs") and nspec.get("clusterIP") == ospec.get("clusterIP") and ospec.get(
                    "clusterIPs"):
                nspec["clusterIPs"] = list(ospec["clusterIPs"])
            if had_ip and nspec.get("clusterIP") != ospec.get("clusterIP"):
                raise invalid("Service", name, [("spec.clusterIPs[0]", "FieldValueInvalid",
                                                 f'Invalid value: []string{{"{nspec.get("clusterIP")}"}}: may not '
                                                 f"change once set")])
        if wants_node_ports(nspec) and wants_node_ports(ospec):
            old_by_key = {(p.get("port"), p.get("protocol", "TCP")): p.get("nodePort")
                          for p in ospec.get("ports") or []}
            for p in nspec.get("ports") or []:
                if isinstance(p, dict) and not p.get("nodePort"):
                    prev = old_by_key.get((p.get("port"), p.get("protocol", "TCP")))
                    if prev:
                        p["nodePort"] = prev
        before, after_req = allocation_of(old), allocation_of(new)
        added_ip: str | None = None
        added_ports: list[int] = []
        try:
            if wants_cluster_ip(nspec) and not nspec.get("clusterIP"):
                if not dry_run:
                    added_ip = await self._reserve_ip(name, owner, None)
                    nspec["clusterIP"], nspec["clusterIPs"] = added_ip, [added_ip]
            elif after_req.ip and after_req.ip != before.ip:
                if dry_run:
                    self.check_ip(name, after_req.ip)
                else:
                    added_ip = await self._reserve_ip(name, owner, after_req.ip)
                nspec["clusterIPs"] = [after_req.ip]
            if not wants_cluster_ip(nspec) and nspec.get("type") == "ExternalName":
                nspec.pop("clusterIP", None)
                nspec.pop("clusterIPs", None)
            if wants_node_ports(nspec):
                for p in nspec.get("ports") or []:
                    want = p.get("nodePort")
                    if want and want in before.node_ports:
                        continue
                    if dry_run:
                        if want:
                            self.check_node_port(name, want)
                        continue
                    p["nodePort"] = await self._reserve_port(name, owner, want or None)
                    added_ports.append(p["nodePort"])
            else:
                for p in nspec.get("ports") or []:
                    if isinstance(p, dict):
                        p.pop("nodePort", None)
        except BaseException:
            await self.release(Allocation(added_ip, frozenset(added_ports)))
            raise
        after = allocation_of(new)
        dropped = Allocation(before.ip if before.ip and before.ip != after.ip else None,
                             frozenset(before.node_ports - after.node_ports))
        return Allocation(added_ip, frozenset(added_ports)), dropped

    # --- repair -----------------------------------------------------------------------------------------------

    async def repair(self) -> None:
        services, _, _ = await self.store.list("/registry/core/services/")
        want: dict[str, str] = {}
        for svc in services:
            a = allocation_of(svc)
            if a.ip:
                want[IP_PREFIX + a.ip] = _service_ref(svc)
            for p in a.node_ports:
                want[f"{PORT_PREFIX}{p}"] = _service_ref(svc)
        have: dict[str, Obj] = {}
        for prefix in (IP_PREFIX, PORT_PREFIX):
            items, _, _ = await self.store.list(prefix)
            for item in items:
                have[str(item.get("key", ""))] = item
        now = time.time()
        for key, doc in have.items():
            if key not in want and now - float(doc.get("created") or 0) > REPAIR_GRACE_S:
                log.info("service allocation repair: releasing %s (held by %s, which no longer has it)",
                         key.rsplit("/", 1)[-1], doc.get("owner"))
                await self._release(key)
        for key, owner in want.items():
            if key not in have and await self._reserve(key, owner):
                log.info("service allocation repair: %s of %s was not reserved; reserved it now",
                         key.rsplit("/", 1)[-1], owner)


# --- the kubernetes Service ---------------------------------------------------------------------------------------

def kubernetes_service(ip: str, port: int) -> Obj:
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "kubernetes", "namespace": "default",
                     "labels": {"component": "apiserver", "provider": "kubernetes"}},
        "spec": {"type": "ClusterIP", "clusterIP": ip, "clusterIPs": [ip], "sessionAffinity": "None",
                 "ports": [{"name": "https", "port": 443, "protocol": "TCP", "targetPort": port}]},
    }


def kubernetes_endpoints(addresses: Iterable[str], port: int) -> Obj:
    return {
        "apiVersion": "v1", "kind": "Endpoints",
        "metadata": {"name": "kubernetes", "namespace": "default",
                     "labels": {"endpointslice.kubernetes.io/skip-mirror": "true"}},
        "subsets": [{"addresses": [{"ip": a} for a in addresses],
                     "ports": [{"name": "https", "port": port, "protocol": "TCP"}]}],
    }


def kubernetes_endpointslice(addresses: Iterable[str], port: int) -> Obj:
    return {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "kubernetes", "namespace": "default",
                     "labels": {"kubernetes.io/service-name": "kubernetes"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [a], "conditions": {"ready": True, "serving": True, "terminating": False}}
                      for a in addresses],
        "ports": [{"name": "https", "port": port, "protocol": "TCP"}],
    }


def same_content(current: Obj, desired: Obj, keys: Iterable[str]) -> bool:
    for k in keys:
        if k == "labels":
            have = (current.get("metadata") or {}).get("labels") or {}
            if any(have.get(lk) != lv for lk, lv in ((desired.get("metadata") or {}).get("labels") or {}).items()):
                return False
        elif current.get(k) != desired.get(k):
            return False
    return True


class KubernetesServiceReconciler:
    """Keeps default/kubernetes (Service, Endpoints, EndpointSlice) pointing at this apiserver."""

    def __init__(self, server: Any, advertise_address: str, port: int, interval_s: float = 10.0) -> None:
        self.server = server
        self.address = advertise_address
        self.port = port
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        await cancel_and_wait([self._task])

    async def _loop(self) -> None:
        ticks = 0
        while True:
            try:
                await self.reconcile()
                if ticks % 6 == 0:
                    await self.server.ipam.repair()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("kubernetes service reconcile failed")
            ticks += 1
            await asyncio.sleep(self.interval_s)

    async def reconcile(self) -> None:
        from kplane.api.resources import lookup

        ipam: ServiceIPAM = self.server.ipam
        svc_res = lookup("", "v1", "services")
        ep_res = lookup("", "v1", "endpoints")
        es_res = lookup("discovery.k8s.io", "v1", "endpointslices")
        assert svc_res and ep_res and es_res
        want_svc = kubernetes_service(ipam.kubernetes_ip, self.port)
        await self._ensure(svc_res, want_svc, ("spec-ports",))
        await self._ensure(ep_res, kubernetes_endpoints([self.address], self.port), ("subsets", "labels"))
        await self._ensure(es_res, kubernetes_endpointslice([self.address], self.port),
                           ("endpoints", "ports", "addressType", "labels"))

    async def _ensure(self, res: Any, desired: Obj, keys: Iterable[str]) -> None:
        from kplane.apiserver.authn import UserInfo

        user = UserInfo(name="system:apiserver", groups=("system:masters", "system:authenticated"))
        name = desired["metadata"]["name"]
        try:
            current = await self.server.get(res, "default", name)
        except StatusError as err:
            if err.code != 404:
                raise
            with contextlib.suppress(StatusError):  # a concurrent writer won: next round compares
                await self.server.create(res, "default", desired, user, {})
            return
        if res.kind == "Service":
            spec = current.get("spec") or {}
            ok = spec.get("clusterIP") == desired["spec"]["clusterIP"] and \
                [(p.get("port"), p.get("targetPort"), p.get("protocol")) for p in spec.get("ports") or []] == \
                [(p["port"], p["targetPort"], p["protocol"]) for p in desired["spec"]["ports"]]
            if ok:
                return
            if spec.get("clusterIP") != desired["spec"]["clusterIP"]:
                log.warning("the kubernetes Service has ClusterIP %s, not %s (the first address of the range): "
                            "leaving it (delete it to have it re-created)", spec.get("clusterIP"),
                            desired["spec"]["clusterIP"])
                return
            body = {**current, "spec": {**spec, "ports": desired["spec"]["ports"]}}
        else:
            if same_content(current, desired, keys):
                return
            body = {**current, **{k: v for k, v in desired.items() if k != "metadata"}}
            body["metadata"] = {**current["metadata"], "labels": {**(current["metadata"].get("labels") or {}),
                                                                  **desired["metadata"]["labels"]}}
        with contextlib.suppress(StatusError):
            await self.server.update(res, "default", name, body, user, {})
