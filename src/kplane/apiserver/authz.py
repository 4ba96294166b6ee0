"""Authorization: a union chain of the privileged-group check (``system:masters``), the Node authorizer and RBAC.

Each authorizer answers ALLOW or NO_OPINION; all NO_OPINION is a 403. RBAC objects are read from an in-memory
index that a watch on the store keeps current.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kplane.apiserver.authn import UserInfo

if TYPE_CHECKING:
    from kplane.storage.base import Store

log = logging.getLogger(__name__)

RBAC_PREFIX = "/registry/rbac.authorization.k8s.io/"


@dataclass(frozen=True)
class Attributes:
    user: UserInfo
    verb: str
    resource_request: bool
    path: str = ""
    namespace: str = ""
    api_group: str = ""
    api_version: str = ""
    resource: str = ""
    subresource: str = ""
    name: str = ""
    field_selector: str = ""

    def describe(self) -> str:
        if not self.resource_request:
            return f'User "{self.user.name}" cannot {self.verb} path "{self.path}"'
        res = self.resource + (f"/{self.subresource}" if self.subresource else "")
        grp = f'in API group "{self.api_group}"'
        where = f' in the namespace "{self.namespace}"' if self.namespace else " at the cluster scope"
        named = f' "{self.name}"' if self.name and self.verb not in ("create",) else ""
        return f'User "{self.user.name}" cannot {self.verb} resource "{res}"{named} {grp}{where}'


def rule_allows(rule: dict[str, Any], a: Attributes) -> bool:
    verbs = rule.get("verbs") or []
    if "*" not in verbs and a.verb not in verbs:
        return False
    if not a.resource_request:
        for url in rule.get("nonResourceURLs") or []:
            if url == "*" or url == a.path or (url.endswith("*") and a.path.startswith(url[:-1])):
                return True
        return False
    if rule.get("nonResourceURLs") and not rule.get("resources"):
        return False
    groups = rule.get("apiGroups") or []
    if "*" not in groups and a.api_group not in groups:
        return False
    full = f"{a.resource}/{a.subresource}" if a.subresource else a.resource
    resources = rule.get("resources") or []
    ok = any(
        r == "*" or r == full or (a.subresource and r == f"*/{a.subresource}")
        for r in resources
    )
    if not ok:
        return False
    names = rule.get("resourceNames") or []
    return not names or a.name in names


def subject_matches(subject: dict[str, Any], user: UserInfo, binding_ns: str) -> bool:
    kind = subject.get("kind")
    if kind == "User":
        return bool(subject.get("name") == user.name)
    if kind == "Group":
        return subject.get("name") in user.groups
    if kind == "ServiceAccount":
        ns = subject.get("namespace") or binding_ns
        return user.name == f"system:serviceaccount:{ns}:{subject.get('name')}"
    return False


class RBAC:
    """An index of Roles, ClusterRoles and their bindings, fed by a store watch."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.objects: dict[str, dict[str, Any]] = {}
        self._task: asyncio.Task[None] | None = None
        self.ready = asyncio.Event()

    async def start(self) -> None:
        items, rv, _ = await self.store.list(RBAC_PREFIX)
        for o in items:
            self.objects[self._key(o)] = o
        self.ready.set()
        self._task = asyncio.create_task(self._follow(rv))

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    @staticmethod
    def _key(o: dict[str, Any]) -> str:
        m = o.get("metadata", {})
        return f"{o.get('kind')}/{m.get('namespace', '')}/{m.get('name')}"

    async def _follow(self, rv: int) -> None:
        from kplane.storage.base import Compacted

        while True:
            try:
                async for ev in self.store.watch(RBAC_PREFIX, rv):
                    rv = ev.rv
                    if ev.type == "DELETED":
                        self.objects.pop(self._key(ev.obj), None)
                    else:
                        self.objects[self._key(ev.obj)] = ev.obj
            except Compacted:
                items, rv, _ = await self.store.list(RBAC_PREFIX)
                self.objects = {self._key(o): o for o in items}
            except asyncio.CancelledError:
                raise
            except Exception:  # the index must never die silently
                log.exception("rbac watch failed; relisting")
                await asyncio.sleep(0.5)
                items, rv, _ = await self.store.list(RBAC_PREFIX)
                self.objects = {self._key(o): o for o in items}

    def _role_rules(self, kind: str, namespace: str, name: str) -> list[dict[str, Any]]:
        o = self.objects.get(f"{kind}/{namespace if kind == 'Role' else ''}/{name}")
        return list((o or {}).get("rules") or [])

    def applicable_rules(self, user: UserInfo, namespace: str) -> list[dict[str, Any]]:
        rules: list[dict[str, Any]] = []
        for o in list(self.objects.values()):
            kind = o.get("kind")
            if kind == "ClusterRoleBinding":
                bns = ""
            elif kind == "RoleBinding":
                bns = o.get("metadata", {}).get("namespace", "")
                if not namespace or bns != namespace:
                    continue
            else:
                continue
            if not any(subject_matches(s, user, bns) for s in o.get("subjects") or []):
                continue
            ref = o.get("roleRef") or {}
            rules += self._role_rules(str(ref.get("kind")), bns, str(ref.get("name")))
        return rules

    def authorize(self, a: Attributes) -> tuple[bool, str]:
        for o in list(self.objects.values()):
            kind = o.get("kind")
            if kind == "ClusterRoleBinding":
                bns = ""
            elif kind == "RoleBinding":
                bns = o.get("metadata", {}).get("namespace", "")
                if not a.resource_request or bns != a.namespace:
                    continue
            else:
                continue
            if not any(subject_matches(s, a.user, bns) for s in o.get("subjects") or []):
                continue
            ref = o.get("roleRef") or {}
            for rule in self._role_rules(str(ref.get("kind")), bns, str(ref.get("name"))):
                if rule_allows(rule, a):
                    name = o.get("metadata", {}).get("name")
                    return True, f'RBAC: allowed by {kind} "{name}" of {ref.get("kind")} "{ref.get("name")}"'
        return False, ""


# Static node rules (bootstrappolicy NodeRules), applied by the Node authorizer after its graph checks.
NODE_RULES: list[dict[str, Any]] = [
    {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]},
    {"apiGroups": ["authorization.k8s.io"], "resources": ["subjectaccessreviews", "localsubjectaccessreviews"],
     "verbs": ["create"]},
    {"apiGroups": [""], "resources": ["services"], "verbs": ["get", "list", "watch"]},
    {"apiGroups": [""], "resources": ["nodes"], "verbs": ["create", "get", "list", "watch", "update", "patch"]},
    {"apiGroups": [""], "resources": ["nodes/status"], "verbs": ["patch", "update"]},
    {"apiGroups": ["", "events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch", "update"]},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch", "create", "delete"]},
    {"apiGroups": [""], "resources": ["pods/status"], "verbs": ["patch", "update"]},
    {"apiGroups": [""], "resources": ["pods/eviction"], "verbs": ["create"]},
    {"apiGroups": [""], "resources": ["endpoints"], "verbs": ["get"]},
    {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["get", "list", "watch"]},
    {"apiGroups": ["certificates.k8s.io"], "resources": ["certificatesigningrequests"],
     "verbs": ["create", "get", "list", "watch"]},
    {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
     "verbs": ["get", "create", "update", "patch", "delete"]},
]


class NodeAuthorizer:
    """Node identities (``system:node:<name>`` in ``system:nodes``) get the node rules, with secrets, configmaps,
    service-account tokens, pods and leases narrowed to objects related to that node."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def _pods_on(self, node: str) -> list[dict[str, Any]]:
        items, _, _ = await self.store.list(
            "/registry/core/pods/", predicate=lambda p: p.get("spec", {}).get("nodeName") == node
        )
        return items

    async def authorize(self, a: Attributes) -> tuple[bool, str]:
        node = a.user.node_name
        if node is None:
            return False, ""
        if not node:
            return False, "unknown node for user"
        if not a.resource_request:
            return False, ""
        g, r, sub = a.api_group, a.resource, a.subresource
        if g == "" and r in ("secrets", "configmaps") and not sub:
            if a.verb not in ("get", "list", "watch") or not a.name or not a.namespace:
                return False, f"can only get individual {r}"
            for p in await self._pods_on(node):
                if p.get("metadata", {}).get("namespace") == a.namespace and a.name in _pod_refs(p, r):
                    return True, ""
            return False, f"no relationship found between node '{node}' and this object"
        if g == "" and r == "serviceaccounts":
            if sub != "token" or a.verb != "create":
                return False, ""
            for p in await self._pods_on(node):
                if (p.get("metadata", {}).get("namespace") == a.namespace
                        and p.get("spec", {}).get("serviceAccountName", "default") == a.name):
                    return True, ""
            return False, f"no relationship found between node '{node}' and this object"
        if g == "coordination.k8s.io" and r == "leases":
            if a.namespace != "kube-node-lease":
                return False, "can only access leases in the kube-node-lease namespace"
            if a.verb != "create" and a.name != node:
                return False, "can only access node lease with the same name as the requesting node"
        if (g == "" and r == "nodes" and not sub and a.verb in ("get", "list", "watch") and a.name != node
                and (a.verb == "get" or a.field_selector != f"metadata.name={node}")):
            return False, f"node '{node}' cannot read '{a.name or 'all nodes'}', only its own Node object"
        if (g == "" and r == "pods" and not sub and a.verb in ("list", "watch")
                and a.field_selector != f"spec.nodeName={node}"):
            return False, "can only list/watch pods with spec.nodeName field selector"
        if g == "" and r == "pods" and not sub and a.verb == "get":
            try:
                p = await self.store.get(f"/registry/core/pods/{a.namespace}/{a.name}")
            except Exception:
                return False, "no relationship found"
            if p.get("spec", {}).get("nodeName") != node:
                return False, f"no relationship found between node '{node}' and this object"
        for rule in NODE_RULES:
            if rule_allows(rule, a):
                return True, ""
        return False, ""


def _pod_refs(pod: dict[str, Any], resource: str) -> set[str]:
    spec = pod.get("spec", {})
    out: set[str] = set()
    key = "secret" if resource == "secrets" else "configMap"
    for v in spec.get("volumes") or []:
        if key == "secret" and v.get("secret"):
            out.add(v["secret"].get("secretName", ""))
        if key == "configMap" and v.get("configMap"):
            out.add(v["configMap"].get("name", ""))
        for src in (v.get("projected") or {}).get("sources") or []:
            if src.get(key):
                out.add(src[key].get("name", ""))
    for kind in ("initContainers", "containers"):
        for c in spec.get(kind) or []:
            for e in c.get("env") or []:
                ref = (e.get("valueFrom") or {}).get(f"{key}KeyRef")
                if ref:
                    out.add(ref.get("name", ""))
            for ef in c.get("envFrom") or []:
                ref = ef.get(f"{key}Ref")
                if ref:
                    out.add(ref.get("name", ""))
    if key == "secret":
        for s in spec.get("imagePullSecrets") or []:
            out.add(s.get("name", ""))
    return out


class Authorizer:
    def __init__(self, store: Store) -> None:
        self.rbac = RBAC(store)
        self.node = NodeAuthorizer(store)

    async def authorize(self, a: Attributes) -> tuple[bool, str]:
        if "system:masters" in a.user.groups:
            return True, ""
        ok, reason = await self.node.authorize(a)
        if ok:
            return True, reason
        ok2, reason2 = self.rbac.authorize(a)
        if ok2:
            return True, reason2
        return False, reason
