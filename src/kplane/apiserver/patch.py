"""PATCH semantics: JSON merge patch (RFC 7386), JSON patch (RFC 6902) and strategic merge patch.

All functions are pure: they never mutate their inputs and the result never aliases them.
Malformed patches raise :class:`StatusError` 400; patches that cannot be applied raise 422.
"""

from __future__ import annotations

import copy
import re
from typing import Any

from kplane.errors import StatusError

__all__ = [
    "CONTENT_TYPE_JSON_PATCH",
    "CONTENT_TYPE_MERGE_PATCH",
    "CONTENT_TYPE_STRATEGIC_MERGE_PATCH",
    "apply_patch",
    "is_primitive_merge",
    "json_equal",
    "json_merge_patch",
    "json_patch",
    "merge_key",
    "strategic_merge_patch",
]

CONTENT_TYPE_JSON_PATCH = "application/json-patch+json"
CONTENT_TYPE_MERGE_PATCH = "application/merge-patch+json"
CONTENT_TYPE_STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"


def _bad(message: str) -> StatusError:
    return StatusError(400, message)


def _invalid(message: str) -> StatusError:
    return StatusError(422, message)


# ---------------------------------------------------------------------------------------------
# JSON equality (bool is not a number; 1 == 1.0)


def json_equal(a: Any, b: Any) -> bool:
    """Structural equality of JSON values, distinguishing booleans from numbers."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    if isinstance(a, str) and isinstance(b, str):
        return a == b
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_equal(v, b[k]) for k, v in a.items())
    return False


# ---------------------------------------------------------------------------------------------
# RFC 7386


def json_merge_patch(target: Any, patch: Any) -> Any:
    """Apply an RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result: dict[str, Any] = copy.deepcopy(target) if isinstance(target, dict) else {}
    _merge_into(result, patch)
    return result


def _merge_into(result: dict[str, Any], patch: dict[str, Any]) -> None:
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        elif isinstance(value, dict):
            current = result.get(key)
            if not isinstance(current, dict):
                current = {}
                result[key] = current
            _merge_into(current, value)
        else:
            result[key] = copy.deepcopy(value)


# ---------------------------------------------------------------------------------------------
# RFC 6902

_BAD_ESCAPE = re.compile(r"~(?![01])")
_INDEX = re.compile(r"0|[1-9][0-9]*")
_OPS = frozenset({"add", "remove", "replace", "move", "copy", "test"})


def _parse_pointer(pointer: Any, what: str = "path") -> list[str]:
    if not isinstance(pointer, str):
        raise _bad(f"json patch: {what!r} must be a string")
    if pointer == "":
        return []
    if not pointer.startswith("/"):
        raise _bad(f"json patch: malformed JSON pointer {pointer!r}: must start with '/'")
    if _BAD_ESCAPE.search(pointer):
        raise _bad(f"json patch: malformed JSON pointer {pointer!r}: bad '~' escape")
    return [t.replace("~1", "/").replace("~0", "~") for t in pointer[1:].split("/")]


def _fmt(tokens: list[str]) -> str:
    return "".join("/" + t.replace("~", "~0").replace("/", "~1") for t in tokens)


def _index(container: list[Any], token: str, tokens: list[str], *, allow_end: bool) -> int:
    if not _INDEX.fullmatch(token):
        raise _invalid(f"json patch: invalid array index {token!r} in path {_fmt(tokens)!r}")
    idx = int(token)
    limit = len(container) if allow_end else len(container) - 1
    if idx > limit:
        raise _invalid(f"json patch: array index {idx} out of range in path {_fmt(tokens)!r}")
    return idx


def _get(doc: Any, tokens: list[str]) -> Any:
    cur = doc
    for i, token in enumerate(tokens):
        here = tokens[: i + 1]
        if isinstance(cur, dict):
            if token not in cur:
                raise _invalid(f"json patch: path {_fmt(here)!r} does not exist")
            cur = cur[token]
        elif isinstance(cur, list):
            if token == "-":
                raise _invalid(f"json patch: path {_fmt(here)!r} does not exist")
            cur = cur[_index(cur, token, here, allow_end=False)]
        else:
            raise _invalid(f"json patch: path {_fmt(here)!r} does not exist")
    return cur


def _add(doc: Any, tokens: list[str], value: Any) -> Any:
    if not tokens:
        return value
    parent = _get(doc, tokens[:-1])
    last = tokens[-1]
    if isinstance(parent, dict):
        parent[last] = value
    elif isinstance(parent, list):
        if last == "-":
            parent.append(value)
        else:
            parent.insert(_index(parent, last, tokens, allow_end=True), value)
    else:
        raise _invalid(f"json patch: cannot add at {_fmt(tokens)!r}: parent is not an object or array")
    return doc


def _remove(doc: Any, tokens: list[str]) -> tuple[Any, Any]:
    """Remove the value at ``tokens``; return ``(doc, removed)``."""
    if not tokens:
        raise _invalid("json patch: cannot remove the whole document")
    parent = _get(doc, tokens[:-1])
    last = tokens[-1]
    if isinstance(parent, dict):
        if last not in parent:
            raise _invalid(f"json patch: cannot remove {_fmt(tokens)!r}: path does not exist")
        return doc, parent.pop(last)
    if isinstance(parent, list):
        if last == "-":
            raise _invalid(f"json patch: cannot remove {_fmt(tokens)!r}: path does not exist")
        return doc, parent.pop(_index(parent, last, tokens, allow_end=False))
    raise _invalid(f"json patch: cannot remove {_fmt(tokens)!r}: path does not exist")


def _replace(doc: Any, tokens: list[str], value: Any) -> Any:
    if not tokens:
        return value
    _get(doc, tokens)  # must exist
    parent = _get(doc, tokens[:-1])
    if isinstance(parent, dict):
        parent[tokens[-1]] = value
    else:
        parent[_index(parent, tokens[-1], tokens, allow_end=False)] = value
    return doc


def json_patch(target: Any, ops: Any) -> Any:
    """Apply an RFC 6902 JSON patch (a list of operations) atomically."""
    if not isinstance(ops, list):
        raise _bad("json patch: patch must be a JSON array of operations")
    doc = copy.deepcopy(target)
    for n, op in enumerate(ops):
        if not isinstance(op, dict):
            raise _bad(f"json patch: operation {n} is not an object")
        name = op.get("op")
        if name not in _OPS:
            raise _bad(f"json patch: operation {n}: unknown or missing op {name!r}")
        if "path" not in op:
            raise _bad(f"json patch: operation {n} ({name}): missing 'path'")
        path = _parse_pointer(op["path"])
        if name in ("add", "replace", "test") and "value" not in op:
            raise _bad(f"json patch: operation {n} ({name}): missing 'value'")
        if name in ("move", "copy") and "from" not in op:
            raise _bad(f"json patch: operation {n} ({name}): missing 'from'")

        if name == "add":
            doc = _add(doc, path, copy.deepcopy(op["value"]))
        elif name == "remove":
            doc, _ = _remove(doc, path)
        elif name == "replace":
            doc = _replace(doc, path, copy.deepcopy(op["value"]))
        elif name == "move":
            src = _parse_pointer(op["from"], "from")
            if path == src:
                _get(doc, src)
                continue
            if len(path) > len(src) and path[: len(src)] == src:
                raise _bad(
                    f"json patch: operation {n}: cannot move {_fmt(src)!r} into its own child {_fmt(path)!r}"
                )
            doc, value = _remove(doc, src)
            doc = _add(doc, path, value)
        elif name == "copy":
            src = _parse_pointer(op["from"], "from")
            doc = _add(doc, path, copy.deepcopy(_get(doc, src)))
        else:  # test
            actual = _get(doc, path)
            if not json_equal(actual, op["value"]):
                raise _invalid(f"json patch: test failed at {op['path']!r}: value does not match")
    return doc


# ---------------------------------------------------------------------------------------------
# Strategic merge patch: schema knowledge

Path = tuple[str, ...]

_WORKLOAD_TEMPLATE = ("spec", "template", "spec")
_POD_SPEC_PREFIXES: dict[str, tuple[Path, ...]] = {
    "Pod": (("spec",),),
    "PodTemplate": (("template", "spec"),),
    "Deployment": (_WORKLOAD_TEMPLATE,),
    "ReplicaSet": (_WORKLOAD_TEMPLATE,),
    "StatefulSet": (_WORKLOAD_TEMPLATE,),
    "DaemonSet": (_WORKLOAD_TEMPLATE,),
    "ReplicationController": (_WORKLOAD_TEMPLATE,),
    "Job": (_WORKLOAD_TEMPLATE,),
    "CronJob": (("spec", "jobTemplate", "spec", "template", "spec"),),
}

_CONTAINER_LISTS = ("containers", "initContainers", "ephemeralContainers")

# Relative to a pod spec. None means "no merge key: replace".
_POD_SPEC_KEYS: dict[Path, str | None] = {
    ("volumes",): "name",
    ("imagePullSecrets",): "name",
    ("hostAliases",): "ip",
    ("topologySpreadConstraints",): "topologyKey",
    ("resourceClaims",): "name",
    ("schedulingGates",): "name",
    ("tolerations",): None,
}
for _c in _CONTAINER_LISTS:
    _POD_SPEC_KEYS[(_c,)] = "name"
    _POD_SPEC_KEYS[(_c, "ports")] = "containerPort"
    _POD_SPEC_KEYS[(_c, "env")] = "name"
    _POD_SPEC_KEYS[(_c, "volumeMounts")] = "mountPath"
    _POD_SPEC_KEYS[(_c, "volumeDevices")] = "devicePath"
    _POD_SPEC_KEYS[(_c, "resizePolicy")] = "resourceName"

# Whole-object paths, per kind ("*" = every built-in kind).
_OBJECT_KEYS: dict[str, dict[Path, str | None]] = {
    "*": {
        ("metadata", "ownerReferences"): "uid",
        ("status", "conditions"): "type",
    },
    "Pod": {
        ("status", "podIPs"): "ip",
        ("status", "hostIPs"): "ip",
    },
    "Node": {
        ("status", "addresses"): "type",
    },
    "Service": {
        ("spec", "ports"): "port",
    },
    "Endpoints": {
        ("subsets",): None,
    },
}

_PRIMITIVE_MERGE_META: frozenset[str] = frozenset({"finalizers"})

BUILTIN_KINDS: frozenset[str] = frozenset(
    {
        *_POD_SPEC_PREFIXES,
        "Node",
        "Service",
        "Endpoints",
        "Namespace",
        "ConfigMap",
        "Secret",
        "ServiceAccount",
        "PersistentVolume",
        "PersistentVolumeClaim",
        "Event",
        "LimitRange",
        "ResourceQuota",
        "Binding",
        "ControllerRevision",
        "Lease",
    }
)


def _template_meta_prefixes(kind: str) -> tuple[Path, ...]:
    return tuple((*p[:-1], "metadata") for p in _POD_SPEC_PREFIXES.get(kind, ()))


def merge_key(path: Path, kind: str) -> str | None:
    """The strategic-merge key of the list at ``path`` (field names from the root), or None (replace)."""
    if kind not in BUILTIN_KINDS:
        return None
    for prefix in _POD_SPEC_PREFIXES.get(kind, ()):
        if path[: len(prefix)] == prefix:
            rel = path[len(prefix) :]
            if rel in _POD_SPEC_KEYS:
                return _POD_SPEC_KEYS[rel]
    for prefix in _template_meta_prefixes(kind):
        if path == (*prefix, "ownerReferences"):
            return "uid"
    specific = _OBJECT_KEYS.get(kind, {})
    if path in specific:
        return specific[path]
    return _OBJECT_KEYS["*"].get(path)


def is_primitive_merge(path: Path, kind: str) -> bool:
    """Whether the primitive list at ``path`` merges as a set (e.g. ``metadata.finalizers``)."""
    if kind not in BUILTIN_KINDS or not path or path[-1] not in _PRIMITIVE_MERGE_META:
        return False
    return path[:-1] == ("metadata",) or path[:-1] in _template_meta_prefixes(kind)


# ---------------------------------------------------------------------------------------------
# Strategic merge patch: algorithm

_PATCH = "$patch"
_RETAIN = "$retainKeys"
_DELETE_PRIM = "$deleteFromPrimitiveList/"
_ORDER = "$setElementOrder/"


def _is_directive(key: str) -> bool:
    return key.startswith("$")


def strategic_merge_patch(target: dict[str, Any], patch: dict[str, Any], kind: str) -> dict[str, Any]:
    """Apply a Kubernetes strategic merge patch to the object ``target`` of the given ``kind``."""
    if not isinstance(patch, dict):
        raise _bad("strategic merge patch: patch must be a JSON object")
    if not isinstance(target, dict):
        raise _invalid("strategic merge patch: target must be a JSON object")
    work = copy.deepcopy(target)
    result = _smp_map(work, patch, (), kind)
    return result if result is not None else {}


def _smp_map(orig: dict[str, Any], patch: dict[str, Any], path: Path, kind: str) -> dict[str, Any] | None:
    """Merge ``patch`` into ``orig`` (owned, may be mutated). None means: delete this map."""
    directive = patch.get(_PATCH, "merge")
    if directive == "delete":
        return None
    if directive == "replace":
        rest = {k: v for k, v in patch.items() if k != _PATCH}
        return _smp_map({}, rest, path, kind)
    if directive != "merge":
        raise _bad(f"strategic merge patch: unknown $patch directive {directive!r} at {_dotted(path)}")

    if _RETAIN in patch:
        keep = patch[_RETAIN]
        if not isinstance(keep, list) or not all(isinstance(k, str) for k in keep):
            raise _bad(f"strategic merge patch: $retainKeys at {_dotted(path)} must be a list of strings")
        for key in [k for k in orig if k not in keep]:
            del orig[key]

    orders: dict[str, list[Any]] = {}
    for key, value in patch.items():
        if key.startswith(_DELETE_PRIM):
            field = key[len(_DELETE_PRIM) :]
            if not isinstance(value, list):
                raise _bad(f"strategic merge patch: {key} at {_dotted(path)} must be a list")
            current = orig.get(field)
            if isinstance(current, list):
                orig[field] = [x for x in current if not any(json_equal(x, d) for d in value)]
        elif key.startswith(_ORDER):
            if not isinstance(value, list):
                raise _bad(f"strategic merge patch: {key} at {_dotted(path)} must be a list")
            orders[key[len(_ORDER) :]] = value
        elif _is_directive(key) and key not in (_PATCH, _RETAIN):
            raise _bad(f"strategic merge patch: unknown directive {key!r} at {_dotted(path)}")

    for key, value in patch.items():
        if _is_directive(key):
            continue
        sub = (*path, key)
        if value is None:
            orig.pop(key, None)
        elif isinstance(value, dict):
            current = orig.get(key)
            merged = _smp_map(current if isinstance(current, dict) else {}, value, sub, kind)
            if merged is None:
                orig.pop(key, None)
            else:
                orig[key] = merged
        elif isinstance(value, list):
            current = orig.get(key)
            orig[key] = _smp_list(current if isinstance(current, list) else [], value, sub, kind)
        else:
            orig[key] = copy.deepcopy(value)

    for field, order in orders.items():
        current = orig.get(field)
        if isinstance(current, list):
            orig[field] = _reorder(current, order, merge_key((*path, field), kind))
    return orig


def _smp_list(orig: list[Any], patch: list[Any], path: Path, kind: str) -> list[Any]:
    """Merge the list ``patch`` into ``orig`` (owned, may be mutated)."""
    replace_marker = [
        e for e in patch if isinstance(e, dict) and e.get(_PATCH) == "replace" and len(e) == 1
    ]
    if replace_marker:
        rest = [e for e in patch if not (isinstance(e, dict) and e.get(_PATCH) == "replace" and len(e) == 1)]
        return _smp_list([], rest, path, kind) if merge_key(path, kind) else copy.deepcopy(rest)

    key = merge_key(path, kind)
    if key is not None and all(isinstance(e, dict) for e in patch):
        result = list(orig)
        for elem in patch:
            directive = elem.get(_PATCH, "merge")
            if key not in elem:
                raise _invalid(
                    f"strategic merge patch: element of {_dotted(path)} does not contain merge key {key!r}"
                )
            want = elem[key]
            if directive == "delete":
                result = [e for e in result if not _has_key(e, key, want)]
                continue
            idx = next((i for i, e in enumerate(result) if _has_key(e, key, want)), None)
            if idx is None:
                merged = _smp_map({}, elem, path, kind)
                if merged is not None:
                    result.append(merged)
            else:
                merged = _smp_map(result[idx], elem, path, kind)
                if merged is None:
                    del result[idx]
                else:
                    result[idx] = merged
        return result

    if is_primitive_merge(path, kind):
        result = list(orig)
        for elem in patch:
            if not any(json_equal(elem, e) for e in result):
                result.append(copy.deepcopy(elem))
        return result

    return copy.deepcopy(patch)


def _has_key(elem: Any, key: str, want: Any) -> bool:
    return isinstance(elem, dict) and key in elem and json_equal(elem[key], want)


def _reorder(items: list[Any], order: list[Any], key: str | None) -> list[Any]:
    """Order ``items`` as ``order`` lists them; unlisted items follow in their relative order."""

    def matches(item: Any, spec: Any) -> bool:
        if isinstance(spec, dict) and isinstance(item, dict):
            if key is not None and key in spec:
                return key in item and json_equal(item[key], spec[key])
            return bool(spec) and all(k in item and json_equal(item[k], v) for k, v in spec.items())
        return json_equal(item, spec)

    remaining = list(items)
    ordered: list[Any] = []
    for spec in order:
        for i, item in enumerate(remaining):
            if matches(item, spec):
                ordered.append(remaining.pop(i))
                break
    return ordered + remaining


def _dotted(path: Path) -> str:
    return "." + ".".join(path) if path else "<root>"


# ---------------------------------------------------------------------------------------------
# Dispatch by Content-Type


def apply_patch(content_type: str, target: dict[str, Any], patch: Any, kind: str) -> Any:
    """Apply ``patch`` to ``target`` according to the PATCH request's Content-Type."""
    ctype = content_type.split(";", 1)[0].strip().lower()
    if ctype == CONTENT_TYPE_JSON_PATCH:
        return json_patch(target, patch)
    if ctype == CONTENT_TYPE_MERGE_PATCH:
        return json_merge_patch(target, patch)
    if ctype == CONTENT_TYPE_STRATEGIC_MERGE_PATCH:
        return strategic_merge_patch(target, patch, kind)
    raise StatusError(415, f"unsupported patch content type {content_type!r}")
