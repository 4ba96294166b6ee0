"""The bootstrap RBAC policy: default ClusterRoles and ClusterRoleBindings, reconciled at every start.

Objects carry ``kubernetes.io/bootstrapping: rbac-defaults`` and the autoupdate annotation, as upstream's.
"""

from __future__ import annotations

from typing import Any

from kplane.apiserver.authz import NODE_RULES

READ = ["get", "list", "watch"]
RW = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]


def _rule(groups: list[str], resources: list[str], verbs: list[str], names: list[str] | None = None) -> dict[str, Any]:
    r: dict[str, Any] = {"apiGroups": groups, "resources": resources, "verbs": verbs}
    if names:
        r["resourceNames"] = names
    return r


def _urls(urls: list[str], verbs: list[str] | None = None) -> dict[str, Any]:
    return {"nonResourceURLs": urls, "verbs": verbs or ["get"]}


_CORE_READ = ["configmaps", "endpoints", "persistentvolumeclaims", "pods", "replicationcontrollers", "services",
              "serviceaccounts", "events", "limitranges", "namespaces", "resourcequotas", "pods/log", "pods/status"]

CLUSTER_ROLES: dict[str, list[dict[str, Any]]] = {
    "cluster-admin": [_rule(["*"], ["*"], ["*"]), _urls(["*"], ["*"])],
    "system:discovery": [_urls(["/api", "/api/*", "/apis", "/apis/*", "/healthz", "/livez", "/openapi",
                                "/openapi/*", "/readyz", "/version", "/version/"])],
    "system:public-info-viewer": [_urls(["/healthz", "/livez", "/readyz", "/version", "/version/"])],
    "system:basic-user": [
        _rule(["authorization.k8s.io"], ["selfsubjectaccessreviews", "selfsubjectrulesreviews"], ["create"]),
        _rule(["authentication.k8s.io"], ["selfsubjectreviews"], ["create"]),
    ],
    "system:monitoring": [_urls(["/healthz", "/healthz/*", "/livez", "/livez/*", "/readyz", "/readyz/*",
                                 "/metrics", "/metrics/slis"])],
    "system:service-account-issuer-discovery": [_urls(["/.well-known/openid-configuration", "/openid/v1/jwks"])],
    "admin": [
        _rule([""], [*_CORE_READ, "secrets", "pods/attach", "pods/exec", "pods/portforward", "pods/proxy",
                     "services/proxy", "serviceaccounts/token"], RW),
        _rule(["rbac.authorization.k8s.io"], ["roles", "rolebindings"], RW),
        _rule(["coordination.k8s.io"], ["leases"], RW),
        _rule(["discovery.k8s.io"], ["endpointslices"], READ),
        _rule(["authorization.k8s.io"], ["localsubjectaccessreviews"], ["create"]),
    ],
    "edit": [
        _rule([""], [*_CORE_READ, "secrets", "pods/attach", "pods/exec", "pods/portforward", "pods/proxy",
                     "services/proxy", "serviceaccounts/token"], RW),
        _rule(["coordination.k8s.io"], ["leases"], RW),
        _rule(["discovery.k8s.io"], ["endpointslices"], READ),
    ],
    "view": [
        _rule([""], _CORE_READ, READ),
        _rule(["discovery.k8s.io"], ["endpointslices"], READ),
    ],
    "system:node": NODE_RULES,
    "system:node-bootstrapper": [_rule(["certificates.k8s.io"], ["certificatesigningrequests"],
                                       ["create", "get", "list", "watch"])],
    "system:certificates.k8s.io:certificatesigningrequests:nodeclient": [
        _rule(["certificates.k8s.io"], ["certificatesigningrequests/nodeclient"], ["create"])],
    "system:certificates.k8s.io:certificatesigningrequests:selfnodeclient": [
        _rule(["certificates.k8s.io"], ["certificatesigningrequests/selfnodeclient"], ["create"])],
    "system:kubelet-api-admin": [
        _rule([""], ["nodes"], ["get", "list", "watch", "proxy"]),
        _rule([""], ["nodes/log", "nodes/metrics", "nodes/proxy", "nodes/stats", "nodes/spec", "nodes/configz",
                     "nodes/healthz", "nodes/pods", "nodes/checkpoint"], ["*"]),
    ],
    "system:auth-delegator": [
        _rule(["authentication.k8s.io"], ["tokenreviews"], ["create"]),
        _rule(["authorization.k8s.io"], ["subjectaccessreviews"], ["create"]),
    ],
    "system:node-proxier": [
        _rule([""], ["endpoints", "services"], ["list", "watch"]),
        _rule([""], ["nodes"], READ),
        _rule(["", "events.k8s.io"], ["events"], ["create", "patch", "update"]),
        _rule(["discovery.k8s.io"], ["endpointslices"], ["list", "watch"]),
    ],
    "system:kube-scheduler": [
        _rule([""], ["nodes", "namespaces", "services", "persistentvolumeclaims", "persistentvolumes"], READ),
        _rule([""], ["pods"], ["delete", "get", "list", "watch"]),
        _rule([""], ["bindings", "pods/binding"], ["create"]),
        _rule([""], ["pods/status"], ["patch", "update"]),
        _rule(["", "events.k8s.io"], ["events"], ["create", "patch", "update"]),
        _rule(["coordination.k8s.io"], ["leases"], ["create", "get", "update"]),
        _rule(["authentication.k8s.io"], ["tokenreviews"], ["create"]),
        _rule(["authorization.k8s.io"], ["subjectaccessreviews"], ["create"]),
    ],
    "system:kube-controller-manager": [
        _rule(["*"], ["*"], ["get", "list", "watch"]),
        _rule([""], ["namespaces", "namespaces/finalize", "namespaces/status", "serviceaccounts", "configmaps",
                     "secrets", "endpoints", "pods", "nodes", "nodes/status", "pods/status", "services",
                     "events", "serviceaccounts/token"], RW),
        _rule(["*"], ["*"], ["delete", "deletecollection"]),
        _rule(["certificates.k8s.io"], ["certificatesigningrequests", "certificatesigningrequests/approval",
                                        "certificatesigningrequests/status"], RW),
        _rule(["certificates.k8s.io"], ["signers"], ["approve", "sign"]),
        _rule(["coordination.k8s.io"], ["leases"], RW),
        _rule(["discovery.k8s.io"], ["endpointslices"], RW),
        _rule(["authentication.k8s.io"], ["tokenreviews"], ["create"]),
        _rule(["authorization.k8s.io"], ["subjectaccessreviews"], ["create"]),
    ],
}

AGGREGATE_LABELS = {
    "admin": {"rbac.authorization.k8s.io/aggregate-to-admin": "true"},
    "edit": {"rbac.authorization.k8s.io/aggregate-to-edit": "true"},
    "view": {"rbac.authorization.k8s.io/aggregate-to-view": "true"},
}

CLUSTER_ROLE_BINDINGS: dict[str, tuple[str, list[dict[str, str]]]] = {
    "cluster-admin": ("cluster-admin", [{"kind": "Group", "name": "system:masters"}]),
    "system:discovery": ("system:discovery", [{"kind": "Group", "name": "system:authenticated"}]),
    "system:public-info-viewer": ("system:public-info-viewer", [
        {"kind": "Group", "name": "system:authenticated"}, {"kind": "Group", "name": "system:unauthenticated"}]),
    "system:basic-user": ("system:basic-user", [{"kind": "Group", "name": "system:authenticated"}]),
    "system:monitoring": ("system:monitoring", [{"kind": "Group", "name": "system:monitoring"}]),
    "system:service-account-issuer-discovery": ("system:service-account-issuer-discovery", [
        {"kind": "Group", "name": "system:serviceaccounts"}]),
    "system:node-proxier": ("system:node-proxier", [{"kind": "User", "name": "system:kube-proxy"}]),
    "system:kube-scheduler": ("system:kube-scheduler", [{"kind": "User", "name": "system:kube-scheduler"}]),
    "system:kube-controller-manager": ("system:kube-controller-manager", [
        {"kind": "User", "name": "system:kube-controller-manager"}]),
    "system:node": ("system:node", []),
    # kplane's choices (kubeadm makes the same bindings): the apiserver's kubelet client may use the kubelet
    # API; bootstrap tokens may request node client certificates; nodes may renew their own.
    "kube-apiserver-kubelet-api-admin": ("system:kubelet-api-admin", [
        {"kind": "User", "name": "kube-apiserver-kubelet-client"}]),
    "kplane:node-bootstrapper": ("system:node-bootstrapper", [{"kind": "Group", "name": "system:bootstrappers"}]),
    "kplane:node-autoapprove-bootstrap": ("system:certificates.k8s.io:certificatesigningrequests:nodeclient", [
        {"kind": "Group", "name": "system:bootstrappers"}]),
    "kplane:node-autoapprove-certificate-rotation": (
        "system:certificates.k8s.io:certificatesigningrequests:selfnodeclient",
        [{"kind": "Group", "name": "system:nodes"}]),
    # kube-proxy runs inside the node agent with the node's identity (kubeadm gives it a service account)
    "kplane:node-proxier": ("system:node-proxier", [{"kind": "Group", "name": "system:nodes"}]),
}

_META_LABELS = {"kubernetes.io/bootstrapping": "rbac-defaults"}
_META_ANN = {"rbac.authorization.kubernetes.io/autoupdate": "true"}


def bootstrap_objects() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for name, rules in CLUSTER_ROLES.items():
        labels = dict(_META_LABELS)
        obj: dict[str, Any] = {
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": name, "labels": labels, "annotations": dict(_META_ANN)},
            "rules": rules,
        }
        if name in AGGREGATE_LABELS:
            obj["aggregationRule"] = {"clusterRoleSelectors": [{"matchLabels": AGGREGATE_LABELS[name]}]}
        out.append(obj)
    for name, (role, subjects) in CLUSTER_ROLE_BINDINGS.items():
        subs = [dict(s, apiGroup="rbac.authorization.k8s.io") for s in subjects]
        out.append({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": name, "labels": dict(_META_LABELS), "annotations": dict(_META_ANN)},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
            "subjects": subs,
        })
    return out
