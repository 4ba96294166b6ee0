"""Create-only review kinds (TokenReview, SelfSubjectReview, the access reviews) and TokenRequest.

Nothing here is stored; each call answers from the authenticator, the authorizer and the store.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kplane.apiserver.authn import UserInfo
from kplane.apiserver.authz import Attributes, rule_allows
from kplane.errors import StatusError, invalid, not_found
from kplane.storage.base import KeyNotFound

if TYPE_CHECKING:
    from kplane.api.resources import Resource
    from kplane.apiserver.server import APIServer

Obj = dict[str, Any]

MAX_TOKEN_SECONDS = 2**32
_BOOL_ALL = {"verbs": ["*"], "apiGroups": ["*"], "resources": ["*"]}


class Reviews:
    def __init__(self, server: APIServer) -> None:
        self.server = server

    async def create(self, res: Resource, ns: str, body: Obj, user: UserInfo,
                     query: dict[str, str]) -> tuple[Obj, int]:
        obj = self.server._check_type(res, body)
        spec = obj.get("spec")
        if spec is not None and not isinstance(spec, dict):
            raise invalid(res.kind, "", [("spec", "FieldValueInvalid", "Invalid value: must be an object")], res.group)
        spec = spec or {}
        obj.setdefault("metadata", {})
        handler = {
            "TokenReview": self._token_review,
            "SelfSubjectReview": self._self_subject_review,
            "SubjectAccessReview": self._sar,
            "SelfSubjectAccessReview": self._ssar,
            "LocalSubjectAccessReview": self._lsar,
            "SelfSubjectRulesReview": self._ssrr,
        }[res.kind]
        obj["status"] = await handler(spec, user, ns)
        if res.kind == "SelfSubjectReview":
            obj.pop("spec", None)
        return obj, 201

    async def _token_review(self, spec: Obj, user: UserInfo, ns: str) -> Obj:
        token = spec.get("token")
        if not isinstance(token, str) or not token:
            raise invalid("TokenReview", "", [("spec.token", "FieldValueRequired", "Required value")],
                          "authentication.k8s.io")
        audiences = spec.get("audiences") or None
        try:
            who = await self.server.authn.authenticate_token(token, audiences=audiences)
        except StatusError:
            who = None
        if who is None:
            return {"authenticated": False, "user": {}, "error": "invalid bearer token"}
        from kplane.apiserver.authn import _with_authenticated

        who = _with_authenticated(who)
        out: Obj = {"authenticated": True, "user": who.as_json()}
        out["audiences"] = list(audiences) if audiences else list(self.server.options.api_audiences)
        return out

    async def _self_subject_review(self, spec: Obj, user: UserInfo, ns: str) -> Obj:
        return {"userInfo": user.as_json()}

    def _attributes(self, spec: Obj, who: UserInfo) -> Attributes:
        ra, nra = spec.get("resourceAttributes"), spec.get("nonResourceAttributes")
        if bool(ra) == bool(nra):
            raise invalid("SubjectAccessReview", "", [("spec.resourceAttributes", "FieldValueRequired",
                                                       "Required value: exactly one of nonResourceAttributes or "
                                                       "resourceAttributes must be specified")],
                          "authorization.k8s.io")
        if nra:
            assert isinstance(nra, dict)
            return Attributes(user=who, verb=str(nra.get("verb", "")), resource_request=False,
                              path=str(nra.get("path", "")))
        if not isinstance(ra, dict):
            raise StatusError(400, "spec.resourceAttributes must be an object")
        return Attributes(
            user=who, verb=str(ra.get("verb", "")), resource_request=True,
            namespace=str(ra.get("namespace", "")), api_group=str(ra.get("group", "")),
            api_version=str(ra.get("version", "")), resource=str(ra.get("resource", "")),
            subresource=str(ra.get("subresource", "")), name=str(ra.get("name", "")),
            field_selector=str((ra.get("fieldSelector") or {}).get("rawSelector", "")),
        )

    async def _decide(self, a: Attributes) -> Obj:
        allowed, reason = await self.server.authz.authorize(a)
        out: Obj = {"allowed": allowed}
        if reason:
            out["reason"] = reason
        return out

    async def _sar(self, spec: Obj, user: UserInfo, ns: str) -> Obj:
        name = spec.get("user")
        groups = spec.get("groups") or []
        if not name and not groups:
            raise invalid("SubjectAccessReview", "", [("spec.user", "FieldValueRequired",
                                                       "Required value: at least one of user or group must be "
                                                       "specified")], "authorization.k8s.io")
        who = UserInfo(str(name or ""), uid=str(spec.get("uid", "")), groups=tuple(groups),
                       extra=spec.get("extra") or {})
        return await self._decide(self._attributes(spec, who))

    async def _ssar(self, spec: Obj, user: UserInfo, ns: str) -> Obj:
        return await self._decide(self._attributes(spec, user))

    async def _lsar(self, spec: Obj, user: UserInfo, ns: str) -> Obj:
        ra = spec.get("resourceAttributes") or {}
        if ra.get("namespace", ns) != ns:
            raise StatusError(400, f"spec.resourceAttributes.namespace must match namespace: {ns}")
        if ra:
            ra["namespace"] = ns
        return await self._sar(spec, user, ns)

    async def _ssrr(self, spec: Obj, user: UserInfo, ns: str) -> Obj:
        namespace = str(spec.get("namespace", ""))
        if "system:masters" in user.groups:
            return {"resourceRules": [_BOOL_ALL], "nonResourceRules": [{"verbs": ["*"], "nonResourceURLs": ["*"]}],
                    "incomplete": False}
        rules = self.server.authz.rbac.applicable_rules(user, namespace)
        resource_rules, non_resource = [], []
        for r in rules:
            if r.get("nonResourceURLs"):
                non_resource.append({"verbs": r.get("verbs", []), "nonResourceURLs": r["nonResourceURLs"]})
            else:
                rr = {"verbs": r.get("verbs", []), "apiGroups": r.get("apiGroups", []),
                      "resources": r.get("resources", [])}
                if r.get("resourceNames"):
                    rr["resourceNames"] = r["resourceNames"]
                resource_rules.append(rr)
        out: Obj = {"resourceRules": resource_rules, "nonResourceRules": non_resource,
                    "incomplete": user.node_name is not None}
        if user.node_name is not None:
            out["evaluationError"] = "node authorizer does not support user rule resolution"
        return out

    async def token_request(self, ns: str, name: str, body: Obj, user: UserInfo, query: dict[str, str]) -> Obj:
        store = self.server.store
        if body.get("kind") not in (None, "TokenRequest") or body.get("apiVersion") not in (
                None, "authentication.k8s.io/v1"):
            raise StatusError(400, "the body must be an authentication.k8s.io/v1 TokenRequest")
        md = body.get("metadata") or {}
        if md.get("name") and md["name"] != name:
            raise StatusError(400, f"metadata.name ({md['name']}) must match the URL name ({name})")
        if md.get("namespace") and md["namespace"] != ns:
            raise StatusError(400, f"metadata.namespace ({md['namespace']}) must match the URL namespace ({ns})")
        try:
            sa = await store.get(f"/registry/core/serviceaccounts/{ns}/{name}")
        except KeyNotFound:
            raise not_found("serviceaccounts", name) from None
        spec = body.get("spec") or {}
        exp = spec.get("expirationSeconds", 3600)
        if not isinstance(exp, int) or exp < 600 or exp > MAX_TOKEN_SECONDS:
            raise invalid("TokenRequest", name, [("spec.expirationSeconds", "FieldValueInvalid",
                                                  f"Invalid value: {exp}: may not specify a duration less than 10 "
                                                  "minutes or longer than 2^32 seconds")], "authentication.k8s.io")
        audiences = spec.get("audiences") or list(self.server.options.api_audiences)
        if not isinstance(audiences, list) or not all(isinstance(a, str) and a for a in audiences):
            raise invalid("TokenRequest", name, [("spec.audiences", "FieldValueInvalid",
                                                  "Invalid value: must be a list of non-empty strings")],
                          "authentication.k8s.io")
        bound = None
        node = None
        ref = spec.get("boundObjectRef")
        if ref:
            kind, bname, buid = ref.get("kind"), ref.get("name"), ref.get("uid")
            plural = {"Pod": "pods", "Secret": "secrets", "Node": "nodes"}.get(str(kind))
            if plural is None:
                raise invalid("TokenRequest", name, [("spec.boundObjectRef.kind", "FieldValueNotSupported",
                                                      f'Unsupported value: "{kind}": supported values: "Pod", '
                                                      '"Secret", "Node"')], "authentication.k8s.io")
            key = f"/registry/core/nodes/{bname}" if kind == "Node" else f"/registry/core/{plural}/{ns}/{bname}"
            try:
                target = await store.get(key)
            except KeyNotFound:
                raise not_found(plural, str(bname)) from None
            tuid = target["metadata"].get("uid")
            if buid and buid != tuid:
                raise StatusError(409, f"the UID in the bound object reference ({buid}) does not match the UID in "
                                       f"record ({tuid}). The object might have been deleted and then recreated",
                                  reason="Conflict")
            if kind == "Pod":
                if target.get("spec", {}).get("serviceAccountName", "default") != name:
                    raise StatusError(400, f'cannot bind token for serviceaccount "{name}" to pod running with '
                                           f'different serviceaccount name.')
                node_name = target.get("spec", {}).get("nodeName")
                if node_name:
                    try:
                        n = await store.get(f"/registry/core/nodes/{node_name}")
                        node = (node_name, str(n["metadata"].get("uid", "")))
                    except KeyNotFound:
                        node = None
            bound = {"kind": str(kind), "name": str(bname), "uid": str(tuid)}
        if user.node_name is not None:
            if not bound or bound["kind"] != "Pod" or not (ref or {}).get("uid"):
                raise StatusError(403, f'node "{user.node_name}" can only request tokens bound to pods on itself '
                                       "with a uid")
            if node is None or node[0] != user.node_name:
                raise StatusError(403, f'node "{user.node_name}" can only request tokens for pods bound to itself')
        token, expires = self.server.sa_tokens.issue_bound(
            ns, name, str(sa["metadata"].get("uid", "")), audiences=list(audiences), expiration_s=exp,
            bound=bound, node=node,
        )
        return {
            "kind": "TokenRequest",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"name": name, "namespace": ns, "creationTimestamp": None},
            "spec": {"audiences": list(audiences), "expirationSeconds": exp,
                     "boundObjectRef": ref if ref else None},
            "status": {"token": token, "expirationTimestamp": expires.strftime("%Y-%m-%dT%H:%M:%SZ")},
        }


__all__ = ["Reviews", "rule_allows"]
