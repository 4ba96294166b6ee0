"""The kubelet's HTTPS API on :10250 (no read-only port).

Every request is authenticated (x509 client certificates signed by the cluster CA, or bearer tokens checked with a
TokenReview) and authorized (a SubjectAccessReview on ``nodes/<subresource>`` for this node, with upstream's
path -> subresource mapping). Anonymous requests get 401: kube-hunter counts a 403 as anonymous access.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import ssl
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web
from cryptography import x509
from cryptography.x509.oid import NameOID

from kplane.errors import StatusError
from kplane.kubelet import crilog

if TYPE_CHECKING:
    from kplane.kubelet.agent import NodeAgent

log = logging.getLogger(__name__)

_X509_V_FLAG_NO_CHECK_TIME = 0x200000
VERBS = {"POST": "create", "GET": "get", "HEAD": "get", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
_CNAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def subresources_for(path: str) -> list[str]:
    """Upstream's fine-grained mapping: first match wins; any listed subresource being allowed is enough."""
    def sub(prefix: str) -> bool:
        return path == prefix or path.startswith(prefix + "/")

    if sub("/stats"):
        return ["stats"]
    if sub("/metrics"):
        return ["metrics"]
    if sub("/logs"):
        return ["log"]
    if sub("/checkpoint"):
        return ["checkpoint"]
    if sub("/pods") or sub("/runningpods"):
        return ["pods", "proxy"]
    if sub("/healthz"):
        return ["healthz", "proxy"]
    if sub("/configz"):
        return ["configz", "proxy"]
    return ["proxy"]


def text_error(code: int, message: str) -> web.Response:
    return web.Response(status=code, text=message)


def status_error(err: StatusError) -> web.Response:
    return web.Response(status=err.code, body=orjson.dumps(err.status()), content_type="application/json")


class _Cache:
    def __init__(self) -> None:
        self.items: dict[str, tuple[float, Any]] = {}

    def get(self, key: str) -> Any:
        hit = self.items.get(key)
        if hit and hit[0] > time.monotonic():
            return hit[1]
        self.items.pop(key, None)
        return None

    def put(self, key: str, value: Any, ttl: float) -> None:
        if len(self.items) > 4096:
            self.items.clear()
        self.items[key] = (time.monotonic() + ttl, value)


class KubeletServer:
    def __init__(self, agent: NodeAgent) -> None:
        self.agent = agent
        self.runner: web.AppRunner | None = None
        self.ctx: ssl.SSLContext | None = None
        self.authn_cache = _Cache()
        self.authz_cache = _Cache()
        self.started = time.time()

    # --- lifecycle ----------------------------------------------------------------------------------------

    def ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        pem = self.agent.serving_pem
        ctx.load_cert_chain(pem, pem)
        ctx.load_verify_locations(self.agent.ca_path)
        ctx.verify_mode = ssl.CERT_OPTIONAL
        ctx.verify_flags = ssl.VerifyFlags(int(ctx.verify_flags) | _X509_V_FLAG_NO_CHECK_TIME)
        ctx.set_alpn_protocols(["http/1.1"])
        return ctx

    def reload_certificate(self) -> None:
        if self.ctx is not None:
            pem = self.agent.serving_pem
            self.ctx.load_cert_chain(pem, pem)

    async def start(self, host: str = "0.0.0.0") -> None:
        self.ctx = self.ssl_context()
        app = web.Application(client_max_size=1 << 20)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, self.agent.cfg.kubelet_port, ssl_context=self.ctx, reuse_address=True)
        await site.start()
        log.info("kubelet: serving https on :%d", self.agent.cfg.kubelet_port)

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    # --- authn / authz ------------------------------------------------------------------------------------

    async def authenticate(self, req: web.Request) -> dict[str, Any] | None:
        sslobj = req.transport.get_extra_info("ssl_object") if req.transport else None
        der = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
        if der:
            cert = x509.load_der_x509_certificate(der)
            now = datetime.now(UTC)
            if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
                return None
            cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            if not cns:
                return None
            groups = [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)]
            return {"username": str(cns[0].value), "groups": [*groups, "system:authenticated"]}
        from kplane.apiserver.authn import bearer_token, websocket_token

        token = bearer_token(req.headers.get("Authorization"))
        if token is None and req.headers.get("Sec-WebSocket-Protocol"):
            try:
                token = websocket_token(req.headers["Sec-WebSocket-Protocol"])
            except StatusError:
                return None
        if not token:
            return None
        key = hashlib.sha256(token.encode()).hexdigest()
        cached = self.authn_cache.get(key)
        if cached is not None:
            return cached or None
        review = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {"token": token}}
        try:
            out = await self.client.create("/apis/authentication.k8s.io/v1/tokenreviews", review)
        except StatusError as err:
            log.warning("kubelet: token review failed: %s", err.message)
            return None
        st = out.get("status") or {}
        user = st.get("user") if st.get("authenticated") else {}
        self.authn_cache.put(key, user or {}, 120)
        return user or None

    @property
    def client(self) -> Any:
        return self.agent.client

    async def authorize(self, user: dict[str, Any], verb: str, subresource: str, path: str) -> bool:
        key = orjson.dumps([user.get("username"), user.get("groups"), verb, subresource]).decode()
        cached = self.authz_cache.get(key)
        if cached is not None:
            return bool(cached)
        sar = {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview", "spec": {
            "user": user.get("username", ""), "groups": user.get("groups") or [], "uid": user.get("uid", ""),
            "extra": user.get("extra") or {},
            "resourceAttributes": {"verb": verb, "resource": "nodes", "subresource": subresource,
                                   "name": self.agent.cfg.name, "version": "v1", "group": ""}}}
        out = await self.client.create("/apis/authorization.k8s.io/v1/subjectaccessreviews", sar)
        allowed = bool((out.get("status") or {}).get("allowed"))
        self.authz_cache.put(key, allowed, 300 if allowed else 30)
        return allowed

    # --- dispatch -----------------------------------------------------------------------------------------

    async def handle(self, req: web.Request) -> web.StreamResponse:
        try:
            user = await self.authenticate(req)
            if user is None:
                return text_error(401, "Unauthorized")
            verb = VERBS.get(req.method, "")
            head = req.path.strip("/").split("/", 1)[0]
            if head in ("exec", "attach", "run", "portForward"):
                # A WebSocket handshake is a GET, so upstream authorizes `get nodes/proxy` for exec: "read-only"
                # monitoring identities can run commands in every pod. kplane asks for `create`, always.
                verb = "create"
            subs = subresources_for(req.path)
            try:
                ok = False
                for sub in subs:
                    if await self.authorize(user, verb, sub, req.path):
                        ok = True
                        break
            except StatusError as err:
                return text_error(500, f"Authorization error (user={user.get('username')}, verb={verb}, "
                                       f"resource=nodes, subresource={subs}): {err.message}")
            if not ok:
                return text_error(403, f"Forbidden (user={user.get('username')}, verb={verb}, resource=nodes, "
                                       f"subresource(s)={subs})")
            return await self.route(req)
        except StatusError as err:
            return status_error(err)
        except (ConnectionResetError, asyncio.CancelledError):
            raise
        except Exception as exc:
            log.exception("kubelet: %s %s failed", req.method, req.path)
            return text_error(500, f"internal error: {type(exc).__name__}")

    async def route(self, req: web.Request) -> web.StreamResponse:
        path = req.path
        parts = [p for p in path.split("/") if p]
        if any(p in (".", "..") for p in parts) or "//" in path:
            return text_error(400, "invalid path")
        head = parts[0] if parts else ""
        if head == "healthz":
            return web.Response(text="ok")
        if head == "pods" and len(parts) == 1 and req.method == "GET":
            return web.Response(body=orjson.dumps(self.pod_list()), content_type="application/json")
        if head == "runningpods" and req.method == "GET":
            return web.Response(body=orjson.dumps(self.running_pods()), content_type="application/json")
        if head == "configz" and req.method == "GET":
            return web.Response(body=orjson.dumps(self.configz()), content_type="application/json")
        if head == "metrics" and req.method == "GET":
            return web.Response(text=self.metrics(), content_type="text/plain")
        if head == "stats" and len(parts) == 2 and parts[1] == "summary":
            return web.Response(body=orjson.dumps(self.summary()), content_type="application/json")
        if head == "containerLogs" and req.method == "GET":
            if len(parts) != 4:
                return text_error(404, "expected /containerLogs/{namespace}/{pod}/{container}")
            return await self.container_logs(req, parts[1], parts[2], parts[3])
        if head in ("exec", "attach", "portForward", "run"):
            from kplane.kubelet import streaming

            return await streaming.dispatch(self, req, head, parts[1:])
        return text_error(404, "404 page not found")

    # --- pod lookup ---------------------------------------------------------------------------------------

    def find_pod(self, ns: str, name: str, uid: str | None = None) -> Any:
        pods = self.agent.pods
        if pods is not None:
            for w in list(pods.workers.values()):
                md = w.pod.get("metadata", {})
                if md.get("namespace") == ns and md.get("name") == name and (uid is None or md.get("uid") == uid):
                    return w
        raise StatusError(404, f'pod "{name}" not found in namespace "{ns}" on node "{self.agent.cfg.name}"',
                          reason="NotFound")

    def container_id(self, w: Any, container: str, *, previous: bool = False) -> str:
        from kplane.kubelet.pods import cid_for

        names = [c.get("name") for k in ("initContainers", "containers") for c in w.pod.get("spec", {}).get(k) or []]
        if container not in names:
            raise StatusError(404, f"container {container} is not valid for pod {w.pod['metadata']['name']}",
                              reason="NotFound")
        rec = w.records.get(container)
        attempt = rec.attempt if rec is not None else -1
        if previous:
            attempt -= 1
            if attempt < 0:
                raise StatusError(400, f'previous terminated container "{container}" in pod '
                                       f'"{w.pod["metadata"]["name"]}" not found')
        if attempt < 0:
            raise StatusError(400, f'container "{container}" in pod "{w.pod["metadata"]["name"]}" is waiting to '
                                   "start: ContainerCreating")
        return cid_for(w.pod["metadata"]["uid"], container, attempt)

    # --- endpoints ----------------------------------------------------------------------------------------

    def pod_list(self) -> dict[str, Any]:
        pods = self.agent.pods
        items = [{k: v for k, v in w.pod.items() if not k.startswith("__")}
                 for w in (pods.workers.values() if pods else [])]
        return {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items}

    def running_pods(self) -> dict[str, Any]:
        from kplane.kubelet.pods import parse_cid

        pods = self.agent.pods
        by_uid: dict[str, list[dict[str, Any]]] = {}
        if pods is not None:
            for cid in pods.runtime.list():
                p = parse_cid(cid)
                if p and pods.runtime.status(cid).state == "running":
                    by_uid.setdefault(p[0], []).append({"name": p[1], "image": ""})
        items = []
        for uid, containers in by_uid.items():
            w = pods.workers.get(uid) if pods else None
            md = w.pod["metadata"] if w else {"uid": uid}
            items.append({"metadata": {"name": md.get("name", ""), "namespace": md.get("namespace", ""), "uid": uid},
                          "spec": {"containers": containers}, "status": {}})
        return {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items}

    def configz(self) -> dict[str, Any]:
        cfg = self.agent.cfg
        return {"kubeletconfig": {
            "kind": "KubeletConfiguration", "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "port": cfg.kubelet_port, "readOnlyPort": 0, "rotateCertificates": True, "serverTLSBootstrap": True,
            "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": True, "cacheTTL": "2m0s"},
                               "x509": {"clientCAFile": str(self.agent.ca_path)}},
            "authorization": {"mode": "Webhook", "webhook": {"cacheAuthorizedTTL": "5m0s",
                                                             "cacheUnauthorizedTTL": "30s"}},
            "maxPods": cfg.max_pods, "enableDebuggingHandlers": True,
            "streamingConnectionIdleTimeout": "4h0m0s", "nodeStatusUpdateFrequency": "10s",
            "nodeLeaseDurationSeconds": 40,
        }}

    def metrics(self) -> str:
        pods = self.agent.pods
        running = 0
        containers = 0
        if pods is not None:
            for cid in pods.runtime.list():
                if pods.runtime.status(cid).state == "running":
                    containers += 1
            running = sum(1 for w in pods.workers.values() if w.pod.get("status", {}).get("phase") == "Running")
        lines = [
            "# HELP kubelet_running_pods Number of pods that have a running pod sandbox",
            "# TYPE kubelet_running_pods gauge",
            f"kubelet_running_pods {running}",
            "# HELP kubelet_running_containers Number of containers currently running",
            "# TYPE kubelet_running_containers gauge",
            f'kubelet_running_containers{{container_state="running"}} {containers}',
        ]
        for name, pem in (("client", self.agent.client_pem), ("server", self.agent.serving_pem)):
            with contextlib.suppress(OSError, ValueError):
                cert = x509.load_pem_x509_certificate(pem.read_bytes())
                lines += [f"# TYPE kubelet_certificate_manager_{name}_expiration_seconds gauge",
                          f"kubelet_certificate_manager_{name}_expiration_seconds "
                          f"{cert.not_valid_after_utc.timestamp():.0f}"]
        return "\n".join(lines) + "\n"

    def summary(self) -> dict[str, Any]:
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        mem_total = mem_avail = 0
        with contextlib.suppress(OSError):
            info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
            mem_total = int(info["MemTotal"].split()[0]) * 1024
            mem_avail = int(info["MemAvailable"].split()[0]) * 1024
        cpu_ns = 0
        with contextlib.suppress(OSError, ValueError):
            fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
            ticks = sum(int(x) for x in fields[:3])
            cpu_ns = ticks * (10**9 // os.sysconf("SC_CLK_TCK"))
        pods_out = []
        pods = self.agent.pods
        for w in (pods.workers.values() if pods else []):
            md = w.pod["metadata"]
            pods_out.append({"podRef": {"name": md["name"], "namespace": md["namespace"], "uid": md["uid"]},
                             "startTime": w.start_time, "containers": []})
        return {"node": {"nodeName": self.agent.cfg.name, "startTime": datetime.fromtimestamp(
            self.started, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "cpu": {"time": now, "usageCoreNanoSeconds": cpu_ns},
            "memory": {"time": now, "availableBytes": mem_avail, "usageBytes": mem_total - mem_avail,
                       "workingSetBytes": mem_total - mem_avail}}, "pods": pods_out}

    async def container_logs(self, req: web.Request, ns: str, pod: str, container: str) -> web.StreamResponse:
        q = req.query
        try:
            tail = q.get("tailLines", q.get("tail"))
            tail_n = None if tail in (None, "", "all") else int(str(tail))
            since_s = int(q["sinceSeconds"]) if q.get("sinceSeconds") else None
            limit = int(q["limitBytes"]) if q.get("limitBytes") else None
            since_time = q.get("sinceTime")
        except ValueError:
            return web.Response(status=400, body=b'{"message": "Unable to decode query."}',
                                content_type="application/json")
        if (tail_n is not None and tail_n < 0) or (since_s is not None and since_s <= 0) or \
                (limit is not None and limit <= 0):
            raise StatusError(422, "PodLogOptions is invalid: tailLines, sinceSeconds and limitBytes must be positive")
        since: datetime | None = None
        if since_s is not None:
            since = datetime.now(UTC) - timedelta(seconds=since_s)
        elif since_time:
            try:
                since = datetime.strptime(since_time[:19], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC)
            except ValueError:
                return web.Response(status=400, body=b'{"message": "Unable to decode query."}',
                                    content_type="application/json")
        stream = q.get("stream", "All")
        streams = {"All": {"stdout", "stderr"}, "Stdout": {"stdout"}, "Stderr": {"stderr"}}.get(stream)
        if streams is None:
            raise StatusError(422, f"PodLogOptions is invalid: stream {stream!r} must be All, Stdout or Stderr")
        w = self.find_pod(ns, pod)
        previous = q.get("previous") in ("true", "1")
        cid = self.container_id(w, container, previous=previous)
        assert self.agent.pods is not None
        path = self.agent.pods.runtime.log_path(cid)
        timestamps = q.get("timestamps") in ("true", "1")
        follow = q.get("follow") in ("true", "1") and not previous
        resp = web.StreamResponse(status=200, headers={"Content-Type": "text/plain"})
        resp.enable_chunked_encoding()
        await resp.prepare(req)
        if not follow:
            data = await asyncio.to_thread(crilog.read_logs, path, tail=tail_n, since=since, timestamps=timestamps,
                                           limit_bytes=limit, streams=streams)
            await resp.write(data)
            await resp.write_eof()
            return resp
        runtime = self.agent.pods.runtime
        sent = 0
        exited_at: list[float] = []

        def stop() -> bool:
            # stop following once the container has exited and its log has been read to the end
            if runtime.status(cid).state != "running":
                if not exited_at:
                    exited_at.append(time.monotonic())
                return time.monotonic() - exited_at[0] > 0.5
            return False

        try:
            async for chunk in crilog.follow(path, tail=tail_n, since=since, timestamps=timestamps, streams=streams,
                                             stop=stop):
                if limit is not None:
                    chunk = chunk[: max(limit - sent, 0)]
                if chunk:
                    await resp.write(chunk)
                    sent += len(chunk)
                if limit is not None and sent >= limit:
                    break
        except (ConnectionResetError, asyncio.CancelledError):
            return resp
        with contextlib.suppress(ConnectionResetError):
            await resp.write_eof()
        return resp


def valid_names(*names: str) -> bool:
    return all(_NAME.match(n) for n in names)
