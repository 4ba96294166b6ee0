"""Discovery (legacy and aggregated v2) and OpenAPI v2/v3 documents, all derived from the resource table."""

from __future__ import annotations

import hashlib
import json
import re
from functools import cache
from importlib import resources as ir
from typing import Any

from kplane.api.resources import RESOURCES, Resource, group_versions

AGGREGATED_CT = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList"


def _api_resource(r: Resource) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": r.plural,
        "singularName": r.singular,
        "namespaced": r.namespaced,
        "kind": r.kind,
        "verbs": r.verbs,
    }
    if r.short_names:
        out["shortNames"] = r.short_names
    if r.categories:
        out["categories"] = r.categories
    return out


def resource_list(group: str, version: str) -> dict[str, Any] | None:
    rs = [r for r in RESOURCES if r.group == group and r.version == version]
    if not rs:
        return None
    items = []
    for r in rs:
        items.append(_api_resource(r))
        for sub, (kind, verbs) in r.subresources.items():
            items.append({"name": f"{r.plural}/{sub}", "singularName": "", "namespaced": r.namespaced,
                          "kind": kind, "verbs": verbs})
    return {"kind": "APIResourceList", "apiVersion": "v1",
            "groupVersion": f"{group}/{version}" if group else version, "resources": items}


def api_versions() -> dict[str, Any]:
    return {"kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": ""}]}


def api_group(group: str) -> dict[str, Any] | None:
    versions = group_versions().get(group)
    if not group or not versions:
        return None
    gvs = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
    return {"kind": "APIGroup", "apiVersion": "v1", "name": group, "versions": gvs, "preferredVersion": gvs[0]}


def api_group_list() -> dict[str, Any]:
    groups = [api_group(g) for g in group_versions() if g]
    return {"kind": "APIGroupList", "apiVersion": "v1", "groups": [g for g in groups if g]}


def aggregated(core: bool) -> dict[str, Any]:
    items = []
    for group, versions in group_versions().items():
        if (group == "") != core:
            continue
        vs = []
        for v in versions:
            resources = []
            for r in RESOURCES:
                if r.group != group or r.version != v:
                    continue
                entry: dict[str, Any] = {
                    "resource": r.plural,
                    "responseKind": {"group": group, "version": v, "kind": r.kind},
                    "scope": "Namespaced" if r.namespaced else "Cluster",
                    "singularResource": r.singular,
                    "verbs": r.verbs,
                }
                if r.short_names:
                    entry["shortNames"] = r.short_names
                if r.categories:
                    entry["categories"] = r.categories
                subs = [
                    {"subresource": s, "responseKind": {"group": group, "version": v, "kind": k}, "verbs": vb}
                    for s, (k, vb) in r.subresources.items()
                ]
                if subs:
                    entry["subresources"] = subs
                resources.append(entry)
            vs.append({"version": v, "resources": resources, "freshness": "Current"})
        items.append({"metadata": {"name": group, "creationTimestamp": None}, "versions": vs})
    return {"kind": "APIGroupDiscoveryList", "apiVersion": "apidiscovery.k8s.io/v2", "metadata": {}, "items": items}


# --- OpenAPI -----------------------------------------------------------------------------------------------


@cache
def schemas() -> dict[str, dict[str, Any]]:
    data = ir.files("kplane.api").joinpath("schemas.json").read_text()
    loaded: dict[str, dict[str, Any]] = json.loads(data)
    return loaded


_MODEL_PREFIX = re.compile(r"^(?:[A-Z][a-z]+)*V1(?=[A-Z])")


@cache
def display_names() -> dict[str, str]:
    """Definition names as upstream spells them (``PodSpec``), not as the client models do (``V1PodSpec``);
    a short name two models would share keeps the long form."""
    short: dict[str, list[str]] = {}
    for n in schemas():
        short.setdefault(_MODEL_PREFIX.sub("", n), []).append(n)
    out = {}
    for s, longs in short.items():
        for n in longs:
            out[n] = s if len(longs) == 1 else n
    return out


def _schema_of(t: Any, ref_prefix: str) -> dict[str, Any]:
    if isinstance(t, dict):
        if "list" in t:
            return {"type": "array", "items": _schema_of(t["list"], ref_prefix)}
        return {"type": "object", "additionalProperties": _schema_of(t["map"], ref_prefix)}
    simple: dict[str, dict[str, Any]] = {
        "string": {"type": "string"},
        "integer": {"type": "integer", "format": "int64"},
        "number": {"type": "number", "format": "double"},
        "boolean": {"type": "boolean"},
        "date-time": {"type": "string", "format": "date-time"},
        "byte": {"type": "string", "format": "byte"},
        "any": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
        "int-or-string": {"x-kubernetes-int-or-string": True},
    }
    if t in simple:
        return dict(simple[t])
    return {"$ref": f"{ref_prefix}{display_names().get(t, t)}"}


def _definition(name: str, ref_prefix: str) -> dict[str, Any]:
    fields = schemas()[name]
    props = {k: _schema_of(v, ref_prefix) for k, v in fields.items()}
    return {"type": "object", "properties": props}


def _reachable(roots: list[str]) -> list[str]:
    seen: set[str] = set()
    todo = list(roots)
    defs = schemas()
    while todo:
        n = todo.pop()
        if n in seen or n not in defs:
            continue
        seen.add(n)
        for v in defs[n].values():
            while isinstance(v, dict):
                v = v.get("list", v.get("map"))
            if isinstance(v, str) and v in defs:
                todo.append(v)
    return sorted(seen)


_PARAM_FV = {
    "name": "fieldValidation",
    "in": "query",
    "description": "Strict, Warn or Ignore: how the server treats unknown and duplicate fields.",
    "schema": {"type": "string", "uniqueItems": True},
}


def _ops(r: Resource, item: bool) -> dict[str, Any]:
    gvk = {"group": r.group, "version": r.version, "kind": r.kind}
    ops: dict[str, Any] = {}

    def op(verb: str, action: str, params: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        ref = f"#/components/schemas/{display_names()[r.schema]}"
        return {
            "operationId": f"{verb}{r.kind}",
            "x-kubernetes-action": action,
            "x-kubernetes-group-version-kind": gvk,
            "parameters": params or [],
            "responses": {"200": {"description": "OK", "content": {"application/json": {"schema": {"$ref": ref}}}}},
        }

    if item:
        if "get" in r.verbs:
            ops["get"] = op("read", "get")
        if "update" in r.verbs:
            ops["put"] = op("replace", "put", [_PARAM_FV])
        if "patch" in r.verbs:
            ops["patch"] = op("patch", "patch", [_PARAM_FV])
        if "delete" in r.verbs:
            ops["delete"] = op("delete", "delete")
    else:
        if "list" in r.verbs:
            ops["get"] = op("list", "list")
        if "create" in r.verbs:
            ops["post"] = op("create", "post", [_PARAM_FV])
        if "deletecollection" in r.verbs:
            ops["delete"] = op("deletecollection", "deletecollection")
    return ops


@cache
def openapi_v3_gv(group: str, version: str) -> bytes:
    rs = [r for r in RESOURCES if r.group == group and r.version == version]
    base = f"/apis/{group}/{version}" if group else "/api/v1"
    paths: dict[str, Any] = {}
    for r in rs:
        coll = f"{base}/namespaces/{{namespace}}/{r.plural}" if r.namespaced else f"{base}/{r.plural}"
        paths[coll] = _ops(r, item=False)
        if not r.virtual:
            paths[f"{coll}/{{name}}"] = _ops(r, item=True)
    prefix = "#/components/schemas/"
    names = display_names()
    comps = {names[n]: _definition(n, prefix) for n in _reachable([r.schema for r in rs])}
    for r in rs:
        comps[names[r.schema]]["x-kubernetes-group-version-kind"] = [
            {"group": r.group, "version": r.version, "kind": r.kind}
        ]
    doc = {"openapi": "3.0.0", "info": {"title": "Kubernetes", "version": "v1.37.0"}, "paths": paths,
           "components": {"schemas": comps}}
    return json.dumps(doc, separators=(",", ":")).encode()


def openapi_v3_path(group: str, version: str) -> str:
    return f"apis/{group}/{version}" if group else "api/v1"


@cache
def openapi_v3_index() -> bytes:
    paths = {}
    for group, versions in group_versions().items():
        for v in versions:
            h = hashlib.sha512(openapi_v3_gv(group, v)).hexdigest()[:64].upper()
            p = openapi_v3_path(group, v)
            paths[p] = {"serverRelativeURL": f"/openapi/v3/{p}?hash={h}"}
    return json.dumps({"paths": paths}).encode()


@cache
def openapi_v2() -> bytes:
    prefix = "#/definitions/"
    names = display_names()
    defs = {names[n]: _definition(n, prefix) for n in _reachable([r.schema for r in RESOURCES])}
    for r in RESOURCES:
        defs[names[r.schema]]["x-kubernetes-group-version-kind"] = [
            {"group": r.group, "version": r.version, "kind": r.kind}
        ]
    doc = {"swagger": "2.0", "info": {"title": "Kubernetes", "version": "v1.37.0"}, "paths": {}, "definitions": defs}
    return json.dumps(doc, separators=(",", ":")).encode()


def unknown_fields(obj: Any, schema: str) -> list[str]:
    """Paths of fields the schema does not declare (``spec.foo``, ``spec.containers[0].bar``)."""
    out: list[str] = []
    _walk(obj, schema, "", out)
    return out


def _walk(value: Any, t: Any, path: str, out: list[str]) -> None:
    defs = schemas()
    if isinstance(t, dict):
        if "list" in t and isinstance(value, list):
            for i, v in enumerate(value):
                _walk(v, t["list"], f"{path}[{i}]", out)
        elif "map" in t and isinstance(value, dict):
            for k, v in value.items():
                _walk(v, t["map"], f"{path}[{k}]", out)
        return
    if not isinstance(t, str) or t not in defs or not isinstance(value, dict):
        return
    fields = defs[t]
    for k, v in value.items():
        p = f"{path}.{k}" if path else k
        if k not in fields:
            out.append(p)
        else:
            _walk(v, fields[k], p, out)
