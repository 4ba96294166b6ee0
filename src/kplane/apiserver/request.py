"""Request info: turn a method and URL path into the attributes authorization and routing use.

Mirrors apiserver ``RequestInfoFactory``: ``/api/v1/...`` and ``/apis/<group>/<version>/...`` are resource
requests, everything else is non-resource; verbs derive from the method, with ``list``/``watch`` for
collection GETs and ``deletecollection`` for collection DELETEs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import unquote

VERBS = {"POST": "create", "GET": "get", "HEAD": "get", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}


@dataclass
class RequestInfo:
    resource_request: bool
    verb: str
    path: str
    api_prefix: str = ""
    api_group: str = ""
    api_version: str = ""
    namespace: str = ""
    resource: str = ""
    subresource: str = ""
    name: str = ""
    parts: list[str] = field(default_factory=list)
    rest: str = ""  # for proxy subresources: the path after .../proxy
    selector_name: str = ""  # list/watch narrowed by fieldSelector metadata.name=<x>: the name for authorization

    @property
    def authz_name(self) -> str:
        return self.name or self.selector_name


def _truthy(value: str | None) -> bool:
    return value is not None and value not in ("false", "0")


def parse(method: str, path: str, query: dict[str, str]) -> RequestInfo:
    verb = VERBS.get(method.upper(), method.lower())
    raw = [unquote(p) for p in path.strip("/").split("/")] if path.strip("/") else []
    info = RequestInfo(resource_request=False, verb=verb, path=path)
    if len(raw) >= 1 and raw[0] == "api":
        prefix, rest = "api", raw[1:]
        group = ""
        if not rest:
            return info
        version, rest = rest[0], rest[1:]
    elif len(raw) >= 1 and raw[0] == "apis":
        prefix, rest = "apis", raw[1:]
        if len(rest) < 2:
            return info
        group, version, rest = rest[0], rest[1], rest[2:]
    else:
        return info
    if not rest:
        return info
    if any(p in ("", ".", "..") for p in rest):
        # path traversal or empty segments never reach a resource handler
        info.resource_request = True
        info.resource = "<invalid>"
        return info
    info.resource_request = True
    info.api_prefix, info.api_group, info.api_version = prefix, group, version
    if rest[0] == "watch":
        verb = "watch"
        rest = rest[1:]
    if len(rest) >= 2 and rest[0] == "namespaces" and len(rest) != 2 and not (
        len(rest) == 3 and rest[2] in ("status", "finalize")
    ):
        info.namespace = rest[1]
        rest = rest[2:]
    elif len(rest) >= 1 and rest[0] == "namespaces" and len(rest) >= 2:
        # /namespaces/{name} and /namespaces/{name}/status|finalize: the namespace object itself
        info.namespace = rest[1]
    if not rest:
        info.resource_request = False
        return info
    info.parts = rest
    info.resource = rest[0]
    if len(rest) >= 2:
        info.name = rest[1]
    if len(rest) >= 3:
        info.subresource = rest[2]
        if info.subresource == "proxy":
            info.rest = "/" + "/".join(rest[3:]) if len(rest) > 3 else ""
        elif len(rest) > 3:
            info.subresource = "<invalid>"
    if verb == "get" and not info.name:
        verb = "watch" if _truthy(query.get("watch")) else "list"
    elif verb == "delete" and not info.name:
        verb = "deletecollection"
    if verb in ("list", "watch") and not info.name:
        fs = query.get("fieldSelector", "")
        for part in fs.split(","):
            k, _, v = part.partition("=")
            if k.strip() == "metadata.name" and v and not v.startswith("="):
                info.selector_name = v.strip()
    info.verb = verb
    return info
