"""Decode Kubernetes protobuf request bodies (``application/vnd.kubernetes.protobuf``) into JSON dicts.

kubectl sends typed request bodies as protobuf (``auth can-i``, ``certificate approve``, ``drain``,
``create token``, ``auth whoami`` and the ``kubectl create <kind>`` generators: configmap, secret,
serviceaccount, namespace, service, quota, role, rolebinding, clusterrole, clusterrolebinding).  A body is the magic ``b"k8s\\x00"`` followed by a proto2
``runtime.Unknown`` {1 typeMeta{1 apiVersion, 2 kind}, 2 raw, 3 contentEncoding, 4 contentType}; ``raw``
is the object's generated-proto encoding.  :func:`decode` turns such a body into the dict the JSON API would
have received (including ``apiVersion`` and ``kind``).  Only decoding is supported: we always answer JSON.

The wire decoder is hand-written and strict: groups, truncated or malformed input raise
``StatusError(400)``; a kind we have no schema for raises ``StatusError(415)``.  Unknown fields are skipped.

Field numbers come from ``k8s.io/api/<group>/<version>/generated.proto``,
``k8s.io/apimachinery/pkg/apis/meta/v1/generated.proto``, ``.../pkg/util/intstr/generated.proto`` and
``.../pkg/api/resource/generated.proto``.
"""

from __future__ import annotations

import base64
import datetime as _dt
from collections.abc import Mapping
from typing import Any, Literal, NamedTuple

from kplane.errors import StatusError

MAGIC = b"k8s\x00"
CONTENT_TYPE = "application/vnd.kubernetes.protobuf"

# Wire types.
_VARINT, _I64, _LEN, _SGROUP, _EGROUP, _I32 = 0, 1, 2, 3, 4, 5
_MAX_FIELD = (1 << 29) - 1
_U64 = 1 << 64

FieldType = Literal[
    "string",
    "bytes",
    "bool",
    "int32",
    "int64",
    "time",
    "message",
    "intorstr",
    "map_string",
    "map_bytes",
    "map_quantity",
    "map_extra",
]
# Special types: "intorstr" is intstr.IntOrString {1 type, 2 intVal, 3 strVal}, emitted as a JSON int or
# string; "map_bytes" is map<string, bytes> with base64 values (as []byte marshals); "map_quantity" is
# map<string, resource.Quantity> where Quantity is {1 string} and marshals to that canonical string.
# How a decoded value is emitted, mirroring Go's encoding/json on the Go struct:
#   "omit": `json:",omitempty"` on a value field: zero values are dropped.
#   "keep": no omitempty: the zero value is emitted even when the field is absent.
#   "ptr":  a pointer field: emitted whenever present on the wire, even if zero.
Mode = Literal["omit", "keep", "ptr"]


class Field(NamedTuple):
    name: str
    type: FieldType
    repeated: bool = False
    sub: Mapping[int, Field] | None = None
    mode: Mode = "omit"


Schema = Mapping[int, Field]


def _f(
    name: str,
    type_: FieldType = "string",
    *,
    repeated: bool = False,
    sub: Schema | None = None,
    mode: Mode = "omit",
) -> Field:
    return Field(name, type_, repeated, sub, mode)


def _msg(name: str, sub: Schema, *, repeated: bool = False) -> Field:
    return Field(name, "message", repeated, sub, "omit")


# --- meta/v1 -------------------------------------------------------------------------------------------

OWNER_REFERENCE: Schema = {
    5: _f("apiVersion", mode="keep"),
    1: _f("kind", mode="keep"),
    3: _f("name", mode="keep"),
    4: _f("uid", mode="keep"),
    6: _f("controller", "bool", mode="ptr"),
    7: _f("blockOwnerDeletion", "bool", mode="ptr"),
}

OBJECT_META: Schema = {
    1: _f("name"),
    2: _f("generateName"),
    3: _f("namespace"),
    4: _f("selfLink"),
    5: _f("uid"),
    6: _f("resourceVersion"),
    7: _f("generation", "int64"),
    8: _f("creationTimestamp", "time"),
    9: _f("deletionTimestamp", "time"),
    10: _f("deletionGracePeriodSeconds", "int64", mode="ptr"),
    11: _f("labels", "map_string"),
    12: _f("annotations", "map_string"),
    13: _msg("ownerReferences", OWNER_REFERENCE, repeated=True),
    14: _f("finalizers", repeated=True),
    # 17 managedFields: skipped.
}

LABEL_SELECTOR_REQUIREMENT: Schema = {
    1: _f("key", mode="keep"),
    2: _f("operator", mode="keep"),
    3: _f("values", repeated=True),
}

PRECONDITIONS: Schema = {
    1: _f("uid", mode="ptr"),
    2: _f("resourceVersion", mode="ptr"),
}

DELETE_OPTIONS: Schema = {
    1: _f("gracePeriodSeconds", "int64", mode="ptr"),
    2: _msg("preconditions", PRECONDITIONS),
    3: _f("orphanDependents", "bool", mode="ptr"),
    4: _f("propagationPolicy", mode="ptr"),
    5: _f("dryRun", repeated=True),
    6: _f("ignoreStoreReadErrorWithClusterBreakingPotential", "bool", mode="ptr"),
}

# --- authorization.k8s.io/v1 ---------------------------------------------------------------------------

FIELD_SELECTOR_REQUIREMENT: Schema = {
    1: _f("key", mode="keep"),
    2: _f("operator", mode="keep"),
    3: _f("values", repeated=True),
}

FIELD_SELECTOR_ATTRIBUTES: Schema = {
    1: _f("rawSelector"),
    2: _msg("requirements", FIELD_SELECTOR_REQUIREMENT, repeated=True),
}

LABEL_SELECTOR_ATTRIBUTES: Schema = {
    1: _f("rawSelector"),
    2: _msg("requirements", LABEL_SELECTOR_REQUIREMENT, repeated=True),
}

RESOURCE_ATTRIBUTES: Schema = {
    1: _f("namespace"),
    2: _f("verb"),
    3: _f("group"),
    4: _f("version"),
    5: _f("resource"),
    6: _f("subresource"),
    7: _f("name"),
    8: _msg("fieldSelector", FIELD_SELECTOR_ATTRIBUTES),
    9: _msg("labelSelector", LABEL_SELECTOR_ATTRIBUTES),
}

NON_RESOURCE_ATTRIBUTES: Schema = {
    1: _f("path"),
    2: _f("verb"),
}

SELF_SUBJECT_ACCESS_REVIEW_SPEC: Schema = {
    1: _msg("resourceAttributes", RESOURCE_ATTRIBUTES),
    2: _msg("nonResourceAttributes", NON_RESOURCE_ATTRIBUTES),
}

SUBJECT_ACCESS_REVIEW_SPEC: Schema = {
    1: _msg("resourceAttributes", RESOURCE_ATTRIBUTES),
    2: _msg("nonResourceAttributes", NON_RESOURCE_ATTRIBUTES),
    3: _f("user"),
    4: _f("groups", repeated=True),
    5: _f("extra", "map_extra"),
    6: _f("uid"),
}

SUBJECT_ACCESS_REVIEW_STATUS: Schema = {
    1: _f("allowed", "bool", mode="keep"),
    4: _f("denied", "bool"),
    2: _f("reason"),
    3: _f("evaluationError"),
}

SELF_SUBJECT_RULES_REVIEW_SPEC: Schema = {1: _f("namespace")}

RESOURCE_RULE: Schema = {
    1: _f("verbs", repeated=True),
    2: _f("apiGroups", repeated=True),
    3: _f("resources", repeated=True),
    4: _f("resourceNames", repeated=True),
}

NON_RESOURCE_RULE: Schema = {
    1: _f("verbs", repeated=True),
    2: _f("nonResourceURLs", repeated=True),
}

SUBJECT_RULES_REVIEW_STATUS: Schema = {
    1: _msg("resourceRules", RESOURCE_RULE, repeated=True),
    2: _msg("nonResourceRules", NON_RESOURCE_RULE, repeated=True),
    3: _f("incomplete", "bool", mode="keep"),
    4: _f("evaluationError"),
}

SELF_SUBJECT_ACCESS_REVIEW: Schema = {
    1: _msg("metadata", OBJECT_META),
    2: _msg("spec", SELF_SUBJECT_ACCESS_REVIEW_SPEC),
    3: _msg("status", SUBJECT_ACCESS_REVIEW_STATUS),
}

SUBJECT_ACCESS_REVIEW: Schema = {
    1: _msg("metadata", OBJECT_META),
    2: _msg("spec", SUBJECT_ACCESS_REVIEW_SPEC),
    3: _msg("status", SUBJECT_ACCESS_REVIEW_STATUS),
}

SELF_SUBJECT_RULES_REVIEW: Schema = {
    1: _msg("metadata", OBJECT_META),
    2: _msg("spec", SELF_SUBJECT_RULES_REVIEW_SPEC),
    3: _msg("status", SUBJECT_RULES_REVIEW_STATUS),
}

# --- authentication.k8s.io/v1 --------------------------------------------------------------------------

USER_INFO: Schema = {
    1: _f("username"),
    2: _f("uid"),
    3: _f("groups", repeated=True),
    4: _f("extra", "map_extra"),
}

TOKEN_REVIEW: Schema = {
    1: _msg("metadata", OBJECT_META),
    2: _msg("spec", {1: _f("token"), 2: _f("audiences", repeated=True)}),
    3: _msg(
        "status",
        {
            1: _f("authenticated", "bool"),
            2: _msg("user", USER_INFO),
            4: _f("audiences", repeated=True),
            3: _f("error"),
        },
    ),
}

BOUND_OBJECT_REFERENCE: Schema = {
    1: _f("kind"),
    2: _f("apiVersion"),
    3: _f("name"),
    4: _f("uid"),
}

TOKEN_REQUEST: Schema = {
    1: _msg("metadata", OBJECT_META),
    2: _msg(
        "spec",
        {
            1: _f("audiences", repeated=True),
            4: _f("expirationSeconds", "int64", mode="ptr"),
            3: _msg("boundObjectRef", BOUND_OBJECT_REFERENCE),
        },
    ),
    3: _msg(
        "status",
        {1: _f("token", mode="keep"), 2: _f("expirationTimestamp", "time")},
    ),
}

SELF_SUBJECT_REVIEW: Schema = {
    1: _msg("metadata", OBJECT_META),
    2: _msg("status", {1: _msg("userInfo", USER_INFO)}),
}

# --- certificates.k8s.io/v1 ----------------------------------------------------------------------------

CSR_CONDITION: Schema = {
    1: _f("type", mode="keep"),
    6: _f("status", mode="keep"),
    2: _f("reason"),
    3: _f("message"),
    4: _f("lastUpdateTime", "time"),
    5: _f("lastTransitionTime", "time"),
}

CERTIFICATE_SIGNING_REQUEST: Schema = {
    1: _msg("metadata", OBJECT_META),
    2: _msg(
        "spec",
        {
            1: _f("request", "bytes", mode="keep"),
            7: _f("signerName", mode="keep"),
            8: _f("expirationSeconds", "int32", mode="ptr"),
            5: _f("usages", repeated=True),
            2: _f("username"),
            3: _f("uid"),
            4: _f("groups", repeated=True),
            6: _f("extra", "map_extra"),
        },
    ),
    3: _msg(
        "status",
        {
            1: _msg("conditions", CSR_CONDITION, repeated=True),
            2: _f("certificate", "bytes"),
        },
    ),
}

# --- policy/v1 -----------------------------------------------------------------------------------------

EVICTION: Schema = {
    1: _msg("metadata", OBJECT_META),
    2: _msg("deleteOptions", DELETE_OPTIONS),
}

# --- meta/v1 (shared by the kinds below) ---------------------------------------------------------------

LABEL_SELECTOR: Schema = {
    1: _f("matchLabels", "map_string"),
    2: _msg("matchExpressions", LABEL_SELECTOR_REQUIREMENT, repeated=True),
}

CONDITION: Schema = {
    1: _f("type", mode="keep"),
    2: _f("status", mode="keep"),
    3: _f("observedGeneration", "int64"),
    4: _f("lastTransitionTime", "time"),
    5: _f("reason", mode="keep"),
    6: _f("message", mode="keep"),
}

# --- core/v1 -------------------------------------------------------------------------------------------

OBJECT_REFERENCE: Schema = {
    1: _f("kind"),
    2: _f("namespace"),
    3: _f("name"),
    4: _f("uid"),
    5: _f("apiVersion"),
    6: _f("resourceVersion"),
    7: _f("fieldPath"),
}

LOCAL_OBJECT_REFERENCE: Schema = {1: _f("name")}

CONFIG_MAP: Schema = {
    1: _msg("metadata", OBJECT_META),
    4: _f("immutable", "bool", mode="ptr"),
    2: _f("data", "map_string"),
    3: _f("binaryData", "map_bytes"),
}

SECRET: Schema = {
    1: _msg("metadata", OBJECT_META),
    5: _f("immutable", "bool", mode="ptr"),
    2: _f("data", "map_bytes"),
    4: _f("stringData", "map_string"),
    3: _f("type"),
}

SERVICE_ACCOUNT: Schema = {
    1: _msg("metadata", OBJECT_META),
    2: _msg("secrets", OBJECT_REFERENCE, repeated=True),
    3: _msg("imagePullSecrets", LOCAL_OBJECT_REFERENCE, repeated=True),
    4: _f("automountServiceAccountToken", "bool", mode="ptr"),
}

NAMESPACE_CONDITION: Schema = {
    1: _f("type", mode="keep"),
    2: _f("status", mode="keep"),
    4: _f("lastTransitionTime", "time"),
    5: _f("reason"),
    6: _f("message"),
}

NAMESPACE: Schema = {
    1: _msg("metadata", OBJECT_META),
    2: _msg("spec", {1: _f("finalizers", repeated=True)}),
    3: _msg(
        "status",
        {1: _f("phase"), 2: _msg("conditions", NAMESPACE_CONDITION, repeated=True)},
    ),
}

SERVICE_PORT: Schema = {
    1: _f("name"),
    2: _f("protocol"),
    6: _f("appProtocol", mode="ptr"),
    3: _f("port", "int32", mode="keep"),
    # Go has `json:"targetPort,omitempty"` on a struct (never omitted), but kube-apiserver treats a zero
    # IntOrString as unset and defaults it to port; we drop it so our defaulting (absent -> port) applies.
    4: _f("targetPort", "intorstr"),
    5: _f("nodePort", "int32"),
}

SERVICE_SPEC: Schema = {
    1: _msg("ports", SERVICE_PORT, repeated=True),
    2: _f("selector", "map_string"),
    3: _f("clusterIP"),
    18: _f("clusterIPs", repeated=True),
    4: _f("type"),
    5: _f("externalIPs", repeated=True),
    7: _f("sessionAffinity"),
    8: _f("loadBalancerIP"),
    9: _f("loadBalancerSourceRanges", repeated=True),
    10: _f("externalName"),
    11: _f("externalTrafficPolicy"),
    12: _f("healthCheckNodePort", "int32"),
    13: _f("publishNotReadyAddresses", "bool"),
    14: _msg("sessionAffinityConfig", {1: _msg("clientIP", {1: _f("timeoutSeconds", "int32", mode="ptr")})}),
    19: _f("ipFamilies", repeated=True),
    17: _f("ipFamilyPolicy", mode="ptr"),
    20: _f("allocateLoadBalancerNodePorts", "bool", mode="ptr"),
    21: _f("loadBalancerClass", mode="ptr"),
    22: _f("internalTrafficPolicy", mode="ptr"),
    23: _f("trafficDistribution", mode="ptr"),
}

PORT_STATUS: Schema = {
    1: _f("port", "int32", mode="keep"),
    2: _f("protocol", mode="keep"),
    3: _f("error", mode="ptr"),
}

LOAD_BALANCER_INGRESS: Schema = {
    1: _f("ip"),
    2: _f("hostname"),
    3: _f("ipMode", mode="ptr"),
    4: _msg("ports", PORT_STATUS, repeated=True),
}

SERVICE: Schema = {
    1: _msg("metadata", OBJECT_META),
    2: _msg("spec", SERVICE_SPEC),
    3: _msg(
        "status",
        {
            1: _msg("loadBalancer", {1: _msg("ingress", LOAD_BALANCER_INGRESS, repeated=True)}),
            2: _msg("conditions", CONDITION, repeated=True),
        },
    ),
}

SCOPED_RESOURCE_SELECTOR_REQUIREMENT: Schema = {
    1: _f("scopeName", mode="keep"),
    2: _f("operator", mode="keep"),
    3: _f("values", repeated=True),
}

RESOURCE_QUOTA: Schema = {
    1: _msg("metadata", OBJECT_META),
    2: _msg(
        "spec",
        {
            1: _f("hard", "map_quantity"),
            2: _f("scopes", repeated=True),
            3: _msg(
                "scopeSelector",
                {1: _msg("matchExpressions", SCOPED_RESOURCE_SELECTOR_REQUIREMENT, repeated=True)},
            ),
        },
    ),
    3: _msg("status", {1: _f("hard", "map_quantity"), 2: _f("used", "map_quantity")}),
}

# --- rbac.authorization.k8s.io/v1 ----------------------------------------------------------------------

POLICY_RULE: Schema = {
    1: _f("verbs", repeated=True),
    2: _f("apiGroups", repeated=True),
    3: _f("resources", repeated=True),
    4: _f("resourceNames", repeated=True),
    5: _f("nonResourceURLs", repeated=True),
}

RBAC_SUBJECT: Schema = {
    1: _f("kind", mode="keep"),
    2: _f("apiGroup"),
    3: _f("name", mode="keep"),
    4: _f("namespace"),
}

ROLE_REF: Schema = {
    1: _f("apiGroup", mode="keep"),
    2: _f("kind", mode="keep"),
    3: _f("name", mode="keep"),
}

ROLE: Schema = {
    1: _msg("metadata", OBJECT_META),
    2: _msg("rules", POLICY_RULE, repeated=True),
}

CLUSTER_ROLE: Schema = {
    1: _msg("metadata", OBJECT_META),
    2: _msg("rules", POLICY_RULE, repeated=True),
    3: _msg("aggregationRule", {1: _msg("clusterRoleSelectors", LABEL_SELECTOR, repeated=True)}),
}

ROLE_BINDING: Schema = {
    1: _msg("metadata", OBJECT_META),
    2: _msg("subjects", RBAC_SUBJECT, repeated=True),
    3: _msg("roleRef", ROLE_REF),
}

KINDS: Mapping[tuple[str, str], Schema] = {
    ("v1", "ConfigMap"): CONFIG_MAP,
    ("v1", "Secret"): SECRET,
    ("v1", "ServiceAccount"): SERVICE_ACCOUNT,
    ("v1", "Namespace"): NAMESPACE,
    ("v1", "Service"): SERVICE,
    ("v1", "ResourceQuota"): RESOURCE_QUOTA,
    ("rbac.authorization.k8s.io/v1", "Role"): ROLE,
    ("rbac.authorization.k8s.io/v1", "ClusterRole"): CLUSTER_ROLE,
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): ROLE_BINDING,
    ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"): ROLE_BINDING,
    ("authorization.k8s.io/v1", "SelfSubjectAccessReview"): SELF_SUBJECT_ACCESS_REVIEW,
    ("authorization.k8s.io/v1", "SubjectAccessReview"): SUBJECT_ACCESS_REVIEW,
    ("authorization.k8s.io/v1", "LocalSubjectAccessReview"): SUBJECT_ACCESS_REVIEW,
    ("authorization.k8s.io/v1", "SelfSubjectRulesReview"): SELF_SUBJECT_RULES_REVIEW,
    ("authentication.k8s.io/v1", "SelfSubjectReview"): SELF_SUBJECT_REVIEW,
    ("authentication.k8s.io/v1", "TokenReview"): TOKEN_REVIEW,
    ("authentication.k8s.io/v1", "TokenRequest"): TOKEN_REQUEST,
    ("certificates.k8s.io/v1", "CertificateSigningRequest"): CERTIFICATE_SIGNING_REQUEST,
    ("policy/v1", "Eviction"): EVICTION,
    ("policy/v1beta1", "Eviction"): EVICTION,
}

# runtime.Unknown {1 typeMeta, 2 raw, 3 contentEncoding, 4 contentType}; typeMeta is:
_TYPE_META: Schema = {1: _f("apiVersion"), 2: _f("kind")}


# --- wire level ----------------------------------------------------------------------------------------


def _bad(message: str) -> StatusError:
    return StatusError(400, f"invalid protobuf body: {message}")


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = 0
    shift = 0
    end = len(buf)
    while True:
        if pos >= end:
            raise _bad("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            break
        shift += 7
        if shift >= 70:
            raise _bad("varint too long")
    if result >= _U64:
        raise _bad("varint overflows 64 bits")
    return result, pos


def _fields(buf: bytes) -> list[tuple[int, int, int | bytes]]:
    """Split one message into (field number, wire type, value); LEN values are bytes, others ints."""
    out: list[tuple[int, int, int | bytes]] = []
    pos = 0
    end = len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        num, wt = key >> 3, key & 7
        if num == 0 or num > _MAX_FIELD:
            raise _bad(f"invalid field number {num}")
        value: int | bytes
        if wt == _VARINT:
            value, pos = _varint(buf, pos)
        elif wt == _I64:
            if pos + 8 > end:
                raise _bad("truncated fixed64")
            value = int.from_bytes(buf[pos : pos + 8], "little")
            pos += 8
        elif wt == _I32:
            if pos + 4 > end:
                raise _bad("truncated fixed32")
            value = int.from_bytes(buf[pos : pos + 4], "little")
            pos += 4
        elif wt == _LEN:
            length, pos = _varint(buf, pos)
            if length > end - pos:
                raise _bad("length-delimited field runs past the end of the buffer")
            value = buf[pos : pos + length]
            pos += length
        elif wt in (_SGROUP, _EGROUP):
            raise _bad("groups are not supported")
        else:
            raise _bad(f"unknown wire type {wt}")
        out.append((num, wt, value))
    return out


def _signed64(v: int) -> int:
    return v - _U64 if v >= 1 << 63 else v


def _signed32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= 1 << 31 else v


def _text(raw: bytes, name: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _bad(f"field {name!r} is not valid UTF-8") from None


def _time(raw: bytes, name: str) -> str | None:
    """metav1.Time {1 seconds, 2 nanos} -> RFC 3339 with second precision (as metav1.Time marshals JSON)."""
    if not raw:
        return None  # the zero time: Go encodes an empty message and JSON null
    seconds = 0
    for num, wt, value in _fields(raw):
        if num == 1:
            if wt != _VARINT or not isinstance(value, int):
                raise _bad(f"field {name!r}.seconds has wrong wire type")
            seconds = _signed64(value)
        elif num == 2 and wt != _VARINT:
            raise _bad(f"field {name!r}.nanos has wrong wire type")
    try:
        w = _dt.datetime(1970, 1, 1, tzinfo=_dt.UTC) + _dt.timedelta(seconds=seconds)
    except OverflowError:
        raise _bad(f"field {name!r} is out of range") from None
    return f"{w.year:04d}-{w.month:02d}-{w.day:02d}T{w.hour:02d}:{w.minute:02d}:{w.second:02d}Z"


def _map_entry(raw: bytes, name: str) -> tuple[str, bytes]:
    key = ""
    val = b""
    for num, wt, value in _fields(raw):
        if num in (1, 2):
            if wt != _LEN or not isinstance(value, bytes):
                raise _bad(f"map {name!r} entry has wrong wire type")
            if num == 1:
                key = _text(value, name)
            else:
                val = value
    return key, val


def _extra_items(raw: bytes, name: str) -> list[str]:
    items: list[str] = []
    for num, wt, value in _fields(raw):
        if num == 1:
            if wt != _LEN or not isinstance(value, bytes):
                raise _bad(f"map {name!r} value has wrong wire type")
            items.append(_text(value, name))
    return items


_INT_OR_STRING: Schema = {1: _f("type", "int64"), 2: _f("intVal", "int32"), 3: _f("strVal")}


def _int_or_string(raw: bytes, name: str) -> int | str:
    """intstr.IntOrString {1 type (0 Int, 1 String), 2 intVal, 3 strVal} -> JSON int or string."""
    d = _decode_message(raw, _INT_OR_STRING)
    t = d.get("type", 0)
    if t == 0:
        return int(d.get("intVal", 0))
    if t == 1:
        return str(d.get("strVal", ""))
    raise _bad(f"field {name!r} has invalid IntOrString type {t}")


def _quantity(raw: bytes, name: str) -> str:
    """resource.Quantity {1 string}: the canonical string, which is also its JSON form."""
    value = _decode_message(raw, {1: _f("string")}).get("string", "")
    if not value:
        raise _bad(f"map {name!r} has an empty quantity")  # Go's ParseQuantity("") fails too
    return str(value)


_ZERO: dict[str, Any] = {"string": "", "bytes": "", "bool": False, "int32": 0, "int64": 0}


def _scalar(field: Field, wt: int, value: int | bytes) -> Any:
    t = field.type
    if t in ("string", "bytes", "time"):
        if wt != _LEN or not isinstance(value, bytes):
            raise _bad(f"field {field.name!r} has wrong wire type {wt}")
        if t == "string":
            return _text(value, field.name)
        if t == "bytes":
            return base64.b64encode(value).decode("ascii")
        return _time(value, field.name)
    if wt != _VARINT or not isinstance(value, int):
        raise _bad(f"field {field.name!r} has wrong wire type {wt}")
    if t == "bool":
        return value != 0
    if t == "int32":
        return _signed32(value)
    return _signed64(value)


def _is_zero(v: Any) -> bool:
    return v is None or v is False or v == 0 or v == "" or v == [] or v == {}


def _decode_message(buf: bytes, schema: Schema) -> dict[str, Any]:
    singles: dict[int, Any] = {}
    present: set[int] = set()
    sub_chunks: dict[int, list[bytes]] = {}
    lists: dict[int, list[Any]] = {}
    maps: dict[int, dict[str, Any]] = {}

    for num, wt, value in _fields(buf):
        field = schema.get(num)
        if field is None:
            continue  # unknown field: skip
        if field.type in ("message", "intorstr", "map_string", "map_bytes", "map_quantity", "map_extra"):
            if wt != _LEN or not isinstance(value, bytes):
                raise _bad(f"field {field.name!r} has wrong wire type {wt}")
            if field.type == "map_string":
                k, v = _map_entry(value, field.name)
                maps.setdefault(num, {})[k] = _text(v, field.name)
            elif field.type == "map_bytes":
                k, v = _map_entry(value, field.name)
                maps.setdefault(num, {})[k] = base64.b64encode(v).decode("ascii")
            elif field.type == "map_quantity":
                k, v = _map_entry(value, field.name)
                maps.setdefault(num, {})[k] = _quantity(v, field.name)
            elif field.type == "map_extra":
                k, v = _map_entry(value, field.name)
                maps.setdefault(num, {})[k] = _extra_items(v, field.name)
            elif field.repeated:
                assert field.sub is not None
                lists.setdefault(num, []).append(_decode_message(value, field.sub))
            else:
                # Protobuf merge semantics: repeated occurrences of a singular message concatenate.
                sub_chunks.setdefault(num, []).append(value)
            continue
        decoded = _scalar(field, wt, value)
        if field.repeated:
            lists.setdefault(num, []).append(decoded)
        else:
            singles[num] = decoded  # last one wins
            present.add(num)

    out: dict[str, Any] = {}
    for num, field in schema.items():
        if field.type == "message" and not field.repeated:
            if num in sub_chunks:
                assert field.sub is not None
                out[field.name] = _decode_message(b"".join(sub_chunks[num]), field.sub)
        elif field.type == "intorstr":
            if num in sub_chunks:
                ios = _int_or_string(b"".join(sub_chunks[num]), field.name)
                if field.mode != "omit" or not _is_zero(ios):
                    out[field.name] = ios
        elif field.type in ("map_string", "map_bytes", "map_quantity", "map_extra"):
            if maps.get(num):
                out[field.name] = maps[num]
        elif field.repeated:
            if lists.get(num):
                out[field.name] = lists[num]
        elif num in present:
            v = singles[num]
            if v is not None and (field.mode != "omit" or not _is_zero(v)):
                out[field.name] = v
        elif field.mode == "keep" and field.type in _ZERO:
            out[field.name] = _ZERO[field.type]
    return out


# --- public API ----------------------------------------------------------------------------------------


def is_protobuf(content_type: str | None) -> bool:
    """True if a Content-Type header names the Kubernetes protobuf encoding."""
    if not content_type:
        return False
    return content_type.split(";", 1)[0].strip().lower() == CONTENT_TYPE


def supported_kinds() -> list[tuple[str, str]]:
    """(apiVersion, kind) pairs :func:`decode` understands."""
    return sorted(KINDS)


def decode_raw(api_version: str, kind: str, raw: bytes) -> dict[str, Any]:
    """Decode an object's generated-proto bytes (no envelope) for the given apiVersion/kind."""
    schema = KINDS.get((api_version, kind))
    if schema is None:
        raise StatusError(
            415,
            f"protobuf decoding of {kind or '<empty kind>'} in {api_version or '<empty apiVersion>'} "
            "is not supported; send application/json",
        )
    obj: dict[str, Any] = {"kind": kind, "apiVersion": api_version}
    body = _decode_message(raw, schema)
    obj["metadata"] = body.pop("metadata", {})
    obj.update(body)
    return obj


def decode(body: bytes) -> dict[str, Any]:
    """Decode a ``k8s\\x00``-prefixed ``runtime.Unknown`` envelope into the JSON-equivalent object.

    Raises ``StatusError(400)`` for malformed input and ``StatusError(415)`` for unsupported kinds or
    encodings.  Never raises anything else for any ``bytes`` input.
    """
    if not isinstance(body, bytes | bytearray | memoryview):
        raise _bad("body is not bytes")
    data = bytes(body)
    if not data.startswith(MAGIC):
        raise _bad("missing k8s protobuf magic prefix")
    api_version = kind = ""
    raw = b""
    for num, wt, value in _fields(data[len(MAGIC) :]):
        if num not in (1, 2, 3, 4):
            continue
        if wt != _LEN or not isinstance(value, bytes):
            raise _bad(f"envelope field {num} has wrong wire type {wt}")
        if num == 1:
            meta = _decode_message(value, _TYPE_META)
            api_version, kind = meta.get("apiVersion", ""), meta.get("kind", "")
        elif num == 2:
            raw = value
        elif num == 3 and value:
            raise StatusError(
                415, f"unsupported protobuf contentEncoding {_text(value, 'contentEncoding')!r}"
            )
        elif num == 4 and value and not is_protobuf(ctype := _text(value, "contentType")):
            raise StatusError(415, f"unsupported protobuf contentType {ctype!r}")
    if not kind or not api_version:
        raise _bad("envelope has no apiVersion/kind")
    return decode_raw(api_version, kind, raw)
