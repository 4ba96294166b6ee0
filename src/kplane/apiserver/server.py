"""The API server: HTTPS only, every request authenticated, authorized, admitted, then served from the store.

One catch-all aiohttp handler: parse the path into a :class:`RequestInfo`, authenticate, authorize, then route
to a REST operation on the resource table. Every error is a ``Status`` body.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import ssl
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from kplane import __version__
from kplane.api import meta
from kplane.api.resources import RESOURCES, Resource, lookup
from kplane.apiserver import discovery, request
from kplane.apiserver import protobuf as pb
from kplane.apiserver.admission import Admission
from kplane.apiserver.authn import Authenticator, UserInfo
from kplane.apiserver.authz import Attributes, Authorizer
from kplane.apiserver.patch import (
    json_merge_patch,
    json_patch,
    strategic_merge_patch,
)
from kplane.apiserver.reviews import Reviews
from kplane.errors import StatusError, already_exists, conflict, invalid, not_found
from kplane.storage.base import Change, Compacted, KeyExists, KeyNotFound, RVConflict, Store

log = logging.getLogger(__name__)

MAX_BODY = 3 * 1024 * 1024
WATCH_BATCH = 256  # initial watch events written at once
WATCH_LINES_KEPT = 1024  # encoded watch events kept for the other watchers of the same revision
WATCH_PUSH_HIGH_WATER = 64 * 1024  # above this many unsent bytes a watch's events wait in the store's queue
JSON_CT = "application/json"
APPLY_CT = "application/apply-patch+yaml"
PATCH_TYPES = {
    "application/json-patch+json",
    "application/merge-patch+json",
    "application/strategic-merge-patch+json",
    APPLY_CT,
}
_GEN_CHARS = "bcdfghjklmnpqrstvwxz2456789"
_X509_V_FLAG_NO_CHECK_TIME = 0x200000

Obj = dict[str, Any]


def dumps(obj: Any) -> bytes:
    return orjson.dumps(obj)


def json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=dumps(obj), status=status, content_type=JSON_CT, headers=headers)


def status_response(err: StatusError) -> web.Response:
    headers = {}
    if err.code == 401:
        headers["WWW-Authenticate"] = 'Basic realm="kubernetes-master"'
    return json_response(err.status(), err.code, headers)


def success_status(details: dict[str, Any] | None = None) -> Obj:
    body: Obj = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}
    if details:
        body["details"] = details
    return body


def wants_table(accept: str) -> bool:
    return "as=Table" in accept


def _gen_suffix() -> str:
    return "".join(secrets.choice(_GEN_CHARS) for _ in range(5))


@dataclass
class ServerOptions:
    advertise_address: str = "127.0.0.1"
    port: int = 6443
    issuer: str = "https://kubernetes.default.svc.cluster.local"
    api_audiences: tuple[str, ...] = ("https://kubernetes.default.svc.cluster.local",)


class APIServer:
    def __init__(
        self,
        *,
        store: Store,
        authn: Authenticator,
        authz: Authorizer,
        sa_tokens: Any,
        ca_pem: bytes,
        options: ServerOptions,
    ) -> None:
        self.store = store
        self.authn = authn
        self.authz = authz
        self.sa_tokens = sa_tokens
        self.ca_pem = ca_pem
        self.options = options
        self.admission = Admission(store)
        self.kubelets: Any = None  # KubeletConnector, set by the control plane
        self.ipam: Any = None  # ServiceIPAM (ClusterIPs, node ports), set by the control plane
        self.dialer: Any = None  # egress Dialer for proxy subresources (None: dial directly)
        self.reviews = Reviews(self)
        self.started = time.monotonic()
        self._watchers: set[asyncio.Task[Any]] = set()
        # resourceVersion -> the JSON watch event line framed as one HTTP/1.1 chunk (see watch())
        self._watch_lines: dict[int, bytes] = {}
        self.shutting_down = asyncio.Event()

    # --- application --------------------------------------------------------------------------------------

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY, handler_args={"max_field_size": 16384})
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    @staticmethod
    def ssl_context(pki: Path) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(pki / "apiserver.crt", pki / "apiserver.key")
        ctx.load_verify_locations(pki / "ca.crt")
        ctx.verify_mode = ssl.CERT_OPTIONAL
        # Certificate times are checked by the x509 authenticator, so an expired client certificate gets a
        # 401 Status instead of a bare TLS alert. The chain itself is still verified by the handshake.
        ctx.verify_flags = ssl.VerifyFlags(int(ctx.verify_flags) | _X509_V_FLAG_NO_CHECK_TIME)
        ctx.set_alpn_protocols(["http/1.1"])
        return ctx

    async def handle(self, req: web.Request) -> web.StreamResponse:
        try:
            return await self._handle(req)
        except StatusError as err:
            return status_response(err)
        except web.HTTPRequestEntityTooLarge:
            return status_response(StatusError(413, f"Request entity too large: limit is {MAX_BODY}"))
        except (ConnectionResetError, asyncio.CancelledError):
            raise
        except Exception as exc:  # the server keeps serving; the client gets a Status
            log.exception("internal error serving %s %s", req.method, req.path)
            return status_response(StatusError(500, f"Internal error occurred: {type(exc).__name__}"))

    async def _handle(self, req: web.Request) -> web.StreamResponse:
        query = {k: v for k, v in req.query.items()}
        info = request.parse(req.method, req.path, query)
        user = await self._authenticate(req)
        verb = info.verb
        if info.resource == "pods" and info.subresource in ("exec", "attach", "portforward"):
            verb = "create"  # a WebSocket upgrade is a GET, but it runs a command: never "get" permission
        elif info.subresource == "proxy" and _streaming_proxy(req, info):
            # the same through a proxy subresource: an upgrade, or the kubelet's streaming paths (where the kubelet
            # sees the apiserver's own identity), needs create, so "get nodes/proxy" cannot run commands
            verb = "create"
        attrs = Attributes(
            user=user, verb=verb, resource_request=info.resource_request, path=req.path,
            namespace=info.namespace, api_group=info.api_group, api_version=info.api_version,
            resource=info.resource, subresource=info.subresource, name=info.authz_name,
            field_selector=query.get("fieldSelector", ""),
        )
        if info.resource_request and info.resource == "<invalid>":
            raise StatusError(404, "the server could not find the requested resource")
        allowed, reason = await self.authz.authorize(attrs)
        if not allowed:
            msg = attrs.describe() + (f": {reason}" if reason else "")
            if info.resource_request:  # upstream's shape: pods "x" is forbidden: User "u" cannot ...
                gr = f"{info.resource}.{info.api_group}" if info.api_group else info.resource
                if info.subresource:
                    gr = f"{gr}/{info.subresource}" if not info.api_group else \
                        f"{info.resource}.{info.api_group}/{info.subresource}"
                msg = (f'{gr} "{info.name}" is forbidden: {msg}' if info.name else f"{gr} is forbidden: {msg}")
            else:
                msg = f"forbidden: {msg}"
            details: dict[str, Any] = {}
            if info.resource_request:
                details = {"name": info.name, "group": info.api_group, "kind": info.resource}
            raise StatusError(403, msg, details=details or None)
        if not info.resource_request:
            return await self._non_resource(req, info)
        return await self._resource(req, info, user, query)

    async def _authenticate(self, req: web.Request) -> UserInfo:
        der = None
        sslobj = req.transport.get_extra_info("ssl_object") if req.transport else None
        if sslobj is not None:
            der = sslobj.getpeercert(binary_form=True)
        return await self.authn.authenticate(
            peer_cert_der=der,
            authorization=req.headers.get("Authorization"),
            ws_protocols=req.headers.get("Sec-WebSocket-Protocol") if req.headers.get("Upgrade") else None,
        )

    # --- non-resource -------------------------------------------------------------------------------------

    async def _non_resource(self, req: web.Request, info: request.RequestInfo) -> web.StreamResponse:
        path = req.path.rstrip("/") or "/"
        accept = req.headers.get("Accept", "")
        if req.method not in ("GET", "HEAD"):
            raise StatusError(405, f"the server does not allow this method on the requested resource: {path}")
        if path == "/version":
            return json_response(version_info())
        if path in ("/healthz", "/livez", "/readyz") or path.startswith(("/healthz/", "/livez/", "/readyz/")):
            if path.startswith("/readyz") and self.shutting_down.is_set():
                return web.Response(status=500, text="[-]shutdown failed: reason withheld\nreadyz check failed")
            if "verbose" in req.query:
                return web.Response(text=f"[+]ping ok\n[+]etcd ok\n{path.strip('/')} check passed\n")
            return web.Response(text="ok")
        if path == "/api":
            if "as=APIGroupDiscoveryList" in accept:
                return web.Response(body=dumps(discovery.aggregated(core=True)),
                                    headers={"Content-Type": discovery.AGGREGATED_CT})
            return json_response(discovery.api_versions())
        if path == "/apis":
            if "as=APIGroupDiscoveryList" in accept:
                return web.Response(body=dumps(discovery.aggregated(core=False)),
                                    headers={"Content-Type": discovery.AGGREGATED_CT})
            return json_response(discovery.api_group_list())
        parts = path.strip("/").split("/")
        if parts[0] == "api" and len(parts) == 2:
            doc = discovery.resource_list("", parts[1])
            if doc:
                return json_response(doc)
        if parts[0] == "apis" and len(parts) == 2:
            g = discovery.api_group(parts[1])
            if g:
                return json_response(g)
        if parts[0] == "apis" and len(parts) == 3:
            doc = discovery.resource_list(parts[1], parts[2])
            if doc:
                return json_response(doc)
        if path == "/openapi/v3":
            return web.Response(body=discovery.openapi_v3_index(), content_type=JSON_CT)
        if path.startswith("/openapi/v3/"):
            sub = path[len("/openapi/v3/"):].split("/")
            gv = ("", sub[1]) if sub[0] == "api" and len(sub) == 2 else (
                (sub[1], sub[2]) if sub[0] == "apis" and len(sub) == 3 else None)
            if gv and discovery.resource_list(*gv):
                return web.Response(body=discovery.openapi_v3_gv(*gv), content_type=JSON_CT)
        if path == "/openapi/v2":
            if "json" in accept or "*/*" in accept or not accept:
                return web.Response(body=discovery.openapi_v2(), content_type=JSON_CT)
            raise StatusError(406, "only application/json is served for /openapi/v2")
        if path == "/.well-known/openid-configuration":
            return json_response({
                "issuer": self.options.issuer,
                "jwks_uri": f"https://{self.options.advertise_address}:{self.options.port}/openid/v1/jwks",
                "response_types_supported": ["id_token"],
                "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": ["ES256"],
            })
        if path == "/openid/v1/jwks":
            from kplane.pki import jwks

            return json_response(jwks(self.sa_tokens.public_keys))
        raise StatusError(404, "the server could not find the requested resource")

    # --- resources ----------------------------------------------------------------------------------------

    async def _resource(self, req: web.Request, info: request.RequestInfo, user: UserInfo,
                        query: dict[str, str]) -> web.StreamResponse:
        res = lookup(info.api_group, info.api_version, info.resource)
        if res is None:
            raise StatusError(404, "the server could not find the requested resource")
        ns = info.namespace if res.namespaced else ""
        if res.kind == "Namespace":
            ns = ""
        if res.namespaced and not ns and info.name:
            raise StatusError(404, "the server could not find the requested resource")
        sub = info.subresource
        if sub and sub not in res.subresources:
            raise StatusError(404, "the server could not find the requested resource")
        if res.virtual:
            if req.method != "POST" or info.name:
                raise StatusError(405, f"the server does not allow this method on the requested resource ({res.plural})")
            body = await self._read_body(req)
            out, code = await self.reviews.create(res, ns, body, user, query)
            return json_response(out, code)
        name = info.name
        if name and res.kind == "Namespace":
            name = info.namespace if not info.name or info.name == info.namespace else info.name
        m = req.method
        if sub == "proxy":
            return await self._proxy(req, res, ns, name)
        if sub in ("log", "exec", "attach", "portforward"):
            return await self._node_stream(req, res, ns, name, sub, query)
        if sub == "token" and m == "POST":
            body = await self._read_body(req)
            return json_response(await self.reviews.token_request(ns, name, body, user, query), 201)
        if sub == "binding" or (res.plural == "bindings"):
            body = await self._read_body(req)
            await self.bind_pod(ns, name or str(body.get("metadata", {}).get("name", "")), body)
            return json_response(success_status(), 201)
        if sub == "eviction":
            await self.delete(res, ns, name, {}, user, query)
            return json_response(success_status(), 201)
        if not name:
            if m in ("GET", "HEAD"):
                if info.verb == "watch":
                    return await self.watch(req, res, ns, query)
                return json_response(await self.list_objects(res, ns, query, req.headers.get("Accept", "")))
            if m == "POST":
                body = await self._read_body(req)
                obj, warnings = await self.create(res, ns, body, user, query)
                return json_response(obj, 201, _warning_headers(warnings))
            if m == "DELETE" and "deletecollection" in res.verbs:
                return json_response(await self.delete_collection(res, ns, user, query))
            raise StatusError(405, f"the server does not allow this method on the requested resource ({res.plural})")
        if m in ("GET", "HEAD"):
            obj = await self.get(res, ns, name)
            if wants_table(req.headers.get("Accept", "")) and not sub:
                return json_response(self.table(res, [obj], obj["metadata"].get("resourceVersion", ""), query))
            return json_response(obj)
        if m == "PUT":
            body = await self._read_body(req)
            obj, warnings = await self.update(res, ns, name, body, user, query, sub)
            return json_response(obj, 200, _warning_headers(warnings))
        if m == "PATCH":
            ct = (req.content_type or "").lower()
            if ct not in PATCH_TYPES:
                raise StatusError(415, f"the body of the request was in an unknown format - accepted media types "
                                       f"include: {', '.join(sorted(PATCH_TYPES))}")
            raw = await req.read()
            obj, code, warnings = await self.patch(res, ns, name, ct, raw, user, query, sub)
            return json_response(obj, code, _warning_headers(warnings))
        if m == "DELETE":
            body = await self._read_body(req, optional=True)
            return json_response(await self.delete(res, ns, name, body, user, query))
        raise StatusError(405, f"the server does not allow this method on the requested resource ({res.plural})")

    async def _proxy(self, req: web.Request, res: Resource, ns: str, raw_id: str) -> web.StreamResponse:
        """nodes/pods/services ``{[scheme:]name[:port]}/proxy/...`` to the named object's own address."""
        from kplane.apiserver import proxy

        pid = proxy.split_id(raw_id)
        raw_parts = req.raw_path.split("?", 1)[0].strip("/").split("/")
        idx = next((i for i in range(3, len(raw_parts)) if raw_parts[i] == "proxy" and raw_parts[i - 2] == res.plural),
                   None)
        if idx is None:
            raise StatusError(400, "invalid proxy path")
        tail = raw_parts[idx + 1:]
        rest = "/" + "/".join(tail) + ("/" if tail and req.raw_path.split("?", 1)[0].endswith("/") else "")
        prefix = "/" + "/".join(raw_parts[:idx + 1]) + "/"
        obj = await self.get(res, ns, pid.name)
        if res.kind == "Pod":
            target = proxy.pod_target(obj, pid)
        elif res.kind == "Service":
            endpoints = None
            with contextlib.suppress(KeyNotFound):
                endpoints = await self.store.get(f"/registry/core/endpoints/{ns}/{pid.name}")
            target = proxy.service_target(obj, endpoints, pid)
        elif res.kind == "Node":
            target = await proxy.node_target(obj, pid)
        else:
            raise StatusError(404, "the server could not find the requested resource")
        return await proxy.forward(self, req, target, rest, prefix)

    async def _node_stream(self, req: web.Request, res: Resource, ns: str, name: str, sub: str,
                           query: dict[str, str]) -> web.StreamResponse:
        from kplane.apiserver import kubelet as kc

        obj = await self.get(res, ns, name)
        if res.kind != "Pod":
            raise StatusError(404, "the server could not find the requested resource")
        node_name = obj.get("spec", {}).get("nodeName")
        if not node_name:
            raise StatusError(400, f"pod {name} does not have a host assigned")
        if self.kubelets is None:
            raise StatusError(503, "this apiserver has no kubelet client configured")
        try:
            node = await self.store.get(f"/registry/core/nodes/{node_name}")
        except KeyNotFound:
            raise StatusError(503, f'node "{node_name}" of pod {name} does not exist') from None
        target = kc.node_target(node)
        q = dict(query)
        if sub == "portforward":
            q["__ports__"] = ",".join(p for v in req.query.getall("ports", []) for p in v.split(",") if p)
            path = kc.kubelet_path(sub, ns, name, "", q)
            return await kc.proxy_upgrade(self.kubelets, target, path, req)
        container = kc.pick_container(obj, query.get("container", ""))
        if sub == "exec":
            commands = req.query.getall("command", [])
            if not commands:
                raise StatusError(400, "you must specify at least 1 command")
            q["__commands__"] = "\x00".join(commands)
        path = kc.kubelet_path(sub, ns, name, container, q)
        if sub == "log":
            return await kc.proxy_logs(self.kubelets, target, path, req)
        return await kc.proxy_upgrade(self.kubelets, target, path, req)

    async def _read_body(self, req: web.Request, *, optional: bool = False) -> Obj:
        raw = await req.read()
        if not raw:
            if optional:
                return {}
            raise StatusError(400, "the request body is empty")
        if pb.is_protobuf(req.content_type):
            return pb.decode(raw)
        ct = (req.content_type or "").lower()
        if ct not in ("application/json", "application/octet-stream", "", "text/plain") and "yaml" not in ct:
            raise StatusError(415, f"the body of the request was in an unknown format - accepted media types "
                                   f"include: application/json, application/vnd.kubernetes.protobuf ({ct})")
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise StatusError(400, f"couldn't get version/kind; json parse error: {exc}") from exc
        if not isinstance(obj, dict):
            raise StatusError(400, "couldn't get version/kind; json parse error: the body is not a JSON object")
        return obj

    # --- REST operations ----------------------------------------------------------------------------------

    async def get(self, res: Resource, ns: str, name: str) -> Obj:
        try:
            return await self.store.get(res.key(ns, name))
        except KeyNotFound:
            raise not_found(res.plural, name, res.group) from None

    def _predicate(self, res: Resource, query: dict[str, str]) -> Callable[[Obj], bool] | None:
        ls = query.get("labelSelector")
        fs = query.get("fieldSelector")
        preds: list[Callable[[Obj], bool]] = []
        if ls:
            sel = meta.parse_label_selector(ls)
            preds.append(lambda o: sel(o.get("metadata", {}).get("labels") or {}))
        if fs:
            fsel = meta.parse_field_selector(fs, res.all_field_selectors())
            preds.append(fsel)
        if not preds:
            return None
        return lambda o: all(p(o) for p in preds)

    async def list_objects(self, res: Resource, ns: str, query: dict[str, str], accept: str) -> Obj:
        if "list" not in res.verbs:
            raise StatusError(405, f"the server does not allow this method on the requested resource ({res.plural})")
        limit = _int_param(query, "limit", 0)
        if limit < 0:
            raise StatusError(400, "limit must be non-negative")
        cont = query.get("continue") or None
        try:
            items, rv, nxt = await self.store.list(
                res.prefix(ns), limit=limit, continue_key=cont, predicate=self._predicate(res, query)
            )
        except Compacted as exc:
            raise StatusError(410, "The provided continue parameter is too old to display a consistent list "
                                   "result. You can start a new list without the continue parameter.") from exc
        except ValueError as exc:
            raise StatusError(400, f"invalid continue token: {exc}") from exc
        if wants_table(accept):
            return self.table(res, items, str(rv), query, cont=nxt)
        lst: Obj = {"kind": f"{res.kind}List", "apiVersion": res.api_version,
                    "metadata": {"resourceVersion": str(rv)}, "items": items}
        if nxt:
            lst["metadata"]["continue"] = nxt
        return lst

    def table(self, res: Resource, items: list[Obj], rv: str, query: dict[str, str], *,
              cont: str | None = None, columns: bool = True) -> Obj:
        include = query.get("includeObject", "Metadata")
        rows = []
        for o in items:
            if res.cells is not None:
                cells = res.cells(o)[: len(res.columns)]
            else:
                cells = [o.get("metadata", {}).get("name", ""), meta.age(o)]
            if include == "None":
                obj_out: Obj | None = None
            elif include == "Object":
                obj_out = o
            else:
                obj_out = {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                           "metadata": o.get("metadata", {})}
            row: Obj = {"cells": cells}
            if obj_out is not None:
                row["object"] = obj_out
            rows.append(row)
        cols = res.columns or [
            discovery_col("Name", "name"), discovery_col("Age", ""),
        ]
        table: Obj = {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {"resourceVersion": rv},
                      "rows": rows}
        if columns:
            table["columnDefinitions"] = [
                {"name": c.name, "type": c.type, "format": c.format, "description": c.description,
                 "priority": c.priority}
                for c in cols
            ]
        if cont:
            table["metadata"]["continue"] = cont
        return table

    async def create(self, res: Resource, ns: str, body: Obj, user: UserInfo,
                     query: dict[str, str]) -> tuple[Obj, list[str]]:
        if "create" not in res.verbs:
            raise StatusError(405, f"the server does not allow this method on the requested resource ({res.plural})")
        obj = self._check_type(res, body)
        md = obj.setdefault("metadata", {})
        if not isinstance(md, dict):
            raise invalid(res.kind, "", [("metadata", "FieldValueInvalid", "Invalid value: must be an object")],
                          res.group)
        if res.namespaced:
            if md.get("namespace") and md["namespace"] != ns:
                raise StatusError(400, "the namespace of the provided object does not match the namespace sent "
                                       "on the request")
            md["namespace"] = ns
        else:
            md.pop("namespace", None)
        if not md.get("name") and md.get("generateName"):
            md["name"] = f"{md['generateName']}{_gen_suffix()}"
        if md.get("resourceVersion"):
            raise StatusError(400, "resourceVersion should not be set on objects to be created")
        warnings = self._field_validation(res, obj, query)
        for k in ("uid", "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "selfLink"):
            md.pop(k, None)
        md["uid"] = str(uuid.uuid4())
        md["creationTimestamp"] = meta.now_rfc3339()
        if "spec" in obj and res.kind not in ("Namespace",):
            md["generation"] = 1
        self._record_manager(obj, query, "Update", res)
        if res.default:
            res.default(obj)
        await self.admission.admit_create(res, obj, user)
        self._validate(res, obj)
        if res.namespaced:
            await self.admission.namespace_lifecycle(ns)
        dry = query.get("dryRun") == "All"
        alloc = None
        if res.kind == "Service" and self.ipam is not None:
            alloc = await self.ipam.prepare_create(obj, dry_run=dry)
        if dry:
            return obj, warnings
        try:
            created = await self.store.create(res.key(ns, md["name"]), obj)
        except KeyExists:
            if alloc is not None:
                await self.ipam.release(alloc)
            raise already_exists(res.plural, md["name"], res.group) from None
        except BaseException:
            if alloc is not None:
                await self.ipam.release(alloc)
            raise
        return created, warnings

    def _check_type(self, res: Resource, body: Obj) -> Obj:
        api_version, kind = body.get("apiVersion"), body.get("kind")
        if api_version and api_version != res.api_version:
            raise StatusError(400, f"the API version in the data ({api_version}) does not match the expected API "
                                   f"version ({res.api_version})")
        if kind and kind != res.kind:
            raise StatusError(400, f"the kind in the data ({kind}) does not match the expected kind ({res.kind})")
        obj = dict(body)
        obj["apiVersion"], obj["kind"] = res.api_version, res.kind
        return obj

    def _validate(self, res: Resource, obj: Obj) -> None:
        md = obj.get("metadata", {})
        name = md.get("name", "")
        causes = meta.segment_name_causes(name) if res.segment_name else meta.name_causes(name, label=res.label_name)
        causes += meta.metadata_causes(md)
        if res.validate:
            causes += res.validate(obj)
        if causes:
            raise invalid(res.kind, str(name), causes, res.group)

    def _field_validation(self, res: Resource, obj: Obj, query: dict[str, str]) -> list[str]:
        mode = query.get("fieldValidation", "Warn")
        if mode not in ("Strict", "Warn", "Ignore", ""):
            raise StatusError(400, f"fieldValidation must be one of Ignore, Warn or Strict, got {mode!r}")
        if mode == "Ignore":
            return []
        unknown = discovery.unknown_fields(obj, res.schema)
        if not unknown:
            return []
        if mode == "Strict":
            text = ", ".join(f'unknown field "{u}"' for u in unknown)
            raise StatusError(400, f"strict decoding error: {text}")
        return [f'unknown field "{u}"' for u in unknown]

    def _record_manager(self, obj: Obj, query: dict[str, str], operation: str, res: Resource,
                        fields: Obj | None = None, subresource: str = "") -> None:
        manager = query.get("fieldManager")
        if not manager:
            return
        if len(manager) > 128:
            raise StatusError(422, "fieldManager: Too long: may not be more than 128 bytes")
        md = obj.setdefault("metadata", {})
        entries = [e for e in md.get("managedFields") or []
                   if not (e.get("manager") == manager and e.get("operation") == operation
                           and e.get("subresource", "") == subresource)]
        entry: Obj = {"manager": manager, "operation": operation, "apiVersion": res.api_version,
                      "time": meta.now_rfc3339(), "fieldsType": "FieldsV1",
                      "fieldsV1": fields if fields is not None else _fieldset(obj)}
        if subresource:
            entry["subresource"] = subresource
        entries.append(entry)
        md["managedFields"] = entries

    async def update(self, res: Resource, ns: str, name: str, body: Obj, user: UserInfo,
                     query: dict[str, str], sub: str = "", *, expected_rv: int | None = None,
                     ) -> tuple[Obj, list[str]]:
        if "update" not in res.verbs:
            raise StatusError(405, f"the server does not allow this method on the requested resource ({res.plural})")
        obj = self._check_type(res, body)
        md = obj.get("metadata")
        if not isinstance(md, dict):
            raise invalid(res.kind, name, [("metadata", "FieldValueRequired", "Required value")], res.group)
        if md.get("name") and md["name"] != name:
            raise StatusError(400, f"the name of the object ({md['name']}) does not match the name on the URL "
                                   f"({name})")
        if res.namespaced and md.get("namespace") and md["namespace"] != ns:
            raise StatusError(400, "the namespace of the provided object does not match the namespace sent on "
                                   "the request")
        warnings = self._field_validation(res, obj, query)
        old = await self.get(res, ns, name)
        rv_text = md.get("resourceVersion")
        if expected_rv is None and rv_text:
            try:
                expected_rv = int(rv_text)
            except ValueError:
                raise invalid(res.kind, name, [("metadata.resourceVersion", "FieldValueInvalid",
                                                f'Invalid value: "{rv_text}": must be an integer')], res.group) from None
            if expected_rv != int(old["metadata"]["resourceVersion"]):
                raise conflict(res.plural, name, res.group)
        new = self._merge_update(res, old, obj, sub)
        self._record_manager(new, query, "Update", res, subresource=sub if sub in ("status",) else "")
        if res.default:
            res.default(new)
        await self.admission.admit_update(res, old, new, user, sub)
        self._validate(res, new)
        if res.validate_update and (causes := res.validate_update(old, new)):
            raise invalid(res.kind, name, causes, res.group)
        dry = query.get("dryRun") == "All"
        if res.kind == "Service" and self.ipam is not None and sub != "status":
            added, dropped = await self.ipam.prepare_update(old, new, dry_run=dry)
            if dry:
                return new, warnings
            try:
                out = await self._store_update(res, ns, name, new, old, expected_rv)
            except BaseException:
                await self.ipam.release(added)
                raise
            await self.ipam.release(dropped)
            return out, warnings
        if dry:
            return new, warnings
        return await self._store_update(res, ns, name, new, old, expected_rv), warnings

    async def _store_update(self, res: Resource, ns: str, name: str, new: Obj, old: Obj,
                            expected_rv: int | None) -> Obj:
        rv = expected_rv if expected_rv is not None else int(old["metadata"]["resourceVersion"])
        md = new["metadata"]
        try:
            if md.get("deletionTimestamp") and not md.get("finalizers") and not _ns_finalizers(res, new):
                return await self._deleted(res, await self.store.delete(res.key(ns, name), rv))
            return await self.store.update(res.key(ns, name), new, rv)
        except RVConflict:
            raise conflict(res.plural, name, res.group) from None
        except KeyNotFound:
            raise not_found(res.plural, name, res.group) from None

    def _merge_update(self, res: Resource, old: Obj, new: Obj, sub: str) -> Obj:
        """Which parts of the submitted object an update may change, by subresource."""
        out = dict(new)
        omd, nmd = old["metadata"], dict(new.get("metadata") or {})
        for k in ("uid", "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "namespace",
                  "name", "generation"):
            if k in omd:
                nmd[k] = omd[k]
            else:
                nmd.pop(k, None)
        nmd["resourceVersion"] = omd.get("resourceVersion")
        if sub in ("status", "approval", "finalize"):
            base = dict(old)
            md = dict(omd)
            if sub == "status":
                base["status"] = new.get("status", {})
                if res.kind == "CertificateSigningRequest":
                    # /status sets the certificate and Failed conditions; Approved/Denied only via /approval
                    st = dict(old.get("status") or {})
                    nst = new.get("status") or {}
                    st.update({k: v for k, v in nst.items() if k != "conditions"})
                    keep = [c for c in st.get("conditions") or [] if c.get("type") in ("Approved", "Denied")]
                    rest = [c for c in nst.get("conditions") or [] if c.get("type") not in ("Approved", "Denied")]
                    st["conditions"] = keep + rest
                    if not st["conditions"]:
                        del st["conditions"]
                    base["status"] = st
            elif sub == "approval":
                st = dict(old.get("status") or {})
                st["conditions"] = (new.get("status") or {}).get("conditions") or []
                base["status"] = st
            else:
                spec = dict(old.get("spec") or {})
                spec["finalizers"] = (new.get("spec") or {}).get("finalizers") or []
                base["spec"] = spec
            md["managedFields"] = nmd.get("managedFields", omd.get("managedFields"))
            base["metadata"] = {k: v for k, v in md.items() if v is not None}
            return base
        if res.has_status:
            if "status" in old:
                out["status"] = old["status"]
            else:
                out.pop("status", None)
        if res.kind == "CertificateSigningRequest":
            out["spec"] = old.get("spec")
        if old.get("spec") != out.get("spec") and "generation" in omd:
            nmd["generation"] = int(omd["generation"]) + 1
        out["metadata"] = nmd
        return out

    async def patch(self, res: Resource, ns: str, name: str, ct: str, raw: bytes, user: UserInfo,
                    query: dict[str, str], sub: str) -> tuple[Obj, int, list[str]]:
        if "patch" not in res.verbs:
            raise StatusError(405, f"the server does not allow this method on the requested resource ({res.plural})")
        try:
            patch = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            if ct == APPLY_CT:
                raise StatusError(415, "apply patches must be JSON (YAML documents are not accepted by kplane); "
                                       f"error: {exc}") from exc
            raise StatusError(400, f"error decoding patch: {exc}") from exc
        if ct == APPLY_CT:
            return await self._apply(res, ns, name, patch, user, query, sub)
        for _ in range(8):
            old = await self.get(res, ns, name)
            base = _strip_for_patch(old)
            if ct == "application/json-patch+json":
                patched = json_patch(base, patch)
            elif ct == "application/merge-patch+json":
                patched = json_merge_patch(base, patch)
            else:
                if not isinstance(patch, dict):
                    raise StatusError(400, "strategic merge patch must be a JSON object")
                patched = strategic_merge_patch(base, patch, res.kind)
            if not isinstance(patched, dict):
                raise StatusError(422, "the patched object is not a JSON object")
            prv = (patched.get("metadata") or {}).get("resourceVersion")
            if prv and prv != old["metadata"]["resourceVersion"]:
                raise conflict(res.plural, name, res.group)
            patched.setdefault("metadata", {})["resourceVersion"] = old["metadata"]["resourceVersion"]
            try:
                obj, warnings = await self.update(res, ns, name, patched, user, query, sub,
                                                  expected_rv=int(old["metadata"]["resourceVersion"]))
                return obj, 200, warnings
            except StatusError as err:
                if err.reason == "Conflict" and not prv:
                    continue
                raise
        raise conflict(res.plural, name, res.group)

    async def _apply(self, res: Resource, ns: str, name: str, patch: Any, user: UserInfo,
                     query: dict[str, str], sub: str) -> tuple[Obj, int, list[str]]:
        """Server-side apply: upsert, merging the applied configuration into the live object and recording the
        manager's field set. Fields this manager applied before and no longer applies are removed."""
        manager = query.get("fieldManager")
        if not manager:
            raise StatusError(400, "PATCH requests of type apply must supply fieldManager")
        if not isinstance(patch, dict):
            raise StatusError(400, "apply patch must be a JSON object")
        applied = self._check_type(res, patch)
        amd = applied.get("metadata") or {}
        if amd.get("name") and amd["name"] != name:
            raise StatusError(400, f"the name of the object ({amd['name']}) does not match the name on the URL "
                                   f"({name})")
        amd["name"] = name
        applied["metadata"] = amd
        fields = _fieldset(applied)
        for _ in range(8):
            try:
                old = await self.get(res, ns, name)
            except StatusError as err:
                if err.code != 404 or sub:
                    raise
                q = dict(query)
                obj, warnings = await self.create(res, ns, applied, user, q)
                self._set_apply_entry(obj, manager, res, fields)
                if query.get("dryRun") != "All":
                    obj = await self.store.update(res.key(ns, name), obj, int(obj["metadata"]["resourceVersion"]))
                return obj, 201, warnings
            base = _strip_for_patch(old)
            previous = _manager_fields(old, manager)
            _remove_dropped(base, previous, fields)
            merged = strategic_merge_patch(base, applied, res.kind)
            merged["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"]
            self._set_apply_entry(merged, manager, res, fields)
            try:
                obj, warnings = await self.update(res, ns, name, merged, user, {**query, "fieldManager": ""}, sub,
                                                  expected_rv=int(old["metadata"]["resourceVersion"]))
                return obj, 200, warnings
            except StatusError as err:
                if err.reason == "Conflict":
                    continue
                raise
        raise conflict(res.plural, name, res.group)

    def _set_apply_entry(self, obj: Obj, manager: str, res: Resource, fields: Obj) -> None:
        md = obj.setdefault("metadata", {})
        entries = [e for e in md.get("managedFields") or []
                   if not (e.get("manager") == manager and e.get("operation") == "Apply")]
        entries.append({"manager": manager, "operation": "Apply", "apiVersion": res.api_version,
                        "time": meta.now_rfc3339(), "fieldsType": "FieldsV1", "fieldsV1": fields})
        md["managedFields"] = entries

    async def delete(self, res: Resource, ns: str, name: str, body: Obj, user: UserInfo,
                     query: dict[str, str]) -> Obj:
        if "delete" not in res.verbs:
            raise StatusError(405, f"the server does not allow this method on the requested resource ({res.plural})")
        await self.admission.admit_delete(res, ns, name, user)
        for _ in range(8):
            old = await self.get(res, ns, name)
            pre = body.get("preconditions") or {}
            if pre.get("uid") and pre["uid"] != old["metadata"].get("uid"):
                raise StatusError(409, f"Precondition failed: UID in precondition: {pre['uid']}, UID in object "
                                       f"meta: {old['metadata'].get('uid')}", reason="Conflict")
            if pre.get("resourceVersion") and pre["resourceVersion"] != old["metadata"].get("resourceVersion"):
                raise conflict(res.plural, name, res.group)
            if query.get("dryRun") == "All":
                return old
            grace = body.get("gracePeriodSeconds")
            if grace is None and "gracePeriodSeconds" in query:
                grace = _int_param(query, "gracePeriodSeconds", 0)
            md = old["metadata"]
            rv = int(md["resourceVersion"])
            graceful = res.kind == "Pod" and old.get("spec", {}).get("nodeName") and (
                grace is None or grace > 0)
            if grace is None and res.kind == "Pod":
                grace = old.get("spec", {}).get("terminationGracePeriodSeconds", 30)
            if md.get("finalizers") or _ns_finalizers(res, old) or graceful:
                if md.get("deletionTimestamp"):
                    if res.kind == "Pod" and grace == 0:
                        pass  # force: fall through to the real delete
                    else:
                        return old
                else:
                    new = dict(old)
                    nmd = dict(md)
                    when = datetime.now(UTC) + timedelta(seconds=int(grace or 0) if graceful else 0)
                    nmd["deletionTimestamp"] = when.strftime("%Y-%m-%dT%H:%M:%SZ")
                    nmd["deletionGracePeriodSeconds"] = int(grace or 0) if graceful else 0
                    new["metadata"] = nmd
                    if res.kind == "Namespace":
                        new["status"] = {**(old.get("status") or {}), "phase": "Terminating"}
                    try:
                        return await self.store.update(res.key(ns, name), new, rv)
                    except RVConflict:
                        continue
            try:
                return await self._deleted(res, await self.store.delete(res.key(ns, name), rv))
            except RVConflict:
                continue
            except KeyNotFound:
                raise not_found(res.plural, name, res.group) from None
        raise conflict(res.plural, name, res.group)

    async def _deleted(self, res: Resource, obj: Obj) -> Obj:
        """What an object held outside its own key is given back once it is gone."""
        if res.kind == "Service" and self.ipam is not None:
            from kplane.apiserver.services import allocation_of

            await self.ipam.release(allocation_of(obj))
        return obj

    async def delete_collection(self, res: Resource, ns: str, user: UserInfo, query: dict[str, str]) -> Obj:
        items, rv, _ = await self.store.list(res.prefix(ns), predicate=self._predicate(res, query))
        deleted = []
        for o in items:
            with contextlib.suppress(StatusError):
                deleted.append(await self.delete(res, o["metadata"].get("namespace", ""), o["metadata"]["name"], {},
                                                 user, query))
        return {"kind": f"{res.kind}List", "apiVersion": res.api_version, "metadata": {"resourceVersion": str(rv)},
                "items": deleted}

    async def bind_pod(self, ns: str, name: str, body: Obj) -> None:
        target = body.get("target") or {}
        node = target.get("name")
        if not node or target.get("kind", "Node") != "Node":
            raise invalid("Binding", name, [("target.name", "FieldValueRequired", "Required value")])
        key = f"/registry/core/pods/{ns}/{name}"
        for _ in range(8):
            try:
                pod = await self.store.get(key)
            except KeyNotFound:
                raise not_found("pods", name) from None
            if pod["metadata"].get("deletionTimestamp"):
                raise StatusError(409, f"pod {name} is being deleted, cannot be assigned to a host", reason="Conflict")
            if pod.get("spec", {}).get("nodeName"):
                raise StatusError(409, f"pod {name} is already assigned to node \"{pod['spec']['nodeName']}\"",
                                  reason="Conflict")
            pod["spec"]["nodeName"] = node
            conds = [c for c in pod.get("status", {}).get("conditions") or [] if c.get("type") != "PodScheduled"]
            conds.append({"type": "PodScheduled", "status": "True", "lastProbeTime": None,
                          "lastTransitionTime": meta.now_rfc3339()})
            pod.setdefault("status", {})["conditions"] = conds
            try:
                await self.store.update(key, pod, int(pod["metadata"]["resourceVersion"]))
                return
            except RVConflict:
                continue
        raise conflict("pods", name)

    # --- watch --------------------------------------------------------------------------------------------

    async def watch(self, req: web.Request, res: Resource, ns: str, query: dict[str, str]) -> web.StreamResponse:
        pred = self._predicate(res, query)
        send_initial = query.get("sendInitialEvents") in ("true", "1")
        bookmarks = query.get("allowWatchBookmarks") in ("true", "1")
        if send_initial and (query.get("resourceVersionMatch") != "NotOlderThan" or not bookmarks):
            raise invalid("ListOptions", "", [("sendInitialEvents", "FieldValueForbidden",
                                               "Forbidden: sendInitialEvents requires setting resourceVersionMatch "
                                               "to NotOlderThan and allowWatchBookmarks")])
        rv_text = query.get("resourceVersion", "")
        timeout = _int_param(query, "timeoutSeconds", 1800)
        accept = req.headers.get("Accept", "")
        table = wants_table(accept)
        initial: list[Obj] = []
        if send_initial or rv_text in ("", "0"):
            initial, from_rv, _ = await self.store.list(res.prefix(ns), predicate=pred)
        else:
            try:
                from_rv = int(rv_text)
            except ValueError:
                raise StatusError(400, f"invalid resourceVersion {rv_text!r}") from None
        resp = web.StreamResponse(status=200, headers={"Content-Type": JSON_CT, "Cache-Control": "no-cache"})
        resp.enable_chunked_encoding()
        await resp.prepare(req)
        first_table = [True]
        shared = self._watch_lines if not table else None

        def shared_chunk(ev_type: str, obj: Obj, rv: int) -> bytes | None:
            """Every JSON watcher of revision ``rv`` sends the same line: it is encoded (and framed as one HTTP/1.1
            chunk) once. None for a watcher that encodes its own (Table)."""
            if shared is None or not rv:
                return None
            chunk = shared.get(rv)
            if chunk is None:
                chunk = shared[rv] = _chunk(dumps({"type": ev_type, "object": obj}) + b"\n")
                if len(shared) > WATCH_LINES_KEPT:
                    del shared[next(iter(shared))]
            return chunk

        def own_line(ev_type: str, obj: Obj) -> bytes:
            out = obj
            if table and ev_type in ("ADDED", "MODIFIED", "DELETED"):
                out = self.table(res, [obj], obj["metadata"].get("resourceVersion", ""), query,
                                 columns=first_table[0])
                first_table[0] = False
            return dumps({"type": ev_type, "object": out}) + b"\n"

        def encode(ev_type: str, obj: Obj, rv: int = 0) -> bytes | memoryview:
            """The event's line, for aiohttp's writer (which frames it)."""
            chunk = shared_chunk(ev_type, obj, rv)
            return own_line(ev_type, obj) if chunk is None else _unchunk(chunk)

        def encode_chunk(ev_type: str, obj: Obj, rv: int) -> bytes:
            """The event as one HTTP/1.1 chunk, for writing to the connection directly."""
            chunk = shared_chunk(ev_type, obj, rv)
            return _chunk(own_line(ev_type, obj)) if chunk is None else chunk

        async def send(ev_type: str, obj: Obj) -> None:
            await resp.write(encode(ev_type, obj))

        def bookmark(rv: int, *, initial_end: bool = False) -> Obj:
            md: Obj = {"resourceVersion": str(rv)}
            if initial_end:
                md["annotations"] = {"k8s.io/initial-events-end": "true"}
            return {"kind": res.kind, "apiVersion": res.api_version, "metadata": md}

        last_rv = [from_rv]
        transport = req.transport
        ended = [False]  # set before the response's last chunk: nothing may be pushed after it

        def push(ch: Change) -> bool:
            """The store's fan-out of a write, while nothing is queued for this watch: the event goes out as one
            chunk written straight to the connection, with no task woken and no copy of the object decoded for
            this watch alone. aiohttp frames nothing itself in between (it writes each chunk through at once),
            so the chunks of both paths interleave correctly. A client that is not reading leaves the events
            to the pump below, which waits for it."""
            if ended[0]:
                return True  # the watch is over; the store lets go of it as soon as the pump has ended
            if transport is None or transport.is_closing() or \
                    transport.get_write_buffer_size() > WATCH_PUSH_HIGH_WATER:
                return False
            obj = ch.obj
            if pred is None or pred(obj):
                transport.write(encode_chunk(ch.type, obj, ch.rv))
            last_rv[0] = ch.rv
            return True

        async def pump() -> None:
            """Writes the events the store queued for this watch (the replayed history, and any that found the
            client not reading); the others are pushed (above). The handler only keeps time for bookmarks and
            ``timeoutSeconds``."""
            events = self.store.watch(res.prefix(ns), from_rv, push if resp.chunked else None)
            try:
                async for ev in events:
                    if pred is None or pred(ev.obj):
                        await resp.write(encode(ev.type, ev.obj, ev.rv))
                    last_rv[0] = ev.rv
            except Compacted:
                err = StatusError(410, f"too old resource version: {from_rv}", reason="Expired")
                await resp.write(dumps({"type": "ERROR", "object": err.status()}) + b"\n")
            finally:
                # unsubscribe now even when cancelled in a write, not when the generator is collected
                ended[0] = True
                await events.aclose()

        deadline = time.monotonic() + max(timeout, 0)
        pump_task: asyncio.Task[None] | None = None
        try:
            for i in range(0, len(initial), WATCH_BATCH):
                await resp.write(b"".join(encode("ADDED", o) for o in initial[i:i + WATCH_BATCH]))
            if send_initial:
                await send("BOOKMARK", bookmark(from_rv, initial_end=True))
            pump_task = asyncio.create_task(pump())
            self._watchers.add(pump_task)
            while not self.shutting_down.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                done, _ = await asyncio.wait({pump_task}, timeout=min(remaining, 30.0))
                if done:
                    pump_task.result()  # re-raises what ended the watch, if anything did
                    break
                if bookmarks:
                    await send("BOOKMARK", bookmark(last_rv[0]))
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            ended[0] = True
            if pump_task is not None:
                pump_task.cancel()
                self._watchers.discard(pump_task)
        with contextlib.suppress(ConnectionResetError, RuntimeError):
            await resp.write_eof()
        return resp

    async def close(self) -> None:
        self.shutting_down.set()
        for t in list(self._watchers):
            t.cancel()


_KUBELET_STREAMING = ("exec", "attach", "run", "portforward")


def _chunk(data: bytes) -> bytes:
    """``data`` as one HTTP/1.1 chunk (RFC 9112 section 7.1), as aiohttp's writer frames it."""
    return b"%x\r\n%b\r\n" % (len(data), data)


def _unchunk(chunk: bytes) -> memoryview:
    """The data of one chunk made by :func:`_chunk` (no copy)."""
    return memoryview(chunk)[chunk.index(b"\r\n") + 2 : -2]


def _streaming_proxy(req: web.Request, info: request.RequestInfo) -> bool:
    if "upgrade" in req.headers.get("Connection", "").lower() or req.headers.get("Upgrade"):
        return True
    first = info.rest.lstrip("/").split("/", 1)[0].lower()
    return info.resource == "nodes" and first in _KUBELET_STREAMING


def discovery_col(name: str, fmt: str) -> Any:
    from kplane.api.resources import Column

    return Column(name, format=fmt)


def _int_param(query: dict[str, str], key: str, default: int) -> int:
    v = query.get(key)
    if v is None or v == "":
        return default
    try:
        return int(v)
    except ValueError:
        raise StatusError(400, f"invalid value for {key}: {v!r}: must be an integer") from None


def _warning_headers(warnings: list[str]) -> dict[str, str] | None:
    if not warnings:
        return None
    return {"Warning": ", ".join(f'299 - "{w}"' for w in warnings)}


def _ns_finalizers(res: Resource, obj: Obj) -> bool:
    return res.kind == "Namespace" and bool((obj.get("spec") or {}).get("finalizers"))


def _strip_for_patch(obj: Obj) -> Obj:
    out: Obj = orjson.loads(orjson.dumps(obj))
    return out


def version_info() -> Obj:
    return {
        "major": "1",
        "minor": "37",
        "emulationMajor": "1",
        "emulationMinor": "37",
        "minCompatibilityMajor": "1",
        "minCompatibilityMinor": "36",
        "gitVersion": f"v1.37.0-kplane.{__version__}",
        "gitCommit": "",
        "gitTreeState": "clean",
        "buildDate": "2026-11-23T00:00:00Z",
        "goVersion": "python",
        "compiler": "cpython",
        "platform": "linux/amd64",
    }


# --- field sets (managedFields.fieldsV1) ------------------------------------------------------------------

_SKIP_META = {"resourceVersion", "uid", "creationTimestamp", "generation", "managedFields", "selfLink"}


def _fieldset(obj: Any, top: bool = True) -> Obj:
    """The FieldsV1 set of an object: ``{"f:spec": {"f:replicas": {}}}``; lists are owned atomically."""
    out: Obj = {}
    if not isinstance(obj, dict):
        return out
    for k, v in obj.items():
        if top and k in ("apiVersion", "kind"):
            continue
        if top and k == "metadata" and isinstance(v, dict):
            sub = {kk: vv for kk, vv in v.items() if kk not in _SKIP_META and kk not in ("name", "namespace")}
            if sub:
                out["f:metadata"] = _fieldset(sub, top=False)
            continue
        out[f"f:{k}"] = _fieldset(v, top=False) if isinstance(v, dict) else {}
    return out


def _manager_fields(obj: Obj, manager: str) -> Obj:
    for e in obj.get("metadata", {}).get("managedFields") or []:
        if e.get("manager") == manager and e.get("operation") == "Apply":
            f = e.get("fieldsV1")
            return f if isinstance(f, dict) else {}
    return {}


def _remove_dropped(target: Any, previous: Obj, current: Obj) -> None:
    """Delete from ``target`` the fields in ``previous`` that ``current`` no longer has."""
    if not isinstance(target, dict):
        return
    for fk, sub in previous.items():
        if not fk.startswith("f:"):
            continue
        k = fk[2:]
        if fk not in current:
            target.pop(k, None)
        elif sub and isinstance(current.get(fk), dict):
            _remove_dropped(target.get(k), sub, current[fk])


__all__ = ["RESOURCES", "APIServer", "ServerOptions"]
