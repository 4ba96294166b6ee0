"""Pod workers: run the pods bound to this node as processes, report their status, stop them gracefully.

One worker task per pod. Container ids are ``<pod-uid>_<container>_<attempt>``; the runtime keeps its state on
disk, so a restarted agent adopts running containers and reads the exit codes of those that ended meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import aiohttp

from kplane.aio import cancel_and_wait
from kplane.api import meta
from kplane.client import informer
from kplane.errors import StatusError
from kplane.kubelet.podnet import NetworkNotReady
from kplane.kubelet.runtime import ContainerSpec, ProcessRuntime
from kplane.kubelet.volumes import PodVolumes, VolumeError, VolumeManager

if TYPE_CHECKING:
    from kplane.kubelet.agent import NodeAgent

log = logging.getLogger(__name__)

Obj = dict[str, Any]
SA_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
MAX_BACKOFF = 300.0
_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)|\$\$")


def cid_for(uid: str, name: str, attempt: int) -> str:
    return f"{uid}_{name}_{attempt}"


def parse_cid(cid: str) -> tuple[str, str, int] | None:
    parts = cid.rsplit("_", 2)
    if len(parts) != 3 or not parts[2].isdigit():
        return None
    return parts[0], parts[1], int(parts[2])


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes $(VAR) expansion: $$ escapes; unknown references stay as written."""
    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return _VAR.sub(sub, text)


def service_link_env(svc: Obj) -> dict[str, str]:
    """The variables a Service contributes to a container's environment (as the kubelet's service links)."""
    spec = svc.get("spec") or {}
    ip = spec.get("clusterIP")
    ports = [p for p in spec.get("ports") or [] if isinstance(p, dict) and isinstance(p.get("port"), int)]
    if not ip or ip == "None" or not ports:
        return {}
    name = str(svc["metadata"]["name"]).upper().replace("-", "_")
    first = ports[0]
    out = {f"{name}_SERVICE_HOST": str(ip), f"{name}_SERVICE_PORT": str(first["port"]),
           f"{name}_PORT": f"{str(first.get('protocol', 'TCP')).lower()}://{ip}:{first['port']}"}
    for p in ports:
        proto = str(p.get("protocol", "TCP"))
        if p.get("name"):
            out[f"{name}_SERVICE_PORT_{str(p['name']).upper().replace('-', '_')}"] = str(p["port"])
        base = f"{name}_PORT_{p['port']}_{proto.upper()}"
        out[base] = f"{proto.lower()}://{ip}:{p['port']}"
        out[f"{base}_PROTO"] = proto.lower()
        out[f"{base}_PORT"] = str(p["port"])
        out[f"{base}_ADDR"] = str(ip)
    return out


def rfc3339(ts: float | None = None) -> str:
    return datetime.fromtimestamp(ts if ts is not None else time.time(), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class ContainerRecord:
    attempt: int = -1  # latest attempt id, -1 when never started
    restarts: int = 0
    last_state: Obj | None = None
    backoff_until: float = 0.0
    backoff_s: float = 0.0
    waiting: tuple[str, str] | None = None  # (reason, message)


@dataclass
class PodWorker:
    pod: Obj
    task: asyncio.Task[None] | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    records: dict[str, ContainerRecord] = field(default_factory=dict)
    volumes: PodVolumes | None = None
    last_status: Obj | None = None
    start_time: str = ""
    ip: str = ""  # the pod's IP once its network is set up


class PodManager:
    def __init__(self, agent: NodeAgent) -> None:
        self.agent = agent
        assert agent.client is not None
        self.client = agent.client
        self.node = agent.cfg.name
        self.runtime = ProcessRuntime(agent.cfg.data_dir / "containers")
        self.volumes = VolumeManager(self.client, agent.cfg.data_dir / "pods")
        self.workers: dict[str, PodWorker] = {}
        self.stop_event = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._svc_task: asyncio.Task[None] | None = None
        self.services: dict[str, dict[str, Obj]] = {}  # namespace -> name -> Service (for pods' environment)
        self.is_root = os.geteuid() == 0 and shutil.which("unshare") is not None
        self.net = agent.net  # PodNetwork: a network namespace per pod, or the host's network
        url = urlparse(agent.cfg.server)
        self.api_host, self.api_port = url.hostname or "127.0.0.1", str(url.port or 443)

    async def start(self) -> None:
        # pods started before the Services are known would miss their variables (the kubelet waits for this too)
        with contextlib.suppress(StatusError, OSError, TimeoutError, aiohttp.ClientError):
            lst = await asyncio.wait_for(self.client_ref().get("/api/v1/services"), 10)
            for svc in lst.get("items") or []:
                md = svc.get("metadata") or {}
                self.services.setdefault(str(md.get("namespace", "")), {})[str(md.get("name", ""))] = svc
        self._svc_task = asyncio.create_task(self._watch_services())
        self._task = asyncio.create_task(self._watch())

    async def stop(self) -> None:
        """Stop watching and reporting; containers keep running."""
        self.stop_event.set()
        if self._svc_task:
            self._svc_task.cancel()
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        # a copy: a worker that ends removes itself from the table while the others are awaited
        await cancel_and_wait([w.task for w in list(self.workers.values())])

    async def _watch(self) -> None:
        synced: set[str] = set()
        first_sync_done = False
        path = f"/api/v1/pods?fieldSelector=spec.nodeName%3D{self.node}"
        async for ev, pod in informer(self.client_ref(), path, self.stop_event):
            uid = pod.get("metadata", {}).get("uid", "")
            if not uid:
                continue
            if ev == "DELETED":
                w = self.workers.get(uid)
                if w:
                    w.pod = pod
                    w.pod.setdefault("metadata", {})["deletionTimestamp"] = w.pod["metadata"].get(
                        "deletionTimestamp") or rfc3339()
                    w.pod["metadata"]["deletionGracePeriodSeconds"] = 0
                    w.pod["__gone__"] = True
                    w.wake.set()
                continue
            synced.add(uid)
            w = self.workers.get(uid)
            if w is None:
                w = PodWorker(pod)
                self.workers[uid] = w
                w.task = asyncio.create_task(self._run(w))
            else:
                w.pod = pod
                w.wake.set()
            if ev != "SYNC" and not first_sync_done:
                first_sync_done = True
                await self._reap_orphans(synced)

    def client_ref(self) -> Any:
        return self.agent.client or self.client

    async def _reap_orphans(self, known: set[str]) -> None:
        """Containers of pods that were deleted while the agent was down."""
        for cid in self.runtime.list():
            p = parse_cid(cid)
            if p and p[0] not in known:
                with contextlib.suppress(Exception):
                    await self.runtime.stop(cid, 0)
                with contextlib.suppress(Exception):
                    self.runtime.remove(cid, force=True)
                self.volumes.cleanup(p[0])
        await self.net.reap(known)

    # --- the worker ---------------------------------------------------------------------------------------

    async def _run(self, w: PodWorker) -> None:
        uid = w.pod["metadata"]["uid"]
        self._adopt(w)
        try:
            while not self.stop_event.is_set():
                if w.pod["metadata"].get("deletionTimestamp"):
                    await self._terminate(w)
                    return
                await self._sync(w)
                w.wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(w.wake.wait(), 0.5)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("pod worker %s failed", uid)
        finally:
            if w.pod["metadata"].get("deletionTimestamp"):
                self.workers.pop(uid, None)

    def _adopt(self, w: PodWorker) -> None:
        uid = w.pod["metadata"]["uid"]
        for cid in self.runtime.list():
            p = parse_cid(cid)
            if not p or p[0] != uid:
                continue
            rec = w.records.setdefault(p[1], ContainerRecord())
            if p[2] > rec.attempt:
                rec.attempt = p[2]
            rec.restarts = max(rec.restarts, rec.attempt)
        for name, rec in w.records.items():
            if rec.attempt > 0:
                prev = self._state_of(cid_for(uid, name, rec.attempt - 1))
                if prev and "terminated" in prev:
                    rec.last_state = prev
        old = w.pod.get("status") or {}
        w.start_time = old.get("startTime", "")

    def _containers(self, pod: Obj) -> tuple[list[Obj], list[Obj]]:
        spec = pod.get("spec", {})
        return list(spec.get("initContainers") or []), list(spec.get("containers") or [])

    async def _sync(self, w: PodWorker) -> None:
        pod = w.pod
        uid = pod["metadata"]["uid"]
        if not w.start_time:
            w.start_time = rfc3339()
        if not await self._network(w):
            return
        if w.volumes is None:
            try:
                w.volumes = await self.volumes.prepare(pod)
            except VolumeError as exc:
                for c in self._containers(pod)[0] + self._containers(pod)[1]:
                    w.records.setdefault(c["name"], ContainerRecord()).waiting = ("ContainerCreating", str(exc))
                await self._report(w, volume_error=str(exc))
                await asyncio.sleep(1)
                return
        else:
            with contextlib.suppress(VolumeError, StatusError):
                await self.volumes.refresh_tokens(pod, w.volumes)
        policy = pod.get("spec", {}).get("restartPolicy", "Always")
        inits, apps = self._containers(pod)
        initialized = True
        for c in inits:
            st = self._container_state(w, c)
            if st == "done":
                continue
            initialized = False
            if st == "failed" and policy == "Never":
                break
            if st in ("absent", "failed"):
                await self._maybe_start(w, c, init=True)
            break
        if initialized:
            for c in apps:
                st = self._container_state(w, c)
                if st == "absent" or (st == "failed" and policy != "Never") or (st == "done" and policy == "Always"):
                    await self._maybe_start(w, c, init=False)
        await self._report(w)
        del uid

    async def _network(self, w: PodWorker) -> bool:
        """The pod's network (sandbox): its IP and namespace; False while it cannot be set up (the pod waits).
        A finished pod gives its namespace and IP back (its status keeps showing the IP, as upstream)."""
        pod, st = w.pod, w.pod.get("status") or {}
        if st.get("phase") in ("Succeeded", "Failed"):
            w.ip = w.ip or st.get("podIP") or self.agent.cfg.node_ip
            await self.net.teardown_pod(pod["metadata"]["uid"])
            return True
        if w.ip:
            return True
        try:
            w.ip = await self.net.setup_pod(pod)
        except NetworkNotReady as exc:
            for c in self._containers(pod)[0] + self._containers(pod)[1]:
                w.records.setdefault(c["name"], ContainerRecord()).waiting = ("ContainerCreating", f"network: {exc}")
            await self._report(w, volume_error=f"pod network not ready: {exc}")
            await asyncio.sleep(1)
            return False
        if self.net.uses_host_network(pod) and not (pod.get("spec") or {}).get("hostNetwork") \
                and not st.get("podIP"):
            asyncio.create_task(self._post_event(self.net.fallback_event(pod)))
        return True

    def netns_path(self, w: PodWorker) -> str | None:
        """The pod's network namespace, None when it uses the host's."""
        return None if self.net.uses_host_network(w.pod) else self.net.netns_path(w.pod["metadata"]["uid"])

    async def _post_event(self, ev: Obj) -> None:
        with contextlib.suppress(StatusError, OSError, TimeoutError, aiohttp.ClientError):
            await self.client_ref().create(f"/api/v1/namespaces/{ev['metadata']['namespace']}/events", ev)

    def _container_state(self, w: PodWorker, c: Obj) -> str:
        """absent | running | done (exit 0) | failed (exit != 0) | waiting (could not start)."""
        rec = w.records.get(c["name"])
        if rec is None or rec.attempt < 0:
            return "absent" if not (rec and rec.waiting and rec.waiting[0] == "CreateContainerConfigError") \
                else "waiting"
        state = self._state_of(cid_for(w.pod["metadata"]["uid"], c["name"], rec.attempt))
        if state is None:
            return "absent"
        if "running" in state:
            return "running"
        return "done" if state["terminated"].get("exitCode") == 0 else "failed"

    async def _maybe_start(self, w: PodWorker, c: Obj, *, init: bool) -> None:
        uid = w.pod["metadata"]["uid"]
        rec = w.records.setdefault(c["name"], ContainerRecord())
        now = time.monotonic()
        if rec.attempt >= 0:
            last = self._state_of(cid_for(uid, c["name"], rec.attempt))
            if last and "terminated" in last:
                if rec.backoff_until == 0.0:
                    rec.backoff_s = min(max(rec.backoff_s * 2, self.agent.cfg.restart_backoff_s), MAX_BACKOFF)
                    rec.backoff_until = now + rec.backoff_s
                    rec.last_state = last
                if now < rec.backoff_until:
                    rec.waiting = ("CrashLoopBackOff",
                                   f"back-off {int(rec.backoff_s)}s restarting failed container={c['name']} "
                                   f"pod={w.pod['metadata']['name']}_{w.pod['metadata']['namespace']}({uid})")
                    return
        try:
            await self._load_env_sources(w, c)
            spec = self._spec(w, c)
        except VolumeError as exc:
            rec.waiting = ("CreateContainerConfigError", str(exc))
            return
        attempt = rec.attempt + 1
        cid = cid_for(uid, c["name"], attempt)
        try:
            await self.runtime.start(cid, spec)
        except Exception as exc:
            rec.waiting = ("RunContainerError", str(exc))
            return
        if rec.attempt >= 0:
            rec.restarts += 1
            if rec.attempt >= 1:  # keep only the previous attempt (for --previous logs and lastState)
                with contextlib.suppress(Exception):
                    self.runtime.remove(cid_for(uid, c["name"], rec.attempt - 1))
        rec.attempt = attempt
        rec.backoff_until = 0.0
        rec.waiting = None

    def _env(self, w: PodWorker, c: Obj) -> dict[str, str]:
        pod = w.pod
        ns = pod["metadata"]["namespace"]
        env: dict[str, str] = {
            "PATH": os.environ.get("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"),
            "HOSTNAME": pod["metadata"]["name"],
        }
        env.update(self._service_env(ns, bool(pod.get("spec", {}).get("enableServiceLinks", True))))
        for ef in c.get("envFrom") or []:
            prefix = ef.get("prefix", "")
            for kind in ("configMapRef", "secretRef"):
                ref = ef.get(kind)
                if ref:
                    data = self._fetch_cached(w, kind, ns, ref.get("name", ""), bool(ref.get("optional")))
                    for k, v in data.items():
                        env[prefix + k] = v
        for e in c.get("env") or []:
            name = e.get("name", "")
            if "value" in e:
                env[name] = expand(str(e["value"]), env)
                continue
            vf = e.get("valueFrom") or {}
            if "fieldRef" in vf:
                from kplane.kubelet.volumes import _downward_value

                status = {"podIP": w.ip or self.agent.cfg.node_ip, "hostIP": self.agent.cfg.node_ip}
                env[name] = _downward_value({**pod, "status": status}, vf["fieldRef"])
            elif "configMapKeyRef" in vf or "secretKeyRef" in vf:
                kind = "configMapRef" if "configMapKeyRef" in vf else "secretRef"
                ref = vf.get("configMapKeyRef") or vf.get("secretKeyRef") or {}
                data = self._fetch_cached(w, kind, ns, ref.get("name", ""), bool(ref.get("optional")))
                if ref.get("key") in data:
                    env[name] = data[ref["key"]]
                elif not ref.get("optional"):
                    raise VolumeError(f'couldn\'t find key {ref.get("key")} in {kind[:-3]} {ns}/{ref.get("name")}')
            elif "resourceFieldRef" in vf:
                env[name] = "0"
        return env

    def _service_env(self, ns: str, links: bool) -> dict[str, str]:
        """Docker-link style variables for the Services of the pod's namespace (``enableServiceLinks``) and, always,
        for default/kubernetes. The kubernetes Service's VIP is used only when this node proxies Service VIPs;
        otherwise pods are pointed at the apiserver address the agent itself uses."""
        out: dict[str, str] = {}
        proxied = bool(getattr(self.agent, "kube_proxy", None))
        chosen: list[Obj] = []
        if links and ns != "default":
            chosen += list(self.services.get(ns, {}).values())
        if links and ns == "default":
            chosen += [s for n, s in self.services.get("default", {}).items() if n != "kubernetes"]
        for svc in sorted(chosen, key=lambda s: s["metadata"]["name"]):
            out.update(service_link_env(svc))
        kube = self.services.get("default", {}).get("kubernetes")
        if proxied and kube is not None and service_link_env(kube):
            out.update(service_link_env(kube))
        else:
            h, p = self.api_host, self.api_port
            out.update({"KUBERNETES_SERVICE_HOST": h, "KUBERNETES_SERVICE_PORT": p, "KUBERNETES_SERVICE_PORT_HTTPS": p,
                        "KUBERNETES_PORT": f"tcp://{h}:{p}", f"KUBERNETES_PORT_{p}_TCP": f"tcp://{h}:{p}",
                        f"KUBERNETES_PORT_{p}_TCP_PROTO": "tcp", f"KUBERNETES_PORT_{p}_TCP_PORT": p,
                        f"KUBERNETES_PORT_{p}_TCP_ADDR": h})
        return out

    async def _watch_services(self) -> None:
        async for ev, svc in informer(self.client_ref(), "/api/v1/services", self.stop_event):
            md = svc.get("metadata") or {}
            by_ns = self.services.setdefault(str(md.get("namespace", "")), {})
            if ev == "DELETED":
                by_ns.pop(str(md.get("name", "")), None)
            else:
                by_ns[str(md.get("name", ""))] = svc

    def _fetch_cached(self, w: PodWorker, kind: str, ns: str, name: str, optional: bool) -> dict[str, str]:
        cache = w.pod.setdefault("__env_cache__", {})
        key = f"{kind}/{name}"
        if key in cache:
            return dict(cache[key])
        if not optional:
            raise VolumeError(f"{kind[:-3].lower()} {ns}/{name} not loaded yet")
        return {}

    async def _load_env_sources(self, w: PodWorker, c: Obj) -> None:
        import base64

        ns = w.pod["metadata"]["namespace"]
        cache = w.pod.setdefault("__env_cache__", {})
        refs: list[tuple[str, str, bool]] = []
        for ef in c.get("envFrom") or []:
            for kind in ("configMapRef", "secretRef"):
                if ef.get(kind):
                    refs.append((kind, ef[kind].get("name", ""), bool(ef[kind].get("optional"))))
        for e in c.get("env") or []:
            vf = e.get("valueFrom") or {}
            if "configMapKeyRef" in vf:
                refs.append(("configMapRef", vf["configMapKeyRef"].get("name", ""),
                             bool(vf["configMapKeyRef"].get("optional"))))
            if "secretKeyRef" in vf:
                refs.append(("secretRef", vf["secretKeyRef"].get("name", ""), bool(vf["secretKeyRef"].get("optional"))))
        for kind, name, optional in refs:
            plural = "configmaps" if kind == "configMapRef" else "secrets"
            try:
                obj = await self.client_ref().get(f"/api/v1/namespaces/{ns}/{plural}/{name}")
            except StatusError as err:
                if err.code == 404 and optional:
                    continue
                raise VolumeError(f"{plural[:-1]} \"{name}\" not found" if err.code == 404 else err.message) from err
            data = obj.get("data") or {}
            if kind == "secretRef":
                data = {k: base64.b64decode(v).decode(errors="replace") for k, v in data.items()}
            cache[f"{kind}/{name}"] = {k: str(v) for k, v in data.items()}

    def _spec(self, w: PodWorker, c: Obj) -> ContainerSpec:
        command = list(c.get("command") or [])
        args = list(c.get("args") or [])
        if not command:
            raise VolumeError(
                f'container "{c["name"]}" has no command: kplane runs containers as host processes and does not '
                "pull images, so the image's entrypoint is unknown; set command (and args)")
        env = self._env(w, c)
        argv = [expand(x, env) for x in command + args]
        mounts = []
        assert w.volumes is not None
        for m in c.get("volumeMounts") or []:
            src = w.volumes.dirs.get(m.get("name", ""))
            if src is None:
                raise VolumeError(f"volume {m.get('name')!r} is not prepared")
            sub = m.get("subPath")
            if sub:
                if sub.startswith("/") or ".." in sub.split("/"):
                    raise VolumeError(f"invalid subPath {sub!r}")
                src = src / sub
            mounts.append({"source": str(src), "target": m.get("mountPath", ""), "readOnly": bool(m.get("readOnly"))})
        if mounts and self.is_root:
            argv = ["unshare", "--mount", "--propagation", "private", "--", sys.executable, "-m",
                    "kplane.kubelet.mountexec", json.dumps(mounts), "--", *argv]
        elif mounts:
            # no mount namespace without root: volumes are reachable through environment variables instead
            for m in mounts:
                key = re.sub(r"[^A-Za-z0-9]", "_", m["target"]).strip("_").upper()
                env[f"KPLANE_MOUNT_{key}"] = m["source"]
        return ContainerSpec(argv=argv, env=env, cwd=c.get("workingDir") or None, netns=self.netns_path(w),
                             stdin=bool(c.get("stdin")),
                             stdin_once=bool(c.get("stdinOnce")), tty=bool(c.get("tty")))

    def _state_of(self, cid: str) -> Obj | None:
        """The container's state in the API's shape, from the runtime's on-disk record."""
        st = self.runtime.status(cid)
        if st.state == "unknown":
            return None
        started = _ts(st.started_at)
        if st.state in ("running", "created"):
            return {"running": {"startedAt": started or rfc3339()}}
        ex = st.exit
        term: Obj = {"exitCode": ex.exit_code if ex else 0,
                     "reason": (ex.reason if ex else "") or ("Completed" if ex and ex.exit_code == 0 else "Error"),
                     "startedAt": started or _ts(ex.started_at if ex else None) or rfc3339(),
                     "finishedAt": _ts(ex.finished_at if ex else None) or rfc3339(),
                     "containerID": f"kplane://{cid}"}
        if ex and ex.signal:
            term["signal"] = ex.signal
        if ex and ex.message:
            term["message"] = ex.message
        return {"terminated": term}

    async def _report(self, w: PodWorker, volume_error: str | None = None) -> None:
        pod = w.pod
        uid = pod["metadata"]["uid"]
        policy = pod.get("spec", {}).get("restartPolicy", "Always")
        inits, apps = self._containers(pod)

        def statuses(cs: list[Obj]) -> list[Obj]:
            out = []
            for c in cs:
                rec = w.records.get(c["name"], ContainerRecord())
                state: Obj | None = None
                if rec.attempt >= 0:
                    state = self._state_of(cid_for(uid, c["name"], rec.attempt))
                if rec.waiting and (state is None or "terminated" in state):
                    state = {"waiting": {"reason": rec.waiting[0], "message": rec.waiting[1]}}
                if state is None:
                    state = {"waiting": {"reason": "ContainerCreating"}}
                running = "running" in state
                cs_out: Obj = {"name": c["name"], "image": c.get("image", ""), "imageID": "", "ready": running,
                               "restartCount": rec.restarts, "started": running, "state": state,
                               "lastState": rec.last_state or {}}
                if rec.attempt >= 0:
                    cs_out["containerID"] = f"kplane://{cid_for(uid, c['name'], rec.attempt)}"
                out.append(cs_out)
            return out

        init_st, app_st = statuses(inits), statuses(apps)
        phase = _phase(policy, init_st, app_st)
        now = rfc3339()
        old_conds = {c.get("type"): c for c in (pod.get("status") or {}).get("conditions") or []}
        all_ready = bool(app_st) and all(s["ready"] for s in app_st)
        initialized = all("terminated" in s["state"] and s["state"]["terminated"]["exitCode"] == 0 for s in init_st)

        def cond(t: str, ok: bool, reason: str | None = None) -> Obj:
            status = "True" if ok else "False"
            prev = old_conds.get(t)
            c: Obj = {"type": t, "status": status, "lastProbeTime": None,
                      "lastTransitionTime": prev["lastTransitionTime"] if prev and prev.get("status") == status
                      and prev.get("lastTransitionTime") else now}
            if reason and not ok:
                c["reason"] = reason
            return c

        done = phase in ("Succeeded", "Failed")
        conds = [
            cond("PodReadyToStartContainers", volume_error is None),
            cond("Initialized", initialized, "ContainersNotInitialized"),
            cond("Ready", all_ready and not done, "PodCompleted" if done else "ContainersNotReady"),
            cond("ContainersReady", all_ready and not done, "PodCompleted" if done else "ContainersNotReady"),
            cond("PodScheduled", True),
        ]
        ip, pod_ip = self.agent.cfg.node_ip, w.ip or self.agent.cfg.node_ip
        status: Obj = {"phase": phase, "conditions": conds, "hostIP": ip, "hostIPs": [{"ip": ip}], "podIP": pod_ip,
                       "podIPs": [{"ip": pod_ip}], "startTime": w.start_time, "containerStatuses": app_st,
                       "qosClass": (pod.get("status") or {}).get("qosClass", "BestEffort")}
        if init_st:
            status["initContainerStatuses"] = init_st
        if volume_error:
            status["message"] = volume_error
        comparable = json.dumps({k: v for k, v in status.items() if k != "conditions"}, sort_keys=True) + \
            json.dumps([(c["type"], c["status"]) for c in conds])
        if w.last_status is not None and w.last_status.get("_cmp") == comparable:
            return
        body = {**{k: v for k, v in pod.items() if not k.startswith("__")}, "status": status}
        try:
            updated = await self.client_ref().update(
                f"/api/v1/namespaces/{pod['metadata']['namespace']}/pods/{pod['metadata']['name']}/status", body)
            w.pod = {**updated, **{k: v for k, v in pod.items() if k.startswith("__")}}
            w.last_status = {"_cmp": comparable}
        except StatusError as err:
            if err.code == 409:
                with contextlib.suppress(StatusError):
                    fresh = await self.client_ref().get(
                        f"/api/v1/namespaces/{pod['metadata']['namespace']}/pods/{pod['metadata']['name']}")
                    w.pod = {**fresh, **{k: v for k, v in pod.items() if k.startswith("__")}}
            elif err.code != 404:
                log.warning("pod %s status update failed: %s", pod["metadata"]["name"], err.message)

    async def _terminate(self, w: PodWorker) -> None:
        pod = w.pod
        uid, ns, name = pod["metadata"]["uid"], pod["metadata"]["namespace"], pod["metadata"]["name"]
        grace = pod["metadata"].get("deletionGracePeriodSeconds")
        if grace is None:
            grace = pod.get("spec", {}).get("terminationGracePeriodSeconds", 30)
        cids = [cid for cid in self.runtime.list() if (parse_cid(cid) or ("",))[0] == uid]
        running = [cid for cid in cids if self.runtime.status(cid).state in ("running", "created")]
        await asyncio.gather(*(self.runtime.stop(cid, float(grace)) for cid in running), return_exceptions=True)
        if not pod.get("__gone__"):
            with contextlib.suppress(StatusError):
                await self._report(w)
            try:
                await self.client_ref().request(
                    "DELETE", f"/api/v1/namespaces/{ns}/pods/{name}",
                    body={"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0,
                          "preconditions": {"uid": uid}})
            except StatusError as err:
                if err.code not in (404, 409):
                    log.warning("pod %s/%s: final delete failed: %s", ns, name, err.message)
        for cid in cids:
            with contextlib.suppress(Exception):
                self.runtime.remove(cid, force=True)
        self.volumes.cleanup(uid)
        await self.net.teardown_pod(uid)


def _ts(dt: datetime | None) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if dt else ""


def _phase(policy: str, inits: list[Obj], apps: list[Obj]) -> str:
    if any("terminated" in s["state"] and s["state"]["terminated"]["exitCode"] != 0 for s in inits) \
            and policy == "Never":
        return "Failed"
    if inits and not all("terminated" in s["state"] and s["state"]["terminated"]["exitCode"] == 0 for s in inits):
        return "Pending"
    if not apps:
        return "Pending"
    states = [s["state"] for s in apps]
    if any("running" in s for s in states):
        return "Running"
    if all("terminated" in s for s in states):
        codes = [s["terminated"]["exitCode"] for s in states]
        if policy == "Always":
            return "Running"
        if all(c == 0 for c in codes):
            return "Succeeded"
        if policy == "Never":
            return "Failed"
        return "Running"
    if any(s.get("waiting", {}).get("reason") == "CrashLoopBackOff" for s in states):
        return "Running"
    return "Pending"


__all__ = ["PodManager", "expand", "meta"]
