"""Generate src/kplane/api/schemas.json: the field names and types of the built-in kinds kplane serves.

The facts (which fields a kind has and their types) are read from the model metadata of the pinned official
``kubernetes`` client (``openapi_types`` / ``attribute_map``); only names and types are kept. The file drives
strict field validation, ``/openapi/v3`` and ``/openapi/v2``. Run with ``make schemas``.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

from kubernetes.client import models

ROOTS = [
    "V1Namespace", "V1Node", "V1Pod", "V1Binding", "V1Service", "V1Endpoints", "V1ConfigMap", "V1Secret",
    "V1ServiceAccount", "CoreV1Event", "V1Lease", "V1Role", "V1ClusterRole", "V1RoleBinding",
    "V1ClusterRoleBinding", "V1CertificateSigningRequest", "AuthenticationV1TokenRequest", "V1TokenReview",
    "V1SelfSubjectReview", "V1SubjectAccessReview", "V1SelfSubjectAccessReview", "V1LocalSubjectAccessReview",
    "V1SelfSubjectRulesReview", "V1Eviction", "V1EndpointSlice", "V1Status", "V1DeleteOptions",
]

# Types the client models loosely that the API defines precisely.
INT_OR_STRING = {("V1ServicePort", "targetPort"), ("V1HTTPGetAction", "port"), ("V1TCPSocketAction", "port")}


def convert(t: str) -> Any:
    m = re.fullmatch(r"List\[(.+)\]", t) or re.fullmatch(r"list\[(.+)\]", t)
    if m:
        return {"list": convert(m.group(1))}
    m = re.fullmatch(r"Dict\[str, (.+)\]", t) or re.fullmatch(r"dict\(str, (.+)\)", t)
    if m:
        return {"map": convert(m.group(1))}
    return {
        "str": "string", "int": "integer", "float": "number", "bool": "boolean", "datetime": "date-time",
        "bytes": "byte", "object": "any", "date": "date-time",
    }.get(t, t)


def main(out: Path) -> None:
    defs: dict[str, dict[str, Any]] = {}
    todo = list(ROOTS)
    while todo:
        name = todo.pop()
        if name in defs:
            continue
        cls = getattr(models, name)
        fields: dict[str, Any] = {}
        for attr, typ in cls.openapi_types.items():
            json_name = cls.attribute_map[attr]
            conv = convert(typ)
            if (name, json_name) in INT_OR_STRING:
                conv = "int-or-string"
            fields[json_name] = conv
            for ref in re.findall(r"[A-Z][A-Za-z0-9]+", typ):
                if ref not in ("List", "Dict") and hasattr(models, ref):
                    todo.append(ref)
        defs[name] = dict(sorted(fields.items()))
    out.write_text(json.dumps(dict(sorted(defs.items())), indent=None, separators=(",", ":")) + "\n")
    print(f"wrote {len(defs)} definitions to {out}", file=sys.stderr)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("src/kplane/api/schemas.json"))
