"""Object metadata helpers: names, labels, selectors, times, ages.

Rules follow apimachinery's validation (DNS-1123 subdomain / label names, qualified label keys) and
``duration.HumanDuration`` for the AGE column.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from kplane.errors import StatusError

DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")

Cause = tuple[str, str, str]


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.strptime(value[:19], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC)
    except ValueError:
        return None


def human_duration(seconds: float) -> str:
    """apimachinery ``duration.HumanDuration``: 5s, 3m20s, 2d4h, ..."""
    s = int(seconds)
    if s < 0:
        s = 0
    if s < 60 * 2:
        return f"{s}s"
    minutes = s // 60
    if minutes < 10:
        rem = s % 60
        return f"{minutes}m{rem}s" if rem else f"{minutes}m"
    if minutes < 60 * 3:
        return f"{minutes}m"
    hours = s // 3600
    if hours < 8:
        rem = minutes % 60
        return f"{hours}h{rem}m" if rem else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        rem = hours % 24
        return f"{hours // 24}d{rem}h" if rem else f"{hours // 24}d"
    if hours < 24 * 365 * 2:
        return f"{hours // 24}d"
    if hours < 24 * 365 * 8:
        dy = hours // 24 % 365
        return f"{hours // 24 // 365}y{dy}d" if dy else f"{hours // 24 // 365}y"
    return f"{hours // 24 // 365}y"


def age(obj: dict[str, Any]) -> str:
    ts = parse_time(obj.get("metadata", {}).get("creationTimestamp"))
    if ts is None:
        return "<unknown>"
    return human_duration((datetime.now(UTC) - ts).total_seconds())


def name_causes(name: Any, *, label: bool = False, field: str = "metadata.name") -> list[Cause]:
    if not isinstance(name, str) or not name:
        return [(field, "FieldValueRequired", "Required value: name or generateName is required")]
    limit = 63 if label else 253
    rx = DNS1123_LABEL if label else DNS1123_SUBDOMAIN
    if len(name) > limit:
        return [(field, "FieldValueInvalid", f'Invalid value: "{name[:80]}": must be no more than {limit} characters')]
    if not rx.match(name):
        what = "RFC 1123 label" if label else "RFC 1123 subdomain"
        return [
            (
                field,
                "FieldValueInvalid",
                f'Invalid value: "{name}": a lowercase {what} must consist of lower case alphanumeric '
                "characters, '-' or '.', and must start and end with an alphanumeric character",
            )
        ]
    return []


def segment_name_causes(name: Any, field: str = "metadata.name") -> list[Cause]:
    """apimachinery ``path.IsValidPathSegmentName``: any name that is safe as one URL path segment."""
    if not isinstance(name, str) or not name:
        return [(field, "FieldValueRequired", "Required value: name or generateName is required")]
    if name in (".", ".."):
        return [(field, "FieldValueInvalid", f'Invalid value: "{name}": may not be \'{name}\'')]
    for bad in ("/", "%"):
        if bad in name:
            return [(field, "FieldValueInvalid", f'Invalid value: "{name}": may not contain \'{bad}\'')]
    if len(name) > 253:
        return [(field, "FieldValueInvalid", "Invalid value: must be no more than 253 characters")]
    return []


def qualified_key_causes(key: Any, field: str) -> list[Cause]:
    if not isinstance(key, str) or not key:
        return [(field, "FieldValueInvalid", "Invalid value: name part must be non-empty")]
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not DNS1123_SUBDOMAIN.match(prefix)):
        return [(field, "FieldValueInvalid", f'Invalid value: "{key}": prefix part must be a DNS-1123 subdomain')]
    if len(name) > 63 or not _QUALIFIED_NAME.match(name):
        return [
            (
                field,
                "FieldValueInvalid",
                f'Invalid value: "{key}": name part must consist of alphanumeric characters, '
                "'-', '_' or '.', and must start and end with an alphanumeric character (at most 63)",
            )
        ]
    return []


def metadata_causes(meta: Any) -> list[Cause]:
    if not isinstance(meta, dict):
        return [("metadata", "FieldValueInvalid", "Invalid value: must be an object")]
    causes: list[Cause] = []
    labels = meta.get("labels") or {}
    if not isinstance(labels, dict):
        causes.append(("metadata.labels", "FieldValueInvalid", "Invalid value: must be a map of strings"))
    else:
        for k, v in labels.items():
            causes += qualified_key_causes(k, "metadata.labels")
            if not isinstance(v, str) or len(v) > 63 or not _LABEL_VALUE.match(v):
                causes.append(("metadata.labels", "FieldValueInvalid", f'Invalid value: "{v}": bad label value'))
    annotations = meta.get("annotations") or {}
    if not isinstance(annotations, dict):
        causes.append(("metadata.annotations", "FieldValueInvalid", "Invalid value: must be a map of strings"))
    else:
        total = 0
        for k, v in annotations.items():
            causes += qualified_key_causes(k, "metadata.annotations")
            if not isinstance(v, str):
                causes.append(("metadata.annotations", "FieldValueInvalid", f"Invalid value: {k} must be a string"))
            else:
                total += len(k) + len(v)
        if total > 256 * 1024:
            causes.append(("metadata.annotations", "FieldValueTooLong", "Too long: must have at most 262144 bytes"))
    return causes


# --- label selectors -------------------------------------------------------------------------------------

_SEL_TOKEN = re.compile(r"\s*(!=|==|=|!|\(|\)|,|\bin\b|\bnotin\b|[^\s!=,()]+)\s*")


def parse_label_selector(text: str) -> Callable[[dict[str, str]], bool]:
    """Parse the string form (``a=b,c!=d,e in (x,y),f notin (z),g,!h``) into a predicate over labels."""
    reqs: list[Callable[..., bool]] = []
    for part in _split_selector(text):
        part = part.strip()
        if not part:
            continue
        m = re.fullmatch(r"([^\s!=]+)\s+(in|notin)\s+\(([^)]*)\)", part)
        if m:
            key, op, vals = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",") if v.strip()}
            _check_key(key)
            if op == "in":
                reqs.append(lambda labels, k=key, vs=vals: labels.get(k) in vs)
            else:
                reqs.append(lambda labels, k=key, vs=vals: labels.get(k) not in vs)
            continue
        m = re.fullmatch(r"([^\s!=]+)\s*(==|=|!=)\s*([^\s!=]*)", part)
        if m:
            key, op, val = m.group(1), m.group(2), m.group(3)
            _check_key(key)
            if op == "!=":
                reqs.append(lambda labels, k=key, v=val: labels.get(k) != v)
            else:
                reqs.append(lambda labels, k=key, v=val: labels.get(k) == v)
            continue
        m = re.fullmatch(r"!\s*([^\s!=]+)", part)
        if m:
            _check_key(m.group(1))
            reqs.append(lambda labels, k=m.group(1): k not in labels)
            continue
        if re.fullmatch(r"[^\s!=(),]+", part):
            _check_key(part)
            reqs.append(lambda labels, k=part: k in labels)
            continue
        raise StatusError(400, f"unable to parse requirement: {part!r}: invalid label selector")
    return lambda labels: all(r(labels) for r in reqs)


def _check_key(key: str) -> None:
    if qualified_key_causes(key, "labelSelector"):
        raise StatusError(400, f"unable to parse requirement: invalid label key {key!r}")


def _split_selector(text: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if depth != 0:
        raise StatusError(400, f"unable to parse label selector {text!r}: unbalanced parentheses")
    parts.append(cur)
    return parts


def selector_matches(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    """A metav1.LabelSelector (matchLabels + matchExpressions) against labels. Empty selector matches all."""
    if not selector:
        return True
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, vals = expr.get("key"), expr.get("operator"), set(expr.get("values") or [])
        if op == "In" and labels.get(key) not in vals:
            return False
        if op == "NotIn" and labels.get(key) in vals:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def get_path(obj: Any, dotted: str) -> Any:
    cur = obj
    for part in dotted.split("."):
        if not isinstance(cur, dict):
            return None
        cur = cur.get(part)
    return cur


def parse_field_selector(text: str, allowed: set[str]) -> Callable[[dict[str, Any]], bool]:
    reqs: list[Callable[..., bool]] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.]+)\s*(==|=|!=)\s*(.*)", part)
        if not m:
            raise StatusError(400, f"invalid field selector: {part!r}")
        field, op, val = m.groups()
        if field not in allowed:
            raise StatusError(400, f'field label not supported: "{field}"')

        def value_of(obj: dict[str, Any], f: str = field) -> str:
            v = get_path(obj, f)
            if v is None:
                return ""
            if isinstance(v, bool):
                return "true" if v else "false"
            return str(v)

        if op == "!=":
            reqs.append(lambda o, v=val, g=value_of: g(o) != v)
        else:
            reqs.append(lambda o, v=val, g=value_of: g(o) == v)
    return lambda obj: all(r(obj) for r in reqs)
