"""The scheduler: binds pending pods to nodes, over the network API with the scheduler's own credentials.

A pod is *pending* for the scheduler named ``name`` when its ``spec.schedulerName`` is that name, it has no
``spec.nodeName``, no ``deletionTimestamp``, no scheduling gates, and has not terminated.

For each pending pod (highest priority first, then oldest) the scheduler keeps the nodes that pass every filter
(:func:`filter_node`, in upstream's plugin order, first failure wins):

* the node is Ready (condition ``Ready=True``);
* it is not ``spec.unschedulable`` (unless the pod tolerates ``node.kubernetes.io/unschedulable:NoSchedule``);
* the pod tolerates every ``NoSchedule``/``NoExecute`` taint (:func:`tolerates`);
* its labels match ``spec.nodeSelector`` and required node affinity;
* its allocatable cpu, memory, pods (and any other requested resource) cover the requests of the
  non-terminated pods bound there plus this one (:func:`pod_requests`: sum of containers, max with init
  containers, plus overhead).

and binds the pod (``POST .../pods/<name>/binding``) to the one with the best :func:`score` (least requested).
When none fits it sets the ``PodScheduled=False`` condition (reason ``Unschedulable``, upstream's message, see
:func:`failure_message`) and records a ``FailedScheduling`` event; unschedulable pods are retried when nodes or
pods change, and every ``retry_interval`` seconds.

The filter and score functions are pure functions of pod and node dicts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import quote

import aiohttp

from kplane.api.meta import now_rfc3339
from kplane.api.quantity import parse_milli
from kplane.client import APIClient
from kplane.errors import StatusError

log = logging.getLogger(__name__)

Obj = dict[str, Any]
Resources = dict[str, int]  # resource name -> milli-units ("pods" counts pods, in milli too: 1 pod = 1000)

UNSCHEDULABLE_TAINT = "node.kubernetes.io/unschedulable"

# upstream's reasons (framework plugins' Filter statuses)
R_NOT_READY = "node(s) were not ready"
R_UNSCHEDULABLE = "node(s) were unschedulable"
R_SELECTOR = "node(s) didn't match Pod's node affinity/selector"
R_TOO_MANY_PODS = "Too many pods"

# upstream's scoring defaults for containers that request nothing (so empty pods still spread)
DEFAULT_MILLI_CPU = 100
DEFAULT_MEMORY = 200 * 1024 * 1024


# --- pure functions --------------------------------------------------------------------------------------------

def _milli(q: Any) -> int:
    try:
        return parse_milli(q)
    except ValueError:
        return 0


def _add(into: Resources, res: Mapping[str, int]) -> None:
    for k, v in res.items():
        into[k] = into.get(k, 0) + v


def _max(into: Resources, res: Mapping[str, int]) -> None:
    for k, v in res.items():
        into[k] = max(into.get(k, 0), v)


def container_requests(container: Mapping[str, Any]) -> Resources:
    """A container's requests in milli-units; a resource with only a limit requests its limit (upstream default)."""
    resources = container.get("resources") or {}
    out: Resources = {k: _milli(v) for k, v in (resources.get("limits") or {}).items()}
    out.update({k: _milli(v) for k, v in (resources.get("requests") or {}).items()})
    return out


def pod_requests(pod: Mapping[str, Any]) -> Resources:
    """What ``pod`` needs of a node, in milli-units, without the ``pods`` slot itself.

    The sum over containers (plus restartable "sidecar" init containers), the max with each ordinary init
    container (plus the sidecars started before it), plus ``spec.overhead``.
    """
    spec = pod.get("spec") or {}
    total: Resources = {}
    for c in spec.get("containers") or []:
        _add(total, container_requests(c))
    sidecars: Resources = {}
    init_max: Resources = {}
    for c in spec.get("initContainers") or []:
        req = container_requests(c)
        if c.get("restartPolicy") == "Always":
            _add(sidecars, req)
            _max(init_max, sidecars)
        else:
            during = dict(sidecars)
            _add(during, req)
            _max(init_max, during)
    _add(total, sidecars)
    _max(total, init_max)
    _add(total, {k: _milli(v) for k, v in (spec.get("overhead") or {}).items()})
    return {k: v for k, v in total.items() if v}


def node_allocatable(node: Mapping[str, Any]) -> Resources:
    """``status.allocatable`` (or ``status.capacity``) in milli-units."""
    status = node.get("status") or {}
    alloc = status.get("allocatable") or status.get("capacity") or {}
    return {k: _milli(v) for k, v in alloc.items()}


def is_terminated(pod: Mapping[str, Any]) -> bool:
    return (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed")


def is_ready(node: Mapping[str, Any]) -> bool:
    for c in (node.get("status") or {}).get("conditions") or []:
        if c.get("type") == "Ready":
            return c.get("status") == "True"
    return False


def tolerates(toleration: Mapping[str, Any], taint: Mapping[str, Any]) -> bool:
    """Upstream's ``Toleration.ToleratesTaint``."""
    effect = toleration.get("effect") or ""
    if effect and effect != taint.get("effect"):
        return False
    key = toleration.get("key") or ""
    if key and key != taint.get("key"):
        return False
    op = toleration.get("operator") or "Equal"
    if op == "Exists":
        return True
    if op == "Equal":
        # an empty key with operator Equal is invalid in the API; it tolerates nothing with a key
        return bool(key) and (toleration.get("value") or "") == (taint.get("value") or "")
    return False


def untolerated_taint(pod: Mapping[str, Any], node: Mapping[str, Any]) -> Obj | None:
    """The first ``NoSchedule``/``NoExecute`` taint of ``node`` that ``pod`` does not tolerate."""
    tolerations = (pod.get("spec") or {}).get("tolerations") or []
    for taint in (node.get("spec") or {}).get("taints") or []:
        if taint.get("effect") not in ("NoSchedule", "NoExecute"):
            continue
        if not any(tolerates(t, taint) for t in tolerations):
            return dict(taint)
    return None


def _match_expression(expr: Mapping[str, Any], values: Mapping[str, str]) -> bool:
    key = expr.get("key", "")
    op = expr.get("operator")
    vals = [str(v) for v in expr.get("values") or []]
    if op == "In":
        return key in values and values[key] in vals
    if op == "NotIn":
        return key not in values or values[key] not in vals
    if op == "Exists":
        return key in values
    if op == "DoesNotExist":
        return key not in values
    if op in ("Gt", "Lt"):
        if key not in values or len(vals) != 1:
            return False
        try:
            have, want = int(values[key]), int(vals[0])
        except ValueError:
            return False
        return have > want if op == "Gt" else have < want
    return False


def _match_term(term: Mapping[str, Any], node: Mapping[str, Any]) -> bool:
    exprs = term.get("matchExpressions") or []
    fields = term.get("matchFields") or []
    if not exprs and not fields:
        return False  # an empty term matches no objects
    labels = (node.get("metadata") or {}).get("labels") or {}
    name = {"metadata.name": (node.get("metadata") or {}).get("name", "")}
    return all(_match_expression(e, labels) for e in exprs) and all(_match_expression(f, name) for f in fields)


def matches_node_selector(pod: Mapping[str, Any], node: Mapping[str, Any]) -> bool:
    """``spec.nodeSelector`` and ``requiredDuringSchedulingIgnoredDuringExecution`` node affinity."""
    spec = pod.get("spec") or {}
    labels = (node.get("metadata") or {}).get("labels") or {}
    for k, v in (spec.get("nodeSelector") or {}).items():
        if labels.get(k) != v:
            return False
    required = (((spec.get("affinity") or {}).get("nodeAffinity") or {})
                .get("requiredDuringSchedulingIgnoredDuringExecution"))
    if required is not None:
        return any(_match_term(t, node) for t in required.get("nodeSelectorTerms") or [])
    return True


def requested_on(pods: Iterable[Mapping[str, Any]]) -> Resources:
    """The sum of what non-terminated ``pods`` request, with one ``pods`` slot (1000 milli) each."""
    total: Resources = {}
    for p in pods:
        if is_terminated(p):
            continue
        _add(total, pod_requests(p))
        _add(total, {"pods": 1000})
    return total


def insufficient(pod: Mapping[str, Any], node: Mapping[str, Any],
                 bound: Iterable[Mapping[str, Any]] = ()) -> list[str]:
    """Upstream's NodeResourcesFit reasons: ``Too many pods``, ``Insufficient <resource>`` (sorted)."""
    alloc = node_allocatable(node)
    used = requested_on(bound)
    reasons = []
    if used.get("pods", 0) + 1000 > alloc.get("pods", 0):
        reasons.append(R_TOO_MANY_PODS)
    want = pod_requests(pod)
    for res in sorted(want):
        if want[res] > 0 and used.get(res, 0) + want[res] > alloc.get(res, 0):
            reasons.append(f"Insufficient {res}")
    return reasons


def filter_node(pod: Mapping[str, Any], node: Mapping[str, Any],
                bound: Iterable[Mapping[str, Any]] = ()) -> list[str]:
    """Why ``pod`` cannot go to ``node`` where ``bound`` pods already are: ``[]`` when it fits.

    Filters run in upstream's order and the first failing one gives the reason(s).
    """
    if not is_ready(node):
        return [R_NOT_READY]
    unschedulable_taint = {"key": UNSCHEDULABLE_TAINT, "effect": "NoSchedule"}
    if (node.get("spec") or {}).get("unschedulable") and not any(
            tolerates(t, unschedulable_taint) for t in (pod.get("spec") or {}).get("tolerations") or []):
        return [R_UNSCHEDULABLE]
    taint = untolerated_taint(pod, node)
    if taint is not None:
        return [f"node(s) had untolerated taint {{{taint.get('key', '')}: {taint.get('value', '')}}}"]
    if not matches_node_selector(pod, node):
        return [R_SELECTOR]
    return insufficient(pod, node, bound)


def score(pod: Mapping[str, Any], node: Mapping[str, Any], bound: Iterable[Mapping[str, Any]] = ()) -> float:
    """Upstream's LeastAllocated score in [0, 100]: the mean free fraction of cpu and memory after placing the pod.

    Containers that request no cpu / memory count as 100m / 200Mi, as upstream does for scoring.
    """
    def nonzero(p: Mapping[str, Any]) -> Resources:
        req = pod_requests(p)
        out = {"cpu": req.get("cpu", 0), "memory": req.get("memory", 0)}
        containers = (p.get("spec") or {}).get("containers") or []
        for c in containers:
            r = container_requests(c)
            if not r.get("cpu"):
                out["cpu"] += DEFAULT_MILLI_CPU
            if not r.get("memory"):
                out["memory"] += DEFAULT_MEMORY * 1000
        return out

    alloc = node_allocatable(node)
    used: Resources = {}
    for p in [*bound, pod]:
        if not is_terminated(p):
            _add(used, nonzero(p))
    parts = []
    for res in ("cpu", "memory"):
        cap = alloc.get(res, 0)
        parts.append(0.0 if cap <= 0 or used.get(res, 0) > cap else (cap - used.get(res, 0)) * 100 / cap)
    return sum(parts) / len(parts)


def failure_message(num_nodes: int, reasons: Mapping[str, list[str]]) -> str:
    """Upstream's FitError message: ``0/2 nodes are available: 1 Insufficient cpu, 1 node(s) were unschedulable.``"""
    if num_nodes == 0:
        return "no nodes available to schedule pods"
    hist: Counter[str] = Counter()
    for rs in reasons.values():
        hist.update(set(rs))
    parts = sorted(f"{n} {r}" for r, n in hist.items())
    return f"0/{num_nodes} nodes are available: {', '.join(parts)}."


def select_node(pod: Mapping[str, Any], nodes: Iterable[Mapping[str, Any]],
                pods_by_node: Mapping[str, Sequence[Mapping[str, Any]]] | None = None) -> tuple[str | None, str]:
    """The best node for ``pod`` (highest score, then name) and ``""``, or ``None`` and the failure message."""
    pods_by_node = pods_by_node or {}
    node_list = list(nodes)
    reasons: dict[str, list[str]] = {}
    best: tuple[float, str] | None = None
    for node in node_list:
        name = (node.get("metadata") or {}).get("name", "")
        bound = pods_by_node.get(name, ())
        why = filter_node(pod, node, bound)
        if why:
            reasons[name] = why
            continue
        s = score(pod, node, bound)
        if best is None or s > best[0] or (s == best[0] and name < best[1]):
            best = (s, name)
    if best is not None:
        return best[1], ""
    return None, failure_message(len(node_list), reasons)


def is_pending(pod: Mapping[str, Any], scheduler_name: str) -> bool:
    spec = pod.get("spec") or {}
    return (spec.get("schedulerName", "default-scheduler") == scheduler_name and not spec.get("nodeName")
            and not (pod.get("metadata") or {}).get("deletionTimestamp") and not is_terminated(pod)
            and not spec.get("schedulingGates"))


# --- the controller --------------------------------------------------------------------------------------------

def _key(obj: Mapping[str, Any]) -> str:
    md = obj.get("metadata") or {}
    return f"{md.get('namespace', '')}/{md.get('name', '')}"


class Scheduler:
    """Schedules the pods whose ``spec.schedulerName`` is ``name``; ``start()`` then ``await close()``."""

    def __init__(self, client: APIClient, *, name: str = "default-scheduler", retry_interval: float = 5.0) -> None:
        self.client = client
        self.name = name
        self.retry_interval = retry_interval
        self.stop = asyncio.Event()
        self.nodes: dict[str, Obj] = {}
        self.pods: dict[str, Obj] = {}  # all pods, "ns/name" -> pod
        self._assumed: dict[str, str] = {}  # pods we bound that the watch has not shown bound yet -> node
        self._active: set[str] = set()  # pending pods to try now
        self._unschedulable: dict[str, float] = {}  # pending pods that did not fit -> when we last tried
        self._wake = asyncio.Event()
        self._nodes_synced = asyncio.Event()
        self._pods_synced = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[None]] = set()
        self._instance = f"{name}-{secrets.token_hex(4)}"

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._reflect("/api/v1/nodes", self.nodes, self._nodes_synced, self._on_node)),
            asyncio.create_task(self._reflect("/api/v1/pods", self.pods, self._pods_synced, self._on_pod)),
            asyncio.create_task(self._run()),
        ]

    async def close(self) -> None:
        self.stop.set()
        for t in [*self._tasks, *self._background]:
            t.cancel()
        for t in [*self._tasks, *self._background]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    # --- caches -------------------------------------------------------------------------------------------

    async def _reflect(self, path: str, cache: dict[str, Obj], synced: asyncio.Event,
                       on_change: Callable[[str, Obj | None, Obj | None], None]) -> None:
        """LIST (replacing the cache) then WATCH, re-listing after errors; ``on_change(key, old, new)``."""
        while not self.stop.is_set():
            try:
                lst = await self.client.get(path)
                rv = str((lst.get("metadata") or {}).get("resourceVersion", "0"))
                fresh = {_key(o): o for o in lst.get("items") or []}
                for k in list(cache):
                    if k not in fresh:
                        on_change(k, cache.pop(k), None)
                for k, o in fresh.items():
                    old = cache.get(k)
                    cache[k] = o
                    on_change(k, old, o)
                synced.set()
                while not self.stop.is_set():
                    async for ev in self.client.watch(path, resource_version=rv):
                        typ = ev.get("type")
                        obj = ev.get("object") or {}
                        if typ == "ERROR":
                            raise StatusError(int(obj.get("code", 500)), str(obj.get("message", "watch error")))
                        rv = str((obj.get("metadata") or {}).get("resourceVersion", rv))
                        if typ == "BOOKMARK":
                            continue
                        k = _key(obj)
                        if typ == "DELETED":
                            on_change(k, cache.pop(k, None), None)
                        else:
                            old = cache.get(k)
                            cache[k] = obj
                            on_change(k, old, obj)
            except asyncio.CancelledError:
                raise
            except (TimeoutError, aiohttp.ClientError, StatusError, OSError, ValueError) as err:
                log.debug("scheduler: watch %s: %s", path, err)
                await asyncio.sleep(0.5)

    def _retry_unschedulable(self) -> None:
        if self._unschedulable:
            self._active.update(self._unschedulable)
            self._unschedulable.clear()
            self._wake.set()

    def _on_node(self, key: str, old: Obj | None, new: Obj | None) -> None:
        if new is None or old is None or old.get("spec") != new.get("spec") or \
                (old.get("metadata") or {}).get("labels") != (new.get("metadata") or {}).get("labels") or \
                (old.get("status") or {}).get("allocatable") != (new.get("status") or {}).get("allocatable") or \
                is_ready(old) != is_ready(new):
            self._retry_unschedulable()

    def _on_pod(self, key: str, old: Obj | None, new: Obj | None) -> None:
        if new is None or (new.get("spec") or {}).get("nodeName") or not is_pending(new, self.name):
            self._active.discard(key)
            self._unschedulable.pop(key, None)
        if new is None or (new.get("spec") or {}).get("nodeName"):
            self._assumed.pop(key, None)
        # a pod leaving a node (or terminating) frees room there
        if old is not None and (old.get("spec") or {}).get("nodeName") and not is_terminated(old) and (
                new is None or is_terminated(new)):
            self._retry_unschedulable()
        if new is not None and is_pending(new, self.name) and key not in self._assumed:
            # re-try an unschedulable pod only when what it asks for changed, not on our own status updates
            if key in self._unschedulable and old is not None and old.get("spec") == new.get("spec"):
                return
            self._unschedulable.pop(key, None)
            self._active.add(key)
            self._wake.set()

    def _pods_by_node(self) -> dict[str, list[Obj]]:
        out: dict[str, list[Obj]] = {}
        for k, p in self.pods.items():
            node = (p.get("spec") or {}).get("nodeName") or self._assumed.get(k)
            if node and not is_terminated(p):
                out.setdefault(node, []).append(p)
        return out

    # --- scheduling ---------------------------------------------------------------------------------------

    async def _run(self) -> None:
        await self._nodes_synced.wait()
        await self._pods_synced.wait()
        while not self.stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.retry_interval)
            self._wake.clear()
            now = time.monotonic()
            for k, t in list(self._unschedulable.items()):
                if now - t >= self.retry_interval:
                    self._active.add(k)
                    del self._unschedulable[k]
            while self._active and not self.stop.is_set():
                key = min(self._active, key=self._queue_order)
                self._active.discard(key)
                pod = self.pods.get(key)
                if pod is None or not is_pending(pod, self.name) or key in self._assumed:
                    continue
                try:
                    await self.schedule_one(pod)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("scheduler: scheduling %s", key)
                    self._unschedulable[key] = time.monotonic()

    def _queue_order(self, key: str) -> tuple[int, str, str]:
        pod = self.pods.get(key) or {}
        prio = (pod.get("spec") or {}).get("priority") or 0
        return (-int(prio), str((pod.get("metadata") or {}).get("creationTimestamp", "")), key)

    async def schedule_one(self, pod: Obj) -> str | None:
        """Try to place ``pod`` now: the node it was bound to, or ``None``."""
        key = _key(pod)
        ns, name = pod["metadata"].get("namespace", ""), pod["metadata"]["name"]
        node, message = select_node(pod, self.nodes.values(), self._pods_by_node())
        if node is None:
            self._unschedulable[key] = time.monotonic()
            await self._mark_unschedulable(pod, message)
            return None
        body = {"apiVersion": "v1", "kind": "Binding",
                "metadata": {"name": name, "namespace": ns, "uid": pod["metadata"].get("uid")},
                "target": {"apiVersion": "v1", "kind": "Node", "name": node}}
        try:
            await self.client.create(f"/api/v1/namespaces/{quote(ns)}/pods/{quote(name)}/binding", body)
        except StatusError as err:
            if err.code in (404, 409):  # gone, already bound or being deleted: nothing to do
                log.debug("scheduler: binding %s: %s", key, err.message)
                return None
            raise
        self._assumed[key] = node
        log.info("scheduler: bound %s to %s", key, node)
        self._record_event(pod, "Normal", "Scheduled", f"Successfully assigned {ns}/{name} to {node}")
        return node

    async def _mark_unschedulable(self, pod: Obj, message: str) -> None:
        ns, name = pod["metadata"].get("namespace", ""), pod["metadata"]["name"]
        path = f"/api/v1/namespaces/{quote(ns)}/pods/{quote(name)}/status"
        cur: Obj = pod
        for attempt in range(3):
            conds = (cur.get("status") or {}).get("conditions") or []
            old = next((c for c in conds if c.get("type") == "PodScheduled"), None)
            if old is not None and old.get("status") == "False" and old.get("reason") == "Unschedulable" \
                    and old.get("message") == message:
                return  # already says so: no new status, no new event
            if (cur.get("spec") or {}).get("nodeName") or (cur.get("metadata") or {}).get("deletionTimestamp"):
                return
            transition = old.get("lastTransitionTime") if old is not None and old.get("status") == "False" else None
            cond = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message,
                    "lastProbeTime": None, "lastTransitionTime": transition or now_rfc3339()}
            body = dict(cur)
            body["status"] = dict(cur.get("status") or {})
            body["status"]["conditions"] = [c for c in conds if c.get("type") != "PodScheduled"] + [cond]
            try:
                await self.client.update(path, body)
                break
            except StatusError as err:
                if err.code == 404:
                    return
                if err.code != 409 or attempt == 2:
                    raise
                cur = await self.client.get(f"/api/v1/namespaces/{quote(ns)}/pods/{quote(name)}")
        log.info("scheduler: %s/%s unschedulable: %s", ns, name, message)
        self._record_event(pod, "Warning", "FailedScheduling", message)

    def _record_event(self, pod: Obj, typ: str, reason: str, message: str) -> None:
        md = pod.get("metadata") or {}
        ns, name = md.get("namespace", "default"), md.get("name", "")
        now = now_rfc3339()
        ev = {"apiVersion": "v1", "kind": "Event",
              "metadata": {"name": f"{name}.{secrets.token_hex(8)}", "namespace": ns},
              "involvedObject": {"apiVersion": "v1", "kind": "Pod", "namespace": ns, "name": name,
                                 "uid": md.get("uid", ""), "resourceVersion": md.get("resourceVersion", "")},
              "type": typ, "reason": reason, "message": message, "action": "Scheduling",
              "source": {"component": self.name}, "reportingComponent": self.name,
              "reportingInstance": self._instance, "firstTimestamp": now, "lastTimestamp": now, "count": 1}

        async def post() -> None:
            try:
                await self.client.create(f"/api/v1/namespaces/{quote(ns)}/events", ev)
            except (StatusError, aiohttp.ClientError, OSError, TimeoutError) as err:
                log.debug("scheduler: event for %s/%s: %s", ns, name, err)

        task = asyncio.create_task(post())
        self._background.add(task)
        task.add_done_callback(self._background.discard)
