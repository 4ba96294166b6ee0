"""What kube-proxy programs: ClusterIP service ports and their ready endpoints, as plain validated values.

Theory of operation. The API objects (Services and EndpointSlices) are untrusted input: anyone who can create a
Service or an EndpointSlice in any namespace chooses the strings and numbers that end up in the node's packet
filter. So the rule renderers never see API objects. ``from_api`` turns them into ``ServicePort`` values, skipping
(and explaining) anything that does not fit; ``validate`` then checks the whole set once more, strictly, and the
renderers only interpolate values that passed it: names matching DNS-label syntax (so no quotes, braces, spaces,
semicolons or newlines can reach an nft or iptables script), canonical dotted-quad IPv4 addresses, and ports in
1..65535. Anything else raises ``RuleError``; nothing is escaped, because nothing needs to be.

Only IPv4 ClusterIPs with TCP or UDP ports are handled (no NodePorts, external IPs, load balancers, session
affinity or traffic policies).
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

PROTOCOLS = ("TCP", "UDP")
MAX_ENDPOINTS_PER_PORT = 4096  # a numgen/statistic fan-out beyond this is a mistake, not a service
MAX_SERVICE_PORTS = 100_000
SERVICE_NAME_LABEL = "kubernetes.io/service-name"

_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


class RuleError(ValueError):
    """A service port or endpoint that must not be turned into packet-filter rules."""


@dataclass(frozen=True, slots=True, order=True)
class Endpoint:
    ip: str
    port: int


@dataclass(frozen=True, slots=True)
class ServicePort:
    namespace: str
    service: str
    port_name: str  # "" for a single unnamed port
    protocol: str  # "TCP" | "UDP"
    cluster_ip: str
    port: int
    endpoints: tuple[Endpoint, ...] = ()

    @property
    def display(self) -> str:
        """``ns/name:port`` as upstream names a service port in logs."""
        return f"{self.namespace}/{self.service}:{self.port_name}"

    @property
    def sort_key(self) -> tuple[str, str, str, int]:
        return self.namespace, self.service, self.protocol, self.port


def table_name(node_name: str, cluster_id: str) -> str:
    """The node's own table: several nodes, agents and test clusters can share one network namespace."""
    digest = hashlib.sha256(f"{cluster_id}\n{node_name}".encode()).hexdigest()
    return f"kplane-proxy-{digest[:8]}"


# --- validation -------------------------------------------------------------------------------------------


def check_label(value: object, what: str, *, empty_ok: bool = False) -> str:
    if not isinstance(value, str):
        raise RuleError(f"{what} must be a string, not {type(value).__name__}")
    if value == "" and empty_ok:
        return value
    if not _LABEL.fullmatch(value):
        raise RuleError(f"{what} {value!r} is not a DNS label (lower-case letters, digits and '-', at most 63)")
    return value


def check_ipv4(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise RuleError(f"{what} must be a string, not {type(value).__name__}")
    try:
        addr = ipaddress.IPv4Address(value)
    except ValueError:
        raise RuleError(f"{what} {value!r} is not an IPv4 address") from None
    if str(addr) != value:
        raise RuleError(f"{what} {value!r} is not in canonical dotted-quad form")
    if addr.is_unspecified or addr.is_loopback or addr.is_multicast or addr.is_link_local or addr.is_reserved:
        raise RuleError(f"{what} {value} is not a usable unicast address")
    return value


def check_port(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RuleError(f"{what} must be an integer, not {type(value).__name__}")
    if not 1 <= value <= 65535:
        raise RuleError(f"{what} {value} is out of range 1-65535")
    return value


def check_protocol(value: object, what: str) -> str:
    if value not in PROTOCOLS:
        raise RuleError(f"{what} {value!r} is not supported (TCP or UDP)")
    return str(value)


def validate(ports: Sequence[ServicePort]) -> list[ServicePort]:
    """Check every value a renderer will interpolate; return the ports in rendering order."""
    if len(ports) > MAX_SERVICE_PORTS:
        raise RuleError(f"{len(ports)} service ports is more than the limit of {MAX_SERVICE_PORTS}")
    seen_keys: dict[tuple[str, str, str, int], str] = {}
    seen_vips: dict[tuple[str, str, int], str] = {}
    for sp in ports:
        if not isinstance(sp, ServicePort):
            raise RuleError(f"not a ServicePort: {type(sp).__name__}")
        check_label(sp.namespace, "namespace")
        check_label(sp.service, "service name")
        check_label(sp.port_name, "port name", empty_ok=True)
        check_protocol(sp.protocol, f"{sp.namespace}/{sp.service} protocol")
        check_ipv4(sp.cluster_ip, f"{sp.display} clusterIP")
        check_port(sp.port, f"{sp.display} port")
        if not isinstance(sp.endpoints, tuple):
            raise RuleError(f"{sp.display}: endpoints must be a tuple")
        if len(sp.endpoints) > MAX_ENDPOINTS_PER_PORT:
            raise RuleError(f"{sp.display}: {len(sp.endpoints)} endpoints is more than the limit of "
                            f"{MAX_ENDPOINTS_PER_PORT}")
        eps: set[Endpoint] = set()
        for ep in sp.endpoints:
            if not isinstance(ep, Endpoint):
                raise RuleError(f"{sp.display}: not an Endpoint: {type(ep).__name__}")
            check_ipv4(ep.ip, f"{sp.display} endpoint")
            check_port(ep.port, f"{sp.display} endpoint {ep.ip} port")
            if ep in eps:
                raise RuleError(f"{sp.display}: endpoint {ep.ip}:{ep.port} is listed twice")
            eps.add(ep)
        key = sp.sort_key
        if key in seen_keys:
            raise RuleError(f"{sp.display}: {sp.protocol} port {sp.port} is defined twice")
        seen_keys[key] = sp.display
        vip = (sp.cluster_ip, sp.protocol, sp.port)
        if vip in seen_vips:
            raise RuleError(f"{sp.display}: {sp.cluster_ip} {sp.protocol}/{sp.port} is already used by "
                            f"{seen_vips[vip]}")
        seen_vips[vip] = sp.display
    return sorted(ports, key=lambda p: p.sort_key)


def sorted_endpoints(sp: ServicePort) -> list[Endpoint]:
    return sorted(sp.endpoints, key=lambda e: (ipaddress.IPv4Address(e.ip), e.port))


# --- from the API -----------------------------------------------------------------------------------------


def _map(value: object) -> Mapping[str, Any]:
    """The mapping, or an empty one for anything else (API objects are input, not promises)."""
    return value if isinstance(value, Mapping) else {}


def _list(value: object) -> list[Any]:
    return value if isinstance(value, list) else []


def _ready(ep: Mapping[str, Any]) -> bool:
    cond = ep.get("conditions")
    return not (isinstance(cond, Mapping) and cond.get("ready") is False)


def from_api(services: Iterable[Mapping[str, Any]], slices: Iterable[Mapping[str, Any]]
             ) -> tuple[list[ServicePort], list[str]]:
    """Services and EndpointSlices (as the API returns them) to validated service ports, plus a list of what was
    skipped and why. One bad object never hides the others."""
    problems: list[str] = []
    # (namespace, service) -> (port name, protocol) -> endpoints
    ready: dict[tuple[str, str], dict[tuple[str, str], set[Endpoint]]] = {}
    for sl in slices:
        sl = _map(sl)
        meta = _map(sl.get("metadata"))
        ns, name = meta.get("namespace"), meta.get("name")
        svc = _map(meta.get("labels")).get(SERVICE_NAME_LABEL)
        if not isinstance(svc, str) or not isinstance(ns, str) or sl.get("addressType") != "IPv4":
            continue
        per_port = ready.setdefault((ns, svc), {})
        for p in _list(sl.get("ports")):
            if not isinstance(p, Mapping):
                continue
            pname, proto = p.get("name") or "", p.get("protocol") or "TCP"
            try:
                num = check_port(p.get("port"), f"endpointslice {ns}/{name} port {pname!r}")
            except RuleError as exc:
                problems.append(str(exc))
                continue
            bucket = per_port.setdefault((str(pname), str(proto)), set())
            for ep in _list(sl.get("endpoints")):
                if not isinstance(ep, Mapping) or not _ready(ep):
                    continue
                addrs = ep.get("addresses") or []
                if not isinstance(addrs, list) or not addrs:
                    continue
                try:  # upstream uses the first address of an endpoint
                    bucket.add(Endpoint(check_ipv4(addrs[0], f"endpointslice {ns}/{name} address"), num))
                except RuleError as exc:
                    problems.append(str(exc))
    out: list[ServicePort] = []
    used: dict[tuple[str, str, int], str] = {}
    svcs = [_map(s) for s in services]
    seen: set[tuple[str, str]] = set()
    for svc in sorted(svcs, key=lambda s: (str(_map(s.get("metadata")).get("namespace")),
                                           str(_map(s.get("metadata")).get("name")))):
        meta = _map(svc.get("metadata"))
        key = (str(meta.get("namespace")), str(meta.get("name")))
        if key in seen and all(isinstance(meta.get(k), str) for k in ("namespace", "name")):
            problems.append(f"service {key[0]}/{key[1]} is listed twice; the first is used")
            continue
        seen.add(key)
        out.extend(_service_ports(svc, ready, used, problems))
    return out, problems


def _service_ports(svc: Mapping[str, Any], ready: dict[tuple[str, str], dict[tuple[str, str], set[Endpoint]]],
                   used: dict[tuple[str, str, int], str], problems: list[str]) -> list[ServicePort]:
    meta = _map(svc.get("metadata"))
    spec = _map(svc.get("spec"))
    ns, name = meta.get("namespace"), meta.get("name")
    if spec.get("type") == "ExternalName":
        return []
    ips = _list(spec.get("clusterIPs")) or [spec.get("clusterIP")]
    ips = [ip for ip in ips if isinstance(ip, str) and ip not in ("", "None") and ":" not in ip]
    if not ips:
        return []  # headless, not allocated yet, or IPv6 only
    try:
        check_label(ns, "namespace")
        check_label(name, "service name")
        vip = check_ipv4(ips[0], f"service {ns}/{name} clusterIP")
    except RuleError as exc:
        problems.append(str(exc))
        return []
    out: list[ServicePort] = []
    seen: set[tuple[str, int]] = set()
    for p in _list(spec.get("ports")):
        if not isinstance(p, Mapping):
            continue
        pname = p.get("name") or ""
        try:
            check_label(pname, f"service {ns}/{name} port name", empty_ok=True)
            proto = check_protocol(p.get("protocol") or "TCP", f"service {ns}/{name} port {pname!r} protocol")
            num = check_port(p.get("port"), f"service {ns}/{name} port {pname!r}")
        except RuleError as exc:
            problems.append(str(exc))
            continue
        display = f"{ns}/{name}:{pname}"
        if (proto, num) in seen:
            problems.append(f"{display}: {proto} port {num} is defined twice")
            continue
        seen.add((proto, num))
        owner = used.get((vip, proto, num))
        if owner is not None:
            problems.append(f"{display}: {vip} {proto}/{num} is already used by {owner}")
            continue
        used[(vip, proto, num)] = display
        eps = sorted(ready.get((str(ns), str(name)), {}).get((pname, proto), set()),
                     key=lambda e: (ipaddress.IPv4Address(e.ip), e.port))
        if len(eps) > MAX_ENDPOINTS_PER_PORT:
            problems.append(f"{display}: {len(eps)} ready endpoints, only the first {MAX_ENDPOINTS_PER_PORT} used")
            eps = eps[:MAX_ENDPOINTS_PER_PORT]
        out.append(ServicePort(str(ns), str(name), pname, proto, vip, num, tuple(eps)))
    return out
