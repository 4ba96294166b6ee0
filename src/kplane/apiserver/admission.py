"""Admission: NamespaceLifecycle, ServiceAccount (mutating) and NodeRestriction (validating), on by default."""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING, Any

from kplane.errors import StatusError, not_found
from kplane.storage.base import KeyNotFound

if TYPE_CHECKING:
    from kplane.api.resources import Resource
    from kplane.apiserver.authn import UserInfo
    from kplane.storage.base import Store

IMMORTAL_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")
SA_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
_KUBELET_LABELS = {
    "kubernetes.io/hostname", "kubernetes.io/arch", "kubernetes.io/os", "beta.kubernetes.io/arch",
    "beta.kubernetes.io/os", "beta.kubernetes.io/instance-type", "node.kubernetes.io/instance-type",
    "failure-domain.beta.kubernetes.io/region", "failure-domain.beta.kubernetes.io/zone",
    "topology.kubernetes.io/region", "topology.kubernetes.io/zone",
}

Obj = dict[str, Any]


def forbidden(message: str) -> StatusError:
    return StatusError(403, message)


class Admission:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def namespace_lifecycle(self, ns: str) -> None:
        try:
            obj = await self.store.get(f"/registry/core/namespaces/{ns}")
        except KeyNotFound:
            raise not_found("namespaces", ns) from None
        if obj.get("metadata", {}).get("deletionTimestamp") or obj.get("status", {}).get("phase") == "Terminating":
            raise StatusError(403, f"unable to create new content in namespace {ns} because it is being terminated",
                              details={"name": ns, "kind": "namespaces",
                                       "causes": [{"reason": "NamespaceTerminating", "field": "metadata.namespace",
                                                   "message": f"namespace {ns} is being terminated"}]})

    async def admit_create(self, res: Resource, obj: Obj, user: UserInfo) -> None:
        if res.kind == "Pod":
            await self._service_account(obj)
        if res.kind == "CertificateSigningRequest":
            spec = obj.setdefault("spec", {})
            spec["username"] = user.name
            spec["groups"] = list(user.groups)
            if user.uid:
                spec["uid"] = user.uid
            else:
                spec.pop("uid", None)
            if user.extra:
                spec["extra"] = user.extra
            else:
                spec.pop("extra", None)
            obj["status"] = {}
        self._node_restriction(res, None, obj, user, "")

    async def admit_update(self, res: Resource, old: Obj, new: Obj, user: UserInfo, sub: str) -> None:
        self._node_restriction(res, old, new, user, sub)

    async def admit_delete(self, res: Resource, ns: str, name: str, user: UserInfo) -> None:
        if res.kind == "Namespace" and name in IMMORTAL_NAMESPACES:
            raise forbidden(f'namespaces "{name}" is forbidden: this namespace may not be deleted')
        node = user.node_name
        if node is None:
            return
        if res.kind == "Pod":
            try:
                pod = await self.store.get(res.key(ns, name))
            except KeyNotFound:
                return
            if pod.get("spec", {}).get("nodeName") != node:
                raise forbidden(f'node "{node}" can only delete pods with spec.nodeName set to itself')
        if res.kind == "Node" and name != node:
            raise forbidden(f'node "{node}" is not allowed to delete node "{name}"')

    async def _service_account(self, pod: Obj) -> None:
        spec = pod.setdefault("spec", {})
        if spec.get("serviceAccount") and not spec.get("serviceAccountName"):
            spec["serviceAccountName"] = spec["serviceAccount"]
        sa_name = spec.setdefault("serviceAccountName", "default")
        spec["serviceAccount"] = sa_name
        ns = pod["metadata"]["namespace"]
        annotations = pod["metadata"].get("annotations") or {}
        if "kubernetes.io/config.mirror" in annotations:
            return
        try:
            sa = await self.store.get(f"/registry/core/serviceaccounts/{ns}/{sa_name}")
        except KeyNotFound:
            raise forbidden(f'error looking up service account {ns}/{sa_name}: serviceaccount "{sa_name}" not found') \
                from None
        automount = spec.get("automountServiceAccountToken")
        if automount is None:
            automount = sa.get("automountServiceAccountToken", True)
        if not automount:
            return
        containers = [c for k in ("initContainers", "containers") for c in spec.get(k) or [] if isinstance(c, dict)]
        if any(m.get("mountPath") == SA_MOUNT for c in containers for m in c.get("volumeMounts") or []):
            return
        vol_name = "kube-api-access-" + "".join(secrets.choice("bcdfghjklmnpqrstvwxz2456789") for _ in range(5))
        spec.setdefault("volumes", []).append({
            "name": vol_name,
            "projected": {
                "defaultMode": 420,
                "sources": [
                    {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                    {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                    {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {
                        "apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}},
                ],
            },
        })
        for c in containers:
            c.setdefault("volumeMounts", []).append({"name": vol_name, "readOnly": True, "mountPath": SA_MOUNT})

    def _node_restriction(self, res: Resource, old: Obj | None, new: Obj, user: UserInfo, sub: str) -> None:
        node = user.node_name
        if node is None:
            return
        if not node:
            raise forbidden("could not determine node from user")
        kind, name = res.kind, new.get("metadata", {}).get("name")
        if kind == "Pod":
            if old is None:
                ann = new.get("metadata", {}).get("annotations") or {}
                if "kubernetes.io/config.mirror" not in ann:
                    raise forbidden(f'pod does not have "kubernetes.io/config.mirror" annotation, node "{node}" '
                                    "can only create mirror pods")
                if new.get("spec", {}).get("nodeName") != node:
                    raise forbidden(f'node "{node}" can only create pods with spec.nodeName set to itself')
                return
            if sub != "status":
                raise forbidden(f'node "{node}" can only update pod status')
            if (old.get("spec") or {}).get("nodeName") != node:
                raise forbidden(f'node "{node}" can only update pod status for pods with spec.nodeName set to itself')
            if (old.get("metadata", {}).get("labels") or {}) != (new.get("metadata", {}).get("labels") or {}):
                raise forbidden(f'node "{node}" cannot update labels through pod status')
        elif kind == "Node":
            if name != node:
                raise forbidden(f'node "{node}" is not allowed to modify node "{name}"')
            old_labels = (old or {}).get("metadata", {}).get("labels") or {}
            new_labels = new.get("metadata", {}).get("labels") or {}
            for k in set(old_labels) | set(new_labels):
                if old_labels.get(k) != new_labels.get(k) and _forbidden_node_label(k):
                    raise forbidden(f'node "{node}" is not allowed to modify labels: {k}')
            if old is not None:
                if (old.get("spec") or {}).get("taints") != (new.get("spec") or {}).get("taints"):
                    raise forbidden(f'node "{node}" is not allowed to modify taints')
                if old.get("metadata", {}).get("ownerReferences") != new.get("metadata", {}).get("ownerReferences"):
                    raise forbidden(f'node "{node}" is not allowed to modify ownerReferences')
        elif kind == "Lease":
            ns = new.get("metadata", {}).get("namespace")
            if ns != "kube-node-lease" or name != node:
                raise forbidden(f'node "{node}" is not allowed to modify lease {ns}/{name}')


def _forbidden_node_label(key: str) -> bool:
    prefix = key.split("/", 1)[0] if "/" in key else ""
    if prefix == "node-restriction.kubernetes.io" or prefix.endswith(".node-restriction.kubernetes.io"):
        return True
    if key in _KUBELET_LABELS or prefix in ("kubelet.kubernetes.io", "node.kubernetes.io"):
        return False
    if prefix.endswith(".kubelet.kubernetes.io") or prefix.endswith(".node.kubernetes.io"):
        return False
    return prefix in ("kubernetes.io", "k8s.io") or prefix.endswith((".kubernetes.io", ".k8s.io"))
