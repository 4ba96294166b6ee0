"""The built-in resource kinds kplane serves: identity, scope, verbs, table columns, defaults, validation.

One :class:`Resource` per (group, version, plural). The apiserver is generic over this table; adding a kind is
adding an entry here.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kplane.api import meta
from kplane.api.meta import Cause

Obj = dict[str, Any]

ALL_VERBS = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]


@dataclass(frozen=True)
class Column:
    name: str
    type: str = "string"
    format: str = ""
    description: str = ""
    priority: int = 0


@dataclass
class Resource:
    group: str
    version: str
    kind: str
    plural: str
    namespaced: bool
    schema: str  # definition name in schemas.json
    short_names: list[str] = field(default_factory=list)
    verbs: list[str] = field(default_factory=lambda: list(ALL_VERBS))
    subresources: dict[str, tuple[str, list[str]]] = field(default_factory=dict)  # name -> (kind, verbs)
    categories: list[str] = field(default_factory=list)
    columns: list[Column] = field(default_factory=list)
    cells: Callable[[Obj], list[Any]] | None = None
    default: Callable[[Obj], None] | None = None
    validate: Callable[[Obj], list[Cause]] | None = None
    validate_update: Callable[[Obj, Obj], list[Cause]] | None = None  # (old, new): immutable fields
    label_name: bool = False  # metadata.name must be a DNS-1123 label (not a subdomain)
    segment_name: bool = False  # metadata.name need only be a valid path segment (RBAC, CSRs: "system:node")
    field_selectors: set[str] = field(default_factory=set)
    has_status: bool = False
    virtual: bool = False  # create-only review kinds: nothing stored

    @property
    def singular(self) -> str:
        return self.kind.lower()

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def group_resource(self) -> str:
        return f"{self.plural}.{self.group}" if self.group else self.plural

    def key(self, namespace: str | None, name: str) -> str:
        g = self.group or "core"
        return f"/registry/{g}/{self.plural}/{namespace}/{name}" if self.namespaced else f"/registry/{g}/{self.plural}/{name}"

    def prefix(self, namespace: str | None) -> str:
        g = self.group or "core"
        if self.namespaced and namespace:
            return f"/registry/{g}/{self.plural}/{namespace}/"
        return f"/registry/{g}/{self.plural}/"

    def all_field_selectors(self) -> set[str]:
        base = {"metadata.name"}
        if self.namespaced:
            base.add("metadata.namespace")
        return base | self.field_selectors


NAME_COL = Column("Name", format="name", description="Name must be unique within a namespace.")
AGE_COL = Column("Age", description="CreationTimestamp is a timestamp representing the server time when this object was created.")


def _name(o: Obj) -> str:
    return str(o.get("metadata", {}).get("name", ""))


def _causes_if(cond: bool, f: str, reason: str, msg: str) -> list[Cause]:
    return [(f, reason, msg)] if cond else []


# --- namespaces --------------------------------------------------------------------------------------------


def _ns_default(o: Obj) -> None:
    o.setdefault("spec", {}).setdefault("finalizers", ["kubernetes"])
    o.setdefault("status", {}).setdefault("phase", "Active")
    o["metadata"].setdefault("labels", {})["kubernetes.io/metadata.name"] = _name(o)


# --- nodes -------------------------------------------------------------------------------------------------


def _node_cells(o: Obj) -> list[Any]:
    st = o.get("status", {})
    ready = "Unknown"
    for c in st.get("conditions") or []:
        if c.get("type") == "Ready":
            ready = "Ready" if c.get("status") == "True" else "NotReady"
    status = ready
    if o.get("spec", {}).get("unschedulable"):
        status += ",SchedulingDisabled"
    labels = o.get("metadata", {}).get("labels") or {}
    roles = sorted(
        k.split("/", 1)[1] for k in labels if k.startswith("node-role.kubernetes.io/") and "/" in k
    )
    if labels.get("kubernetes.io/role"):
        roles.append(labels["kubernetes.io/role"])
    info = st.get("nodeInfo") or {}
    addrs = {a.get("type"): a.get("address") for a in st.get("addresses") or []}
    return [
        _name(o),
        status,
        ",".join(roles) or "<none>",
        meta.age(o),
        info.get("kubeletVersion", ""),
        addrs.get("InternalIP", "<none>"),
        addrs.get("ExternalIP", "<none>"),
        info.get("osImage", "<unknown>"),
        info.get("kernelVersion", "<unknown>"),
        info.get("containerRuntimeVersion", "<unknown>"),
    ]


def _node_default(o: Obj) -> None:
    """v1 keeps podCIDR and podCIDRs[0] in step (as upstream's conversion does)."""
    spec = o.get("spec")
    if not isinstance(spec, dict):
        return
    cidrs = spec.get("podCIDRs")
    if spec.get("podCIDR") and not cidrs:
        spec["podCIDRs"] = [spec["podCIDR"]]
    elif isinstance(cidrs, list) and cidrs and not spec.get("podCIDR"):
        spec["podCIDR"] = cidrs[0]


def _node_validate(o: Obj) -> list[Cause]:
    import ipaddress

    spec = o.get("spec") or {}
    if not isinstance(spec, dict):
        return [("spec", "FieldValueInvalid", "Invalid value: must be an object")]
    causes: list[Cause] = []
    cidrs = spec.get("podCIDRs") or []
    if not isinstance(cidrs, list):
        return [("spec.podCIDRs", "FieldValueInvalid", "Invalid value: must be a list")]
    families = []
    for i, c in enumerate(cidrs):
        try:
            families.append(ipaddress.ip_network(str(c), strict=False).version)
        except ValueError:
            causes.append((f"spec.podCIDRs[{i}]", "FieldValueInvalid", f'Invalid value: "{c}": must be a valid CIDR'))
    if len(cidrs) > 2:
        causes.append(("spec.podCIDRs", "FieldValueTooMany", "Too many: may contain at most 2 items"))
    elif len(families) == 2 and families[0] == families[1]:
        causes.append(("spec.podCIDRs", "FieldValueInvalid",
                       "Invalid value: may specify no more than one CIDR for each IP family"))
    if spec.get("podCIDR") and cidrs and spec["podCIDR"] != cidrs[0]:
        causes.append(("spec.podCIDRs", "FieldValueInvalid",
                       f'Invalid value: "{cidrs[0]}": must match spec.podCIDR ("{spec["podCIDR"]}")'))
    return causes


def _node_validate_update(old: Obj, new: Obj) -> list[Cause]:
    """The node IPAM controller may assign a CIDR to a node that has none; after that it is immutable."""
    was = (old.get("spec") or {}).get("podCIDRs") or []
    now = (new.get("spec") or {}).get("podCIDRs") or []
    if was and was != now:
        return [("spec.podCIDRs", "FieldValueForbidden",
                 'Forbidden: node updates may not change podCIDR except from "" to valid')]
    return []


# --- pods --------------------------------------------------------------------------------------------------


def _pod_default(o: Obj) -> None:
    spec = o.setdefault("spec", {})
    spec.setdefault("restartPolicy", "Always")
    spec.setdefault("terminationGracePeriodSeconds", 30)
    spec.setdefault("dnsPolicy", "ClusterFirst")
    spec.setdefault("schedulerName", "default-scheduler")
    spec.setdefault("securityContext", {})
    spec.setdefault("enableServiceLinks", True)
    spec.setdefault("preemptionPolicy", "PreemptLowerPriority")
    spec.setdefault("priority", 0)
    tolerations = spec.setdefault("tolerations", [])
    for key in ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable"):
        if not any(t.get("key") == key for t in tolerations if isinstance(t, dict)):
            tolerations.append(
                {"key": key, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}
            )
    for kind in ("initContainers", "containers"):
        for c in spec.get(kind) or []:
            if not isinstance(c, dict):
                continue
            c.setdefault("terminationMessagePath", "/dev/termination-log")
            c.setdefault("terminationMessagePolicy", "File")
            image = str(c.get("image", ""))
            tagless = ":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest")
            c.setdefault("imagePullPolicy", "Always" if tagless else "IfNotPresent")
            c.setdefault("resources", {})
            for p in c.get("ports") or []:
                if isinstance(p, dict):
                    p.setdefault("protocol", "TCP")
    st = o.setdefault("status", {})
    st.setdefault("phase", "Pending")
    st.setdefault("qosClass", "BestEffort")


def _pod_validate(o: Obj) -> list[Cause]:
    spec = o.get("spec")
    if not isinstance(spec, dict):
        return [("spec", "FieldValueRequired", "Required value")]
    causes: list[Cause] = []
    containers = spec.get("containers")
    if not isinstance(containers, list) or not containers:
        causes.append(("spec.containers", "FieldValueRequired", "Required value"))
        containers = []
    seen: set[str] = set()
    for kind in ("initContainers", "containers"):
        for i, c in enumerate(spec.get(kind) or []):
            path = f"spec.{kind}[{i}]"
            if not isinstance(c, dict):
                causes.append((path, "FieldValueInvalid", "Invalid value: must be an object"))
                continue
            causes += meta.name_causes(c.get("name"), label=True, field=f"{path}.name")
            if c.get("name") in seen:
                causes.append((f"{path}.name", "FieldValueDuplicate", f'Duplicate value: "{c.get("name")}"'))
            seen.add(str(c.get("name")))
            if not c.get("image"):
                causes.append((f"{path}.image", "FieldValueRequired", "Required value"))
            for j, p in enumerate(c.get("ports") or []):
                cp = p.get("containerPort") if isinstance(p, dict) else None
                if not isinstance(cp, int) or not 0 < cp < 65536:
                    causes.append(
                        (f"{path}.ports[{j}].containerPort", "FieldValueInvalid",
                         f"Invalid value: {cp}: must be between 1 and 65535, inclusive")
                    )
    rp = spec.get("restartPolicy")
    if rp not in ("Always", "OnFailure", "Never"):
        causes.append(("spec.restartPolicy", "FieldValueNotSupported",
                       f'Unsupported value: "{rp}": supported values: "Always", "OnFailure", "Never"'))
    vols: set[str] = set()
    for i, v in enumerate(spec.get("volumes") or []):
        if not isinstance(v, dict):
            causes.append((f"spec.volumes[{i}]", "FieldValueInvalid", "Invalid value: must be an object"))
            continue
        causes += meta.name_causes(v.get("name"), label=True, field=f"spec.volumes[{i}].name")
        vols.add(str(v.get("name")))
    for kind in ("initContainers", "containers"):
        for i, c in enumerate(spec.get(kind) or []):
            for j, m in enumerate((c.get("volumeMounts") if isinstance(c, dict) else None) or []):
                if not isinstance(m, dict) or m.get("name") not in vols:
                    causes.append((f"spec.{kind}[{i}].volumeMounts[{j}].name", "FieldValueNotFound",
                                   f'Not found: "{m.get("name") if isinstance(m, dict) else m}"'))
    return causes


def _pod_cells(o: Obj) -> list[Any]:
    spec, st = o.get("spec", {}), o.get("status", {})
    statuses = st.get("containerStatuses") or []
    total = len(spec.get("containers") or [])
    ready = sum(1 for c in statuses if c.get("ready"))
    restarts = sum(int(c.get("restartCount", 0)) for c in statuses)
    reason = st.get("reason") or st.get("phase") or "Pending"
    for c in statuses:
        state = c.get("state") or {}
        if "waiting" in state and state["waiting"].get("reason"):
            reason = state["waiting"]["reason"]
        elif "terminated" in state:
            t = state["terminated"]
            reason = t.get("reason") or (
                f"Signal:{t['signal']}" if t.get("signal") else f"ExitCode:{t.get('exitCode', 0)}"
            )
    if reason == "Running" and ready < total:
        reason = "Running" if st.get("phase") == "Running" else reason
    if o.get("metadata", {}).get("deletionTimestamp"):
        reason = "Terminating"
    restart_text = str(restarts)
    gates = spec.get("readinessGates") or []
    return [
        _name(o),
        f"{ready}/{total}",
        reason,
        restart_text,
        meta.age(o),
        st.get("podIP") or "<none>",
        spec.get("nodeName") or "<none>",
        st.get("nominatedNodeName") or "<none>",
        f"0/{len(gates)}" if gates else "<none>",
    ]


# --- services ----------------------------------------------------------------------------------------------


def _svc_default(o: Obj) -> None:
    spec = o.setdefault("spec", {})
    spec.setdefault("type", "ClusterIP")
    spec.setdefault("sessionAffinity", "None")
    spec.setdefault("internalTrafficPolicy", "Cluster")
    spec.setdefault("ipFamilyPolicy", "SingleStack")
    spec.setdefault("ipFamilies", ["IPv4"])
    for p in spec.get("ports") or []:
        if isinstance(p, dict):
            p.setdefault("protocol", "TCP")
            p.setdefault("targetPort", p.get("port"))
    o.setdefault("status", {}).setdefault("loadBalancer", {})


def _svc_validate(o: Obj) -> list[Cause]:
    spec = o.get("spec")
    if not isinstance(spec, dict):
        return [("spec", "FieldValueRequired", "Required value")]
    causes: list[Cause] = []
    t = spec.get("type")
    if t not in ("ClusterIP", "NodePort", "LoadBalancer", "ExternalName"):
        causes.append(("spec.type", "FieldValueNotSupported", f'Unsupported value: "{t}"'))
    ports = spec.get("ports") or []
    if not ports and t != "ExternalName" and spec.get("clusterIP") != "None":
        causes.append(("spec.ports", "FieldValueRequired", "Required value"))
    names: set[str] = set()
    for i, p in enumerate(ports):
        if not isinstance(p, dict):
            causes.append((f"spec.ports[{i}]", "FieldValueInvalid", "Invalid value: must be an object"))
            continue
        port = p.get("port")
        if not isinstance(port, int) or not 0 < port < 65536:
            causes.append((f"spec.ports[{i}].port", "FieldValueInvalid",
                           f"Invalid value: {port}: must be between 1 and 65535, inclusive"))
        if len(ports) > 1 and not p.get("name"):
            causes.append((f"spec.ports[{i}].name", "FieldValueRequired", "Required value"))
        if p.get("name") in names:
            causes.append((f"spec.ports[{i}].name", "FieldValueDuplicate", f'Duplicate value: "{p.get("name")}"'))
        names.add(str(p.get("name")))
    return causes


def _svc_cells(o: Obj) -> list[Any]:
    spec = o.get("spec", {})
    ports = []
    for p in spec.get("ports") or []:
        s = f"{p.get('port')}"
        if p.get("nodePort"):
            s += f":{p['nodePort']}"
        ports.append(f"{s}/{p.get('protocol', 'TCP')}")
    ext = spec.get("externalIPs") or []
    lb = [i.get("ip") or i.get("hostname") for i in (o.get("status", {}).get("loadBalancer", {}).get("ingress") or [])]
    external = ",".join(ext + lb) or ("<pending>" if spec.get("type") == "LoadBalancer" else "<none>")
    if spec.get("type") == "ExternalName":
        external = spec.get("externalName", "<none>")
    sel = spec.get("selector") or {}
    return [
        _name(o),
        spec.get("type", ""),
        spec.get("clusterIP") or "<none>",
        external,
        ",".join(ports) or "<none>",
        meta.age(o),
        ",".join(f"{k}={v}" for k, v in sorted(sel.items())) or "<none>",
    ]


def _endpoints_cells(o: Obj) -> list[Any]:
    items = []
    for s in o.get("subsets") or []:
        for a in s.get("addresses") or []:
            for p in s.get("ports") or [{}]:
                items.append(f"{a.get('ip')}:{p.get('port')}" if p.get("port") else str(a.get("ip")))
    text = ",".join(items[:3]) + (f" + {len(items) - 3} more..." if len(items) > 3 else "")
    return [_name(o), text or "<none>", meta.age(o)]


# --- configmaps / secrets ----------------------------------------------------------------------------------


def _data_key_causes(keys: Any, field_name: str) -> list[Cause]:
    causes: list[Cause] = []
    for k in keys:
        if not isinstance(k, str) or not k or len(k) > 253 or not all(c.isalnum() or c in "-._" for c in k):
            causes.append((f"{field_name}[{k}]", "FieldValueInvalid",
                           f"Invalid value: \"{k}\": a valid config key must consist of alphanumeric "
                           "characters, '-', '_' or '.'"))
    return causes


def _cm_validate(o: Obj) -> list[Cause]:
    causes: list[Cause] = []
    for f in ("data", "binaryData"):
        d = o.get(f)
        if d is None:
            continue
        if not isinstance(d, dict) or not all(isinstance(v, str) for v in d.values()):
            causes.append((f, "FieldValueInvalid", "Invalid value: must be a map of strings"))
            continue
        causes += _data_key_causes(d.keys(), f)
    size = sum(len(k) + len(v) for f in ("data", "binaryData") for k, v in (o.get(f) or {}).items()
               if isinstance(v, str))
    if size > 1024 * 1024:
        causes.append(("data", "FieldValueTooLong", "Too long: must have at most 1048576 bytes"))
    return causes


def _secret_default(o: Obj) -> None:
    o.setdefault("type", "Opaque")
    sd = o.pop("stringData", None)
    if isinstance(sd, dict):
        data = o.setdefault("data", {})
        for k, v in sd.items():
            data[k] = base64.b64encode(str(v).encode()).decode()


def _secret_validate(o: Obj) -> list[Cause]:
    causes: list[Cause] = []
    d = o.get("data") or {}
    if not isinstance(d, dict):
        return [("data", "FieldValueInvalid", "Invalid value: must be a map of base64 strings")]
    causes += _data_key_causes(d.keys(), "data")
    for k, v in d.items():
        try:
            base64.b64decode(v, validate=True)
        except (binascii.Error, TypeError, ValueError):
            causes.append((f"data[{k}]", "FieldValueInvalid", "Invalid value: must be base64-encoded"))
    if o.get("type") == "kubernetes.io/service-account-token":
        ann = o.get("metadata", {}).get("annotations") or {}
        if not ann.get("kubernetes.io/service-account.name"):
            causes.append(("metadata.annotations[kubernetes.io/service-account.name]", "FieldValueRequired",
                           "Required value"))
    return causes


# --- events ------------------------------------------------------------------------------------------------


def _event_cells(o: Obj) -> list[Any]:
    inv = o.get("involvedObject") or {}
    last = o.get("lastTimestamp") or o.get("eventTime") or o.get("metadata", {}).get("creationTimestamp")
    ts = meta.parse_time(last)
    from datetime import UTC, datetime

    seen = meta.human_duration((datetime.now(UTC) - ts).total_seconds()) if ts else "<unknown>"
    obj = f"{str(inv.get('kind', '')).lower()}/{inv.get('name', '')}"
    return [seen, o.get("type", ""), o.get("reason", ""), obj, o.get("message", "")]


# --- rbac --------------------------------------------------------------------------------------------------


def _rules_causes(rules: Any, path: str) -> list[Cause]:
    causes: list[Cause] = []
    if rules is None:
        return causes
    if not isinstance(rules, list):
        return [(path, "FieldValueInvalid", "Invalid value: must be a list")]
    for i, r in enumerate(rules):
        if not isinstance(r, dict):
            causes.append((f"{path}[{i}]", "FieldValueInvalid", "Invalid value: must be an object"))
            continue
        if not r.get("verbs"):
            causes.append((f"{path}[{i}].verbs", "FieldValueRequired", "Required value: verbs must contain at least one value"))
        if r.get("nonResourceURLs") and r.get("resources"):
            causes.append((f"{path}[{i}].nonResourceURLs", "FieldValueInvalid",
                           "Invalid value: rules cannot apply to both regular resources and non-resource URLs"))
        if not r.get("nonResourceURLs") and not r.get("resources"):
            causes.append((f"{path}[{i}].resources", "FieldValueRequired", "Required value: resource rules must supply at least one resource"))
    return causes


def _binding_validate(o: Obj) -> list[Cause]:
    causes: list[Cause] = []
    ref = o.get("roleRef")
    if not isinstance(ref, dict):
        return [("roleRef", "FieldValueRequired", "Required value")]
    if ref.get("apiGroup") != "rbac.authorization.k8s.io":
        causes.append(("roleRef.apiGroup", "FieldValueNotSupported", 'Unsupported value: supported values: "rbac.authorization.k8s.io"'))
    if ref.get("kind") not in ("Role", "ClusterRole"):
        causes.append(("roleRef.kind", "FieldValueNotSupported", 'Unsupported value: supported values: "Role", "ClusterRole"'))
    if o.get("kind") == "ClusterRoleBinding" and ref.get("kind") == "Role":
        causes.append(("roleRef.kind", "FieldValueNotSupported", 'Unsupported value: "Role": supported values: "ClusterRole"'))
    if not ref.get("name"):
        causes.append(("roleRef.name", "FieldValueRequired", "Required value"))
    for i, s in enumerate(o.get("subjects") or []):
        if not isinstance(s, dict) or s.get("kind") not in ("User", "Group", "ServiceAccount"):
            causes.append((f"subjects[{i}].kind", "FieldValueNotSupported",
                           'Unsupported value: supported values: "ServiceAccount", "User", "Group"'))
        elif not s.get("name"):
            causes.append((f"subjects[{i}].name", "FieldValueRequired", "Required value"))
        elif s["kind"] == "ServiceAccount" and not s.get("namespace") and o.get("kind") == "ClusterRoleBinding":
            causes.append((f"subjects[{i}].namespace", "FieldValueRequired", "Required value"))
    return causes


def _binding_default(o: Obj) -> None:
    for s in o.get("subjects") or []:
        if isinstance(s, dict) and s.get("kind") in ("User", "Group"):
            s.setdefault("apiGroup", "rbac.authorization.k8s.io")


def _rolebinding_cells(o: Obj) -> list[Any]:
    ref = o.get("roleRef") or {}
    subjects = o.get("subjects") or []

    def of(kind: str) -> str:
        names = [
            (f"{s.get('namespace')}/{s.get('name')}" if kind == "ServiceAccount" else str(s.get("name")))
            for s in subjects
            if s.get("kind") == kind
        ]
        return ", ".join(names)

    return [_name(o), f"{ref.get('kind')}/{ref.get('name')}", meta.age(o), of("User"), of("Group"), of("ServiceAccount")]


# --- certificates ------------------------------------------------------------------------------------------


def _csr_validate(o: Obj) -> list[Cause]:
    spec = o.get("spec")
    if not isinstance(spec, dict):
        return [("spec", "FieldValueRequired", "Required value")]
    causes: list[Cause] = []
    req = spec.get("request")
    if not isinstance(req, str) or not req:
        causes.append(("spec.request", "FieldValueRequired", "Required value"))
    else:
        try:
            pem = base64.b64decode(req, validate=True)
            if b"CERTIFICATE REQUEST" not in pem:
                raise ValueError
            from cryptography import x509

            x509.load_pem_x509_csr(pem)
        except (ValueError, binascii.Error, TypeError):
            causes.append(("spec.request", "FieldValueInvalid", "Invalid value: []byte{...}: PEM block type must be CERTIFICATE REQUEST"))
    signer = spec.get("signerName")
    if not isinstance(signer, str) or "/" not in signer:
        causes.append(("spec.signerName", "FieldValueInvalid", "Invalid value: must be a fully qualified domain and path of the form 'example.com/signer-name'"))
    usages = spec.get("usages")
    if not isinstance(usages, list) or not usages:
        causes.append(("spec.usages", "FieldValueRequired", "Required value"))
    es = spec.get("expirationSeconds")
    if es is not None and (not isinstance(es, int) or es < 600):
        causes.append(("spec.expirationSeconds", "FieldValueInvalid", f"Invalid value: {es}: may not specify a duration less than 600 seconds (10 minutes)"))
    return causes


def _csr_cells(o: Obj) -> list[Any]:
    spec, st = o.get("spec", {}), o.get("status", {})
    conds = [c.get("type") for c in st.get("conditions") or []]
    cond = ",".join(conds) if conds else "Pending"
    if st.get("certificate") and "Approved" in conds:
        cond += ",Issued"
    es = spec.get("expirationSeconds")
    return [_name(o), meta.age(o), spec.get("signerName", ""), spec.get("username", ""),
            meta.human_duration(es) if es else "<none>", cond]


# --- the table ---------------------------------------------------------------------------------------------

_CORE = ""
_RBAC = "rbac.authorization.k8s.io"


def _simple(cols: list[Column], fn: Callable[[Obj], list[Any]]) -> dict[str, Any]:
    return {"columns": cols, "cells": fn}


RESOURCES: list[Resource] = [
    Resource(_CORE, "v1", "Namespace", "namespaces", False, "V1Namespace", short_names=["ns"],
             verbs=["create", "delete", "get", "list", "patch", "update", "watch"],
             subresources={"status": ("Namespace", ["get", "patch", "update"]),
                           "finalize": ("Namespace", ["update"])},
             columns=[NAME_COL, Column("Status", description="The status of the namespace"), AGE_COL],
             cells=lambda o: [_name(o), o.get("status", {}).get("phase", ""), meta.age(o)],
             default=_ns_default, label_name=True, field_selectors={"status.phase"}, has_status=True),
    Resource(_CORE, "v1", "Node", "nodes", False, "V1Node", short_names=["no"],
             subresources={"status": ("Node", ["get", "patch", "update"]), "proxy": ("NodeProxyOptions", [
                 "create", "delete", "get", "patch", "update"])},
             columns=[NAME_COL, Column("Status"), Column("Roles"), AGE_COL, Column("Version"),
                      Column("Internal-IP", priority=1), Column("External-IP", priority=1),
                      Column("OS-Image", priority=1), Column("Kernel-Version", priority=1),
                      Column("Container-Runtime", priority=1)],
             cells=_node_cells, field_selectors={"spec.unschedulable"}, has_status=True,
             default=_node_default, validate=_node_validate, validate_update=_node_validate_update),
    Resource(_CORE, "v1", "Pod", "pods", True, "V1Pod", short_names=["po"], categories=["all"],
             subresources={"status": ("Pod", ["get", "patch", "update"]), "binding": ("Binding", ["create"]),
                           "eviction": ("Eviction", ["create"]), "log": ("Pod", ["get"]),
                           "exec": ("PodExecOptions", ["create", "get"]),
                           "attach": ("PodAttachOptions", ["create", "get"]),
                           "portforward": ("PodPortForwardOptions", ["create", "get"]),
                           "proxy": ("PodProxyOptions", ["create", "delete", "get", "patch", "update"])},
             columns=[NAME_COL, Column("Ready", description="The aggregate readiness state of this pod for accepting traffic."),
                      Column("Status", description="The aggregate status of the containers in this pod."),
                      Column("Restarts", description="The number of times the containers in this pod have been restarted and when the last container in this pod has restarted."),
                      AGE_COL, Column("IP", priority=1), Column("Node", priority=1),
                      Column("Nominated Node", priority=1), Column("Readiness Gates", priority=1)],
             cells=_pod_cells, default=_pod_default, validate=_pod_validate,
             field_selectors={"spec.nodeName", "spec.restartPolicy", "spec.schedulerName", "spec.serviceAccountName",
                              "spec.hostNetwork", "status.phase", "status.podIP", "status.nominatedNodeName"},
             has_status=True),
    Resource(_CORE, "v1", "Binding", "bindings", True, "V1Binding", verbs=["create"], virtual=True),
    Resource(_CORE, "v1", "Service", "services", True, "V1Service", short_names=["svc"], categories=["all"],
             subresources={"status": ("Service", ["get", "patch", "update"]),
                           "proxy": ("ServiceProxyOptions", ["create", "delete", "get", "patch", "update"])},
             columns=[NAME_COL, Column("Type"), Column("Cluster-IP"), Column("External-IP"), Column("Port(s)"),
                      AGE_COL, Column("Selector", priority=1)],
             cells=_svc_cells, default=_svc_default, validate=_svc_validate, label_name=True,
             field_selectors={"spec.clusterIP", "spec.type"}, has_status=True),
    Resource(_CORE, "v1", "Endpoints", "endpoints", True, "V1Endpoints", short_names=["ep"],
             columns=[NAME_COL, Column("Endpoints"), AGE_COL], cells=_endpoints_cells),
    Resource(_CORE, "v1", "ConfigMap", "configmaps", True, "V1ConfigMap", short_names=["cm"],
             columns=[NAME_COL, Column("Data", type="integer"), AGE_COL],
             cells=lambda o: [_name(o), len(o.get("data") or {}) + len(o.get("binaryData") or {}), meta.age(o)],
             validate=_cm_validate),
    Resource(_CORE, "v1", "Secret", "secrets", True, "V1Secret",
             columns=[NAME_COL, Column("Type"), Column("Data", type="integer"), AGE_COL],
             cells=lambda o: [_name(o), o.get("type", ""), len(o.get("data") or {}), meta.age(o)],
             default=_secret_default, validate=_secret_validate, field_selectors={"type"}),
    Resource(_CORE, "v1", "ServiceAccount", "serviceaccounts", True, "V1ServiceAccount", short_names=["sa"],
             subresources={"token": ("TokenRequest", ["create"])},
             columns=[NAME_COL, Column("Secrets", type="integer"), AGE_COL],
             cells=lambda o: [_name(o), len(o.get("secrets") or []), meta.age(o)]),
    Resource(_CORE, "v1", "Event", "events", True, "CoreV1Event", short_names=["ev"],
             columns=[Column("Last Seen"), Column("Type"), Column("Reason"), Column("Object"), Column("Message")],
             cells=_event_cells,
             field_selectors={"involvedObject.kind", "involvedObject.namespace", "involvedObject.name",
                              "involvedObject.uid", "involvedObject.apiVersion", "involvedObject.resourceVersion",
                              "involvedObject.fieldPath", "reason", "reportingComponent", "source", "type"}),
    Resource("coordination.k8s.io", "v1", "Lease", "leases", True, "V1Lease",
             columns=[NAME_COL, Column("Holder"), AGE_COL],
             cells=lambda o: [_name(o), o.get("spec", {}).get("holderIdentity", ""), meta.age(o)]),
    Resource("discovery.k8s.io", "v1", "EndpointSlice", "endpointslices", True, "V1EndpointSlice",
             columns=[NAME_COL, Column("AddressType"), Column("Ports"), Column("Endpoints"), AGE_COL],
             cells=lambda o: [_name(o), o.get("addressType", ""),
                              ",".join(str(p.get("port")) for p in o.get("ports") or []) or "<unset>",
                              ",".join(a for e in o.get("endpoints") or [] for a in e.get("addresses", [])) or "<unset>",
                              meta.age(o)]),
    Resource(_RBAC, "v1", "Role", "roles", True, "V1Role",
             columns=[NAME_COL, Column("Created At", type="date")],
             cells=lambda o: [_name(o), o.get("metadata", {}).get("creationTimestamp", "")],
             validate=lambda o: _rules_causes(o.get("rules"), "rules"), segment_name=True),
    Resource(_RBAC, "v1", "ClusterRole", "clusterroles", False, "V1ClusterRole",
             columns=[NAME_COL, Column("Created At", type="date")],
             cells=lambda o: [_name(o), o.get("metadata", {}).get("creationTimestamp", "")],
             validate=lambda o: _rules_causes(o.get("rules"), "rules"), segment_name=True),
    Resource(_RBAC, "v1", "RoleBinding", "rolebindings", True, "V1RoleBinding",
             columns=[NAME_COL, Column("Role"), AGE_COL, Column("Users", priority=1), Column("Groups", priority=1),
                      Column("ServiceAccounts", priority=1)],
             cells=_rolebinding_cells, validate=_binding_validate, default=_binding_default, segment_name=True),
    Resource(_RBAC, "v1", "ClusterRoleBinding", "clusterrolebindings", False, "V1ClusterRoleBinding",
             columns=[NAME_COL, Column("Role"), AGE_COL, Column("Users", priority=1), Column("Groups", priority=1),
                      Column("ServiceAccounts", priority=1)],
             cells=_rolebinding_cells, validate=_binding_validate, default=_binding_default, segment_name=True),
    Resource("certificates.k8s.io", "v1", "CertificateSigningRequest", "certificatesigningrequests", False,
             "V1CertificateSigningRequest", short_names=["csr"],
             subresources={"status": ("CertificateSigningRequest", ["get", "patch", "update"]),
                           "approval": ("CertificateSigningRequest", ["get", "patch", "update"])},
             columns=[NAME_COL, AGE_COL, Column("SignerName"), Column("Requestor"), Column("RequestedDuration"),
                      Column("Condition")],
             cells=_csr_cells, validate=_csr_validate, field_selectors={"spec.signerName"}, has_status=True, segment_name=True),
    Resource("authentication.k8s.io", "v1", "TokenReview", "tokenreviews", False, "V1TokenReview",
             verbs=["create"], virtual=True),
    Resource("authentication.k8s.io", "v1", "SelfSubjectReview", "selfsubjectreviews", False,
             "V1SelfSubjectReview", verbs=["create"], virtual=True),
    Resource("authorization.k8s.io", "v1", "SubjectAccessReview", "subjectaccessreviews", False,
             "V1SubjectAccessReview", verbs=["create"], virtual=True),
    Resource("authorization.k8s.io", "v1", "SelfSubjectAccessReview", "selfsubjectaccessreviews", False,
             "V1SelfSubjectAccessReview", verbs=["create"], virtual=True),
    Resource("authorization.k8s.io", "v1", "LocalSubjectAccessReview", "localsubjectaccessreviews", True,
             "V1LocalSubjectAccessReview", verbs=["create"], virtual=True),
    Resource("authorization.k8s.io", "v1", "SelfSubjectRulesReview", "selfsubjectrulesreviews", False,
             "V1SelfSubjectRulesReview", verbs=["create"], virtual=True),
]

BY_PLURAL: dict[tuple[str, str, str], Resource] = {(r.group, r.version, r.plural): r for r in RESOURCES}
BY_KIND: dict[tuple[str, str], Resource] = {(r.api_version, r.kind): r for r in RESOURCES if r.plural != "bindings"}


def group_versions() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for r in RESOURCES:
        vs = out.setdefault(r.group, [])
        if r.version not in vs:
            vs.append(r.version)
    return out


def lookup(group: str, version: str, plural: str) -> Resource | None:
    return BY_PLURAL.get((group, version, plural))
