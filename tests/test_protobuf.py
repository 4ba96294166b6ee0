"""Tests for the Kubernetes protobuf request-body decoder.

Fixtures are hand-encoded with a tiny encoder following the field numbers of the generated.proto files.
"""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kplane.apiserver.protobuf import MAGIC, decode, decode_raw, is_protobuf, supported_kinds
from kplane.errors import StatusError

# --- tiny encoder ----------------------------------------------------------------------------------------


def varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def key(num: int, wt: int) -> bytes:
    return varint(num << 3 | wt)


def s(num: int, value: str | bytes) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    return key(num, 2) + varint(len(data)) + data


def v(num: int, value: int) -> bytes:
    return key(num, 0) + varint(value)


def m(num: int, *parts: bytes) -> bytes:
    return s(num, b"".join(parts))


def entry(num: int, k: str, val: bytes | str) -> bytes:
    return m(num, s(1, k), s(2, val))


def envelope(api_version: str, kind: str, raw: bytes, *extra: bytes) -> bytes:
    return MAGIC + m(1, s(1, api_version), s(2, kind)) + s(2, raw) + b"".join(extra)


EMPTY_META = m(1)  # gogo always writes non-nullable embedded messages


# --- happy paths -----------------------------------------------------------------------------------------


def test_self_subject_access_review_can_i_shape() -> None:
    # What `kubectl auth can-i get pods --subresource=log -n kube-system` sends: every string written.
    ra = b"".join([s(1, "kube-system"), s(2, "get"), s(3, ""), s(4, ""), s(5, "pods"), s(6, "log"), s(7, "")])
    raw = EMPTY_META + m(2, m(1, ra)) + m(3, v(1, 0), s(2, ""), s(3, ""), v(4, 0))
    obj = decode(envelope("authorization.k8s.io/v1", "SelfSubjectAccessReview", raw))
    assert obj == {
        "kind": "SelfSubjectAccessReview",
        "apiVersion": "authorization.k8s.io/v1",
        "metadata": {},
        "spec": {
            "resourceAttributes": {
                "namespace": "kube-system",
                "verb": "get",
                "resource": "pods",
                "subresource": "log",
            }
        },
        "status": {"allowed": False},
    }


def test_ssar_selectors_and_non_resource() -> None:
    fsel = m(8, s(1, "spec.nodeName=n1"), m(2, s(1, "spec.nodeName"), s(2, "In"), s(3, "n1"), s(3, "n2")))
    lsel = m(9, m(2, s(1, "app"), s(2, "Exists")))
    raw = EMPTY_META + m(2, m(1, s(2, "list"), s(5, "pods"), fsel, lsel))
    obj = decode(envelope("authorization.k8s.io/v1", "SelfSubjectAccessReview", raw))
    ra = obj["spec"]["resourceAttributes"]
    assert ra["fieldSelector"] == {
        "rawSelector": "spec.nodeName=n1",
        "requirements": [{"key": "spec.nodeName", "operator": "In", "values": ["n1", "n2"]}],
    }
    assert ra["labelSelector"] == {"requirements": [{"key": "app", "operator": "Exists"}]}
    assert "status" not in obj

    raw = EMPTY_META + m(2, m(2, s(1, "/healthz"), s(2, "get")))
    obj = decode(envelope("authorization.k8s.io/v1", "SelfSubjectAccessReview", raw))
    assert obj["spec"] == {"nonResourceAttributes": {"path": "/healthz", "verb": "get"}}


@pytest.mark.parametrize("kind", ["SubjectAccessReview", "LocalSubjectAccessReview"])
def test_subject_access_review(kind: str) -> None:
    spec = m(
        2,
        m(1, s(1, "ns"), s(2, "create"), s(3, "apps"), s(5, "deployments")),
        s(3, "alice"),
        s(4, "dev"),
        s(4, "system:authenticated"),
        entry(5, "scopes", s(1, "a") + s(1, "b")),
        entry(5, "empty", b""),
        s(6, "uid-1"),
    )
    raw = m(1, s(1, "x"), s(3, "ns")) + spec
    obj = decode(envelope("authorization.k8s.io/v1", kind, raw))
    assert obj["metadata"] == {"name": "x", "namespace": "ns"}
    assert obj["spec"] == {
        "resourceAttributes": {
            "namespace": "ns",
            "verb": "create",
            "group": "apps",
            "resource": "deployments",
        },
        "user": "alice",
        "groups": ["dev", "system:authenticated"],
        "extra": {"scopes": ["a", "b"], "empty": []},
        "uid": "uid-1",
    }


def test_self_subject_rules_review() -> None:
    raw = EMPTY_META + m(2, s(1, "default")) + m(3, v(3, 0))
    obj = decode(envelope("authorization.k8s.io/v1", "SelfSubjectRulesReview", raw))
    assert obj["spec"] == {"namespace": "default"}
    assert obj["status"] == {"incomplete": False}


def test_self_subject_review_and_token_review() -> None:
    obj = decode(envelope("authentication.k8s.io/v1", "SelfSubjectReview", EMPTY_META + m(2)))
    assert obj == {
        "kind": "SelfSubjectReview",
        "apiVersion": "authentication.k8s.io/v1",
        "metadata": {},
        "status": {},
    }
    raw = EMPTY_META + m(2, s(1, "tok"), s(2, "api"), s(2, "vault")) + m(3, v(1, 0), s(3, ""))
    obj = decode(envelope("authentication.k8s.io/v1", "TokenReview", raw))
    assert obj["spec"] == {"token": "tok", "audiences": ["api", "vault"]}
    assert obj["status"] == {}


def test_token_request() -> None:
    bound = m(3, s(1, "Pod"), s(2, "v1"), s(3, "p"), s(4, "u"))
    raw = m(1, s(1, "default"), s(3, "ns")) + m(2, s(1, "https://kubernetes.default.svc"), v(4, 3600), bound)
    raw += m(3, s(1, ""), m(2))
    obj = decode(envelope("authentication.k8s.io/v1", "TokenRequest", raw))
    assert obj["spec"] == {
        "audiences": ["https://kubernetes.default.svc"],
        "expirationSeconds": 3600,
        "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": "p", "uid": "u"},
    }
    assert obj["status"] == {"token": ""}  # token has no omitempty; zero Time -> null -> omitted


def test_pointer_fields_keep_zero() -> None:
    raw = EMPTY_META + m(2, v(4, 0))
    obj = decode(envelope("authentication.k8s.io/v1", "TokenRequest", raw))
    assert obj["spec"] == {"expirationSeconds": 0}


def test_csr_approval_put() -> None:
    pem = b"-----BEGIN CERTIFICATE REQUEST-----\nMIIB\n-----END CERTIFICATE REQUEST-----\n"
    meta = m(
        1,
        s(1, "csr-1"),
        s(2, ""),
        s(3, ""),
        s(5, "0f6c-uid"),
        s(6, "42"),
        v(7, 0),
        m(8, v(1, 1700000000), v(2, 123)),
        entry(11, "app", "x"),
        entry(12, "note", ""),
        m(13, s(1, "Node"), s(3, "n1"), s(4, "nu"), s(5, "v1"), v(6, 1)),
        s(14, "example.com/f"),
        m(17, s(1, "kubectl")),  # managedFields: skipped
    )
    spec = m(
        2,
        s(1, pem),
        s(2, "admin"),
        s(3, ""),
        s(4, "system:masters"),
        s(5, "client auth"),
        s(5, "digital signature"),
        entry(6, "k", s(1, "v")),
        s(7, "kubernetes.io/kube-apiserver-client"),
        v(8, 86400),
    )
    cond = m(
        1,
        s(1, "Approved"),
        s(2, "KubectlApprove"),
        s(3, "This CSR was approved by kubectl certificate approve."),
        m(4, v(1, 1700000100)),
        m(5),
        s(6, "True"),
    )
    status = m(3, cond, s(2, b"CERT"))
    obj = decode(envelope("certificates.k8s.io/v1", "CertificateSigningRequest", meta + spec + status))
    assert obj["metadata"] == {
        "name": "csr-1",
        "uid": "0f6c-uid",
        "resourceVersion": "42",
        "creationTimestamp": "2023-11-14T22:13:20Z",
        "labels": {"app": "x"},
        "annotations": {"note": ""},
        "ownerReferences": [
            {"apiVersion": "v1", "kind": "Node", "name": "n1", "uid": "nu", "controller": True}
        ],
        "finalizers": ["example.com/f"],
    }
    assert obj["spec"] == {
        "request": base64.b64encode(pem).decode(),
        "signerName": "kubernetes.io/kube-apiserver-client",
        "expirationSeconds": 86400,
        "usages": ["client auth", "digital signature"],
        "username": "admin",
        "groups": ["system:masters"],
        "extra": {"k": ["v"]},
    }
    assert obj["status"] == {
        "conditions": [
            {
                "type": "Approved",
                "status": "True",
                "reason": "KubectlApprove",
                "message": "This CSR was approved by kubectl certificate approve.",
                "lastUpdateTime": "2023-11-14T22:15:00Z",
            }
        ],
        "certificate": base64.b64encode(b"CERT").decode(),
    }


def test_eviction() -> None:
    opts = m(2, v(1, 0), m(2, s(1, "uid-9")), s(4, "Foreground"), s(5, "All"))
    raw = m(1, s(1, "web-0"), s(3, "prod")) + opts
    obj = decode(envelope("policy/v1", "Eviction", raw))
    assert obj == {
        "kind": "Eviction",
        "apiVersion": "policy/v1",
        "metadata": {"name": "web-0", "namespace": "prod"},
        "deleteOptions": {
            "gracePeriodSeconds": 0,
            "preconditions": {"uid": "uid-9"},
            "propagationPolicy": "Foreground",
            "dryRun": ["All"],
        },
    }


def test_wire_semantics() -> None:
    # Unknown fields of every wire type are skipped; last scalar wins; singular messages merge;
    # negative int64 is two's complement; fixed32/fixed64 accepted.
    unknown = v(99, 5) + key(98, 1) + b"\x00" * 8 + key(97, 5) + b"\x00" * 4 + s(96, "zz")
    meta = m(1, s(1, "a"), s(1, "b"), v(7, -1), unknown) + m(1, s(3, "ns"))
    obj = decode_raw("policy/v1", "Eviction", meta + unknown)
    assert obj["metadata"] == {"name": "b", "namespace": "ns", "generation": -1}
    # empty raw still yields the object frame
    assert decode(envelope("policy/v1", "Eviction", b"")) == {
        "kind": "Eviction",
        "apiVersion": "policy/v1",
        "metadata": {},
    }


def test_is_protobuf_and_kinds() -> None:
    assert is_protobuf("application/vnd.kubernetes.protobuf")
    assert is_protobuf("Application/vnd.kubernetes.protobuf; charset=utf-8")
    assert not is_protobuf("application/json")
    assert not is_protobuf(None)
    assert ("certificates.k8s.io/v1", "CertificateSigningRequest") in supported_kinds()
    for kind in ("ConfigMap", "Secret", "ServiceAccount", "Namespace", "Service", "ResourceQuota"):
        assert ("v1", kind) in supported_kinds()
    for kind in ("Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding"):
        assert ("rbac.authorization.k8s.io/v1", kind) in supported_kinds()


# --- kubectl create generators ---------------------------------------------------------------------------

RBAC = "rbac.authorization.k8s.io/v1"


def test_config_map() -> None:
    # kubectl create configmap c --from-literal=a=b --from-literal=e= --from-file=bin.dat (non-UTF-8 -> binaryData)
    raw = (
        m(1, s(1, "c"), s(3, "default"))
        + entry(2, "a", "b")
        + entry(2, "e", "")
        + entry(3, "bin.dat", b"\xff\xfe\x00")
    )
    obj = decode(envelope("v1", "ConfigMap", raw))
    assert obj == {
        "kind": "ConfigMap",
        "apiVersion": "v1",
        "metadata": {"name": "c", "namespace": "default"},
        "data": {"a": "b", "e": ""},
        "binaryData": {"bin.dat": base64.b64encode(b"\xff\xfe\x00").decode()},
    }
    obj = decode(envelope("v1", "ConfigMap", EMPTY_META + v(4, 0)))
    assert obj == {"kind": "ConfigMap", "apiVersion": "v1", "metadata": {}, "immutable": False}


def test_secret() -> None:
    raw = (
        m(1, s(1, "s"))
        + entry(2, "k", b"v\x00\xff")
        + entry(2, "empty", b"")
        + s(3, "Opaque")
        + entry(4, "plain", "text")
        + v(5, 1)
    )
    obj = decode(envelope("v1", "Secret", raw))
    assert obj == {
        "kind": "Secret",
        "apiVersion": "v1",
        "metadata": {"name": "s"},
        "immutable": True,
        "data": {"k": base64.b64encode(b"v\x00\xff").decode(), "empty": ""},
        "stringData": {"plain": "text"},
        "type": "Opaque",
    }


def test_service_account() -> None:
    raw = (
        m(1, s(1, "x"), s(3, "default"))
        + m(2, s(1, "Secret"), s(3, "tok"), s(2, ""), s(7, ""))
        + m(3, s(1, "regcred"))
        + v(4, 0)
    )
    obj = decode(envelope("v1", "ServiceAccount", raw))
    assert obj == {
        "kind": "ServiceAccount",
        "apiVersion": "v1",
        "metadata": {"name": "x", "namespace": "default"},
        "secrets": [{"kind": "Secret", "name": "tok"}],
        "imagePullSecrets": [{"name": "regcred"}],
        "automountServiceAccountToken": False,
    }
    # kubectl create sa x: only metadata
    assert decode(envelope("v1", "ServiceAccount", m(1, s(1, "x")))) == {
        "kind": "ServiceAccount",
        "apiVersion": "v1",
        "metadata": {"name": "x"},
    }


def test_namespace() -> None:
    # kubectl create ns n1 writes empty spec and status (gogo non-nullable embedded messages)
    obj = decode(envelope("v1", "Namespace", m(1, s(1, "n1")) + m(2) + m(3, s(1, ""))))
    assert obj == {
        "kind": "Namespace",
        "apiVersion": "v1",
        "metadata": {"name": "n1"},
        "spec": {},
        "status": {},
    }
    cond = m(2, s(1, "NamespaceDeletionContentFailure"), s(2, "False"), m(4), s(5, ""), s(6, ""))
    obj = decode(envelope("v1", "Namespace", m(1) + m(2, s(1, "kubernetes")) + m(3, s(1, "Active"), cond)))
    assert obj["spec"] == {"finalizers": ["kubernetes"]}
    assert obj["status"] == {
        "phase": "Active",
        "conditions": [{"type": "NamespaceDeletionContentFailure", "status": "False"}],
    }


def _port(name: str, port: int, target: bytes, *extra: bytes) -> bytes:
    return m(1, s(1, name), s(2, "TCP"), v(3, port), m(4, *([target] if target else [])), *extra)


def test_service_clusterip() -> None:
    # kubectl create service clusterip s1 --tcp=80:8080 --tcp=443:https --tcp=53
    spec = m(
        2,
        _port("80-8080", 80, v(1, 0) + v(2, 8080) + s(3, "")),
        _port("443-https", 443, v(1, 1) + v(2, 0) + s(3, "https")),
        _port("53", 53, b"", v(5, 0)),  # zero targetPort is dropped so the server defaults it to port
        entry(2, "app", "s1"),
        s(3, ""),
        s(4, "ClusterIP"),
        s(7, ""),
        s(8, ""),
        s(10, ""),
        s(11, ""),
        v(12, 0),
        v(13, 0),
    )
    status = m(3, m(1))
    obj = decode(envelope("v1", "Service", m(1, s(1, "s1"), entry(11, "app", "s1")) + spec + status))
    assert obj == {
        "kind": "Service",
        "apiVersion": "v1",
        "metadata": {"name": "s1", "labels": {"app": "s1"}},
        "spec": {
            "ports": [
                {"name": "80-8080", "protocol": "TCP", "port": 80, "targetPort": 8080},
                {"name": "443-https", "protocol": "TCP", "port": 443, "targetPort": "https"},
                {"name": "53", "protocol": "TCP", "port": 53},
            ],
            "selector": {"app": "s1"},
            "type": "ClusterIP",
        },
        "status": {"loadBalancer": {}},
    }


def test_service_full_spec_and_status() -> None:
    spec = m(
        2,
        m(1, v(3, 443), m(4, v(2, 8443)), v(5, 30443), s(6, "kubernetes.io/h2c")),
        s(3, "10.0.0.1"),
        s(18, "10.0.0.1"),
        s(18, "fd00::1"),
        s(4, "LoadBalancer"),
        s(5, "1.2.3.4"),
        s(7, "ClientIP"),
        s(8, "5.6.7.8"),
        s(9, "10.0.0.0/8"),
        s(11, "Local"),
        v(12, 31000),
        v(13, 1),
        m(14, m(1, v(1, 10800))),
        s(19, "IPv4"),
        s(19, "IPv6"),
        s(17, "PreferDualStack"),
        v(20, 0),
        s(21, "example.com/lb"),
        s(22, "Cluster"),
        s(23, "PreferClose"),
    )
    ingress = m(1, s(1, "9.9.9.9"), s(3, "VIP"), m(4, v(1, 443), s(2, "TCP")))
    cond = m(2, s(1, "Ready"), s(2, "True"), v(3, 2), m(4, v(1, 0)), s(5, "Ok"), s(6, ""))
    obj = decode(envelope("v1", "Service", EMPTY_META + spec + m(3, m(1, ingress), cond)))
    assert obj["spec"] == {
        "ports": [{"port": 443, "targetPort": 8443, "nodePort": 30443, "appProtocol": "kubernetes.io/h2c"}],
        "clusterIP": "10.0.0.1",
        "clusterIPs": ["10.0.0.1", "fd00::1"],
        "type": "LoadBalancer",
        "externalIPs": ["1.2.3.4"],
        "sessionAffinity": "ClientIP",
        "loadBalancerIP": "5.6.7.8",
        "loadBalancerSourceRanges": ["10.0.0.0/8"],
        "externalTrafficPolicy": "Local",
        "healthCheckNodePort": 31000,
        "publishNotReadyAddresses": True,
        "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 10800}},
        "ipFamilies": ["IPv4", "IPv6"],
        "ipFamilyPolicy": "PreferDualStack",
        "allocateLoadBalancerNodePorts": False,
        "loadBalancerClass": "example.com/lb",
        "internalTrafficPolicy": "Cluster",
        "trafficDistribution": "PreferClose",
    }
    assert obj["status"] == {
        "loadBalancer": {
            "ingress": [{"ip": "9.9.9.9", "ipMode": "VIP", "ports": [{"port": 443, "protocol": "TCP"}]}]
        },
        "conditions": [
            {
                "type": "Ready",
                "status": "True",
                "observedGeneration": 2,
                "lastTransitionTime": "1970-01-01T00:00:00Z",
                "reason": "Ok",
                "message": "",
            }
        ],
    }


def test_service_external_name() -> None:
    spec = m(2, entry(2, "app", "s3"), s(4, "ExternalName"), s(10, "example.com"))
    obj = decode(envelope("v1", "Service", m(1, s(1, "s3")) + spec))
    assert obj["spec"] == {"selector": {"app": "s3"}, "type": "ExternalName", "externalName": "example.com"}


def test_resource_quota() -> None:
    # kubectl create quota q --hard=pods=2,requests.cpu=500m --scopes=BestEffort
    spec = m(
        2,
        entry(1, "pods", s(1, "2")),
        entry(1, "requests.cpu", s(1, "500m")),
        s(2, "BestEffort"),
        m(3, m(1, s(1, "PriorityClass"), s(2, "In"), s(3, "high"))),
    )
    status = m(3, entry(1, "pods", s(1, "2")), entry(2, "pods", s(1, "1")))
    obj = decode(envelope("v1", "ResourceQuota", m(1, s(1, "q")) + spec + status))
    assert obj == {
        "kind": "ResourceQuota",
        "apiVersion": "v1",
        "metadata": {"name": "q"},
        "spec": {
            "hard": {"pods": "2", "requests.cpu": "500m"},
            "scopes": ["BestEffort"],
            "scopeSelector": {
                "matchExpressions": [{"scopeName": "PriorityClass", "operator": "In", "values": ["high"]}]
            },
        },
        "status": {"hard": {"pods": "2"}, "used": {"pods": "1"}},
    }


def test_role_and_cluster_role() -> None:
    # kubectl create role r --verb=get,list --resource=pods,pods/log --resource-name=p1
    rule = m(2, s(1, "get"), s(1, "list"), s(2, ""), s(3, "pods"), s(3, "pods/log"), s(4, "p1"))
    obj = decode(envelope(RBAC, "Role", m(1, s(1, "r"), s(3, "default")) + rule))
    assert obj == {
        "kind": "Role",
        "apiVersion": RBAC,
        "metadata": {"name": "r", "namespace": "default"},
        "rules": [
            {
                "verbs": ["get", "list"],
                "apiGroups": [""],
                "resources": ["pods", "pods/log"],
                "resourceNames": ["p1"],
            }
        ],
    }
    # kubectl create clusterrole cr --verb=get --resource=nodes --non-resource-url=/logs/*
    rules = m(2, s(1, "get"), s(2, ""), s(3, "nodes")) + m(2, s(1, "get"), s(5, "/logs/*"))
    obj = decode(envelope(RBAC, "ClusterRole", m(1, s(1, "cr")) + rules))
    assert obj["rules"] == [
        {"verbs": ["get"], "apiGroups": [""], "resources": ["nodes"]},
        {"verbs": ["get"], "nonResourceURLs": ["/logs/*"]},
    ]
    # kubectl create clusterrole agg --aggregation-rule=a=b
    agg = m(3, m(1, entry(1, "a", "b"), m(2, s(1, "tier"), s(2, "In"), s(3, "x"))))
    obj = decode(envelope(RBAC, "ClusterRole", m(1, s(1, "agg")) + agg))
    assert obj == {
        "kind": "ClusterRole",
        "apiVersion": RBAC,
        "metadata": {"name": "agg"},
        "aggregationRule": {
            "clusterRoleSelectors": [
                {
                    "matchLabels": {"a": "b"},
                    "matchExpressions": [{"key": "tier", "operator": "In", "values": ["x"]}],
                }
            ]
        },
    }


@pytest.mark.parametrize("kind", ["RoleBinding", "ClusterRoleBinding"])
def test_role_bindings(kind: str) -> None:
    # kubectl create rolebinding rb --role=r --user=u --serviceaccount=default:x
    subjects = m(2, s(1, "User"), s(2, "rbac.authorization.k8s.io"), s(3, "u"), s(4, "")) + m(
        2, s(1, "ServiceAccount"), s(2, ""), s(3, "x"), s(4, "default")
    )
    role_ref = m(3, s(1, "rbac.authorization.k8s.io"), s(2, "Role"), s(3, "r"))
    obj = decode(envelope(RBAC, kind, m(1, s(1, "rb")) + subjects + role_ref))
    assert obj == {
        "kind": kind,
        "apiVersion": RBAC,
        "metadata": {"name": "rb"},
        "subjects": [
            {"kind": "User", "apiGroup": "rbac.authorization.k8s.io", "name": "u"},
            {"kind": "ServiceAccount", "name": "x", "namespace": "default"},
        ],
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "r"},
    }
    # required strings without omitempty are emitted even when absent on the wire
    obj = decode(envelope(RBAC, kind, EMPTY_META + m(2) + m(3)))
    assert obj["subjects"] == [{"kind": "", "name": ""}]
    assert obj["roleRef"] == {"apiGroup": "", "kind": "", "name": ""}


def test_int_or_string_merge_and_last_wins() -> None:
    # Singular embedded messages merge: a later chunk switching to the string form wins.
    spec = m(2, m(1, v(3, 80), m(4, v(2, 8080)), m(4, v(1, 1), s(3, "http"))))
    obj = decode(envelope("v1", "Service", EMPTY_META + spec))
    assert obj["spec"]["ports"] == [{"port": 80, "targetPort": "http"}]
    spec = m(2, m(1, v(3, 80), m(4, v(2, -1))))  # negative int32 is sign-extended to 64 bits on the wire
    obj = decode(envelope("v1", "Service", EMPTY_META + spec))
    assert obj["spec"]["ports"] == [{"port": 80, "targetPort": -1}]


# --- errors ----------------------------------------------------------------------------------------------

SSAR = ("authorization.k8s.io/v1", "SelfSubjectAccessReview")


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"k8s",
        b"k8s\x01" + m(1),
        b"{}",
        MAGIC,  # no typeMeta
        MAGIC + m(1, s(2, "Eviction")),  # no apiVersion
        MAGIC + b"\x80",  # truncated key varint
        MAGIC + b"\x0a\xff\xff\xff\xff\x0f",  # length far beyond buffer
        MAGIC + b"\x0a\x05ab",  # length beyond buffer
        MAGIC + b"\x0b",  # start group
        MAGIC + b"\x0c",  # end group
        MAGIC + b"\x0e",  # wire type 6
        MAGIC + b"\x00\x00",  # field number 0
        MAGIC + b"\x08" + b"\xff" * 11,  # overlong varint
        MAGIC + b"\x08" + b"\xff" * 9 + b"\x7f",  # varint > 64 bits
        MAGIC + key(1, 0) + varint(1),  # typeMeta with wrong wire type
        envelope(*SSAR, m(2, v(1, 3))),  # resourceAttributes as varint
        envelope(*SSAR, m(2, m(1, v(1, 3)))),  # namespace as varint
        envelope(*SSAR, m(2, m(1, s(1, b"\xff\xfe")))),  # invalid UTF-8
        envelope(*SSAR, m(3, s(1, "x"))),  # bool as LEN
        envelope(*SSAR, m(1, m(8, v(1, 1 << 62)))),  # time out of range
        envelope(*SSAR, m(1, m(8, s(1, "x")))),  # time seconds wrong type
        envelope(*SSAR, m(1, m(11, v(1, 1)))),  # map entry wrong type
        envelope(*SSAR, m(1, m(11, s(1, "k"), v(2, 1)))),  # map value wrong type
        envelope(*SSAR, b"\x0a\x03\x0a\x05a"),  # nested truncation
        envelope("v1", "Service", m(2, m(1, m(4, v(1, 2))))),  # IntOrString type out of range
        envelope("v1", "Service", m(2, m(1, v(4, 80)))),  # targetPort as varint
        envelope("v1", "Service", m(2, m(1, m(4, s(2, "x"))))),  # intVal as LEN
        envelope("v1", "Secret", m(2, v(1, 1))),  # map_bytes entry wrong wire type
        envelope("v1", "Secret", m(2, s(1, "k"), v(2, 1))),  # map_bytes value wrong wire type
        envelope("v1", "ResourceQuota", m(2, entry(1, "pods", b""))),  # empty quantity
        envelope("v1", "ResourceQuota", m(2, entry(1, "pods", v(1, 2)))),  # quantity string as varint
        envelope("v1", "ResourceQuota", m(2, entry(1, "pods", s(1, b"\xff")))),  # quantity not UTF-8
        envelope(RBAC, "Role", m(2, v(1, 1))),  # verbs as varint
    ],
)
def test_malformed_is_400(body: bytes) -> None:
    with pytest.raises(StatusError) as ei:
        decode(body)
    assert ei.value.code == 400


@pytest.mark.parametrize(
    "body",
    [
        envelope("v1", "Pod", b""),
        envelope("rbac.authorization.k8s.io/v1beta1", "Role", b""),
        envelope("authorization.k8s.io/v2", "SelfSubjectAccessReview", b""),
        envelope(*SSAR, b"", s(3, "gzip")),
        envelope(*SSAR, b"", s(4, "application/json")),
    ],
)
def test_unsupported_is_415(body: bytes) -> None:
    with pytest.raises(StatusError) as ei:
        decode(body)
    assert ei.value.code == 415


def test_envelope_content_type_protobuf_ok() -> None:
    obj = decode(envelope(*SSAR, b"", s(3, ""), s(4, "application/vnd.kubernetes.protobuf")))
    assert obj["kind"] == "SelfSubjectAccessReview"


# --- fuzz ------------------------------------------------------------------------------------------------


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_random_after_magic(data: bytes) -> None:
    try:
        decode(MAGIC + data)
    except StatusError as e:
        assert e.code in (400, 415)


@settings(max_examples=500, deadline=None)
@given(
    st.sampled_from(supported_kinds()),
    st.binary(max_size=300),
)
def test_fuzz_random_raw_for_each_kind(kind: tuple[str, str], raw: bytes) -> None:
    try:
        obj = decode(envelope(kind[0], kind[1], raw))
    except StatusError as e:
        assert e.code == 400
    else:
        assert obj["kind"] == kind[1] and isinstance(obj["metadata"], dict)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 20), st.integers(0, 5), st.binary(max_size=20)), max_size=12))
def test_fuzz_structured_fields(fields: list[tuple[int, int, bytes]]) -> None:
    # Well-framed messages with random field numbers / wire types inside a CSR.
    body = b""
    for num, wt, payload in fields:
        if wt == 0:
            body += v(num, int.from_bytes(payload[:8] or b"\x00", "little"))
        elif wt == 1:
            body += key(num, 1) + payload[:8].ljust(8, b"\x00")
        elif wt == 5:
            body += key(num, 5) + payload[:4].ljust(4, b"\x00")
        else:
            body += s(num, payload)
    raw = m(1, body) + m(2, body) + m(3, m(1, body))
    try:
        decode(envelope("certificates.k8s.io/v1", "CertificateSigningRequest", raw))
    except StatusError as e:
        assert e.code == 400
