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
