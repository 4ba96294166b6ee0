"""Namespace-scoped controllers, each an API client with the controller-manager's certificate:

* namespace: empties a namespace being deleted, then removes the ``kubernetes`` finalizer;
* serviceaccount: a ``default`` ServiceAccount in every active namespace;
* root-ca: a ``kube-root-ca.crt`` ConfigMap with the cluster CA in every active namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from kplane.aio import cancel_and_wait
from kplane.api.resources import RESOURCES
from kplane.client import APIClient, informer, path_for
from kplane.errors import StatusError

log = logging.getLogger(__name__)

Obj = dict[str, Any]


class NamespaceControllers:
    def __init__(self, client: APIClient, ca_pem: bytes) -> None:
        self.client = client
        self.ca_pem = ca_pem.decode()
        self.stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._deleting: set[str] = set()

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._run_namespaces()), asyncio.create_task(self._run_configmaps()),
                       asyncio.create_task(self._run_serviceaccounts())]

    async def close(self) -> None:
        self.stop.set()
        await cancel_and_wait(self._tasks)

    async def _run_namespaces(self) -> None:
        async for ev, ns in informer(self.client, "/api/v1/namespaces", self.stop):
            if ev == "DELETED":
                continue
            name = ns["metadata"]["name"]
            try:
                if ns["metadata"].get("deletionTimestamp"):
                    if name not in self._deleting:
                        self._deleting.add(name)
                        asyncio.create_task(self._finalize(ns))
                else:
                    await self._ensure(name)
            except StatusError as err:
                log.warning("namespace controller: %s: %s", name, err.message)

    async def _run_configmaps(self) -> None:
        # recreate the root CA configmap if someone deletes or edits it
        async for ev, cm in informer(self.client, "/api/v1/configmaps?fieldSelector=metadata.name%3Dkube-root-ca.crt",
                                     self.stop):
            ns = cm["metadata"].get("namespace", "")
            if ev == "DELETED" or (cm.get("data") or {}).get("ca.crt") != self.ca_pem:
                with contextlib.suppress(StatusError):
                    await self._ensure(ns)

    async def _run_serviceaccounts(self) -> None:
        async for ev, _sa in informer(self.client, "/api/v1/serviceaccounts?fieldSelector=metadata.name%3Ddefault",
                                      self.stop):
            if ev == "DELETED":
                ns = _sa["metadata"].get("namespace", "")
                with contextlib.suppress(StatusError):
                    await self._ensure(ns)

    async def _ensure(self, ns: str) -> None:
        try:
            nsobj = await self.client.get(f"/api/v1/namespaces/{ns}")
        except StatusError:
            return
        if nsobj["metadata"].get("deletionTimestamp"):
            return
        try:
            await self.client.create(f"/api/v1/namespaces/{ns}/serviceaccounts",
                                     {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default"}})
        except StatusError as err:
            if err.code not in (409, 403, 404):
                raise
        body = {"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "kube-root-ca.crt",
                             "annotations": {"kubernetes.io/description": "Contains a CA bundle that can be used to "
                                             "verify the kube-apiserver when using internal endpoints such as the "
                                             "internal service IP or kubernetes.default.svc. No other usage is "
                                             "guaranteed across distributions of Kubernetes clusters."}},
                "data": {"ca.crt": self.ca_pem}}
        try:
            await self.client.create(f"/api/v1/namespaces/{ns}/configmaps", body)
        except StatusError as err:
            if err.code != 409:
                if err.code in (403, 404):
                    return
                raise
            cur = await self.client.get(f"/api/v1/namespaces/{ns}/configmaps/kube-root-ca.crt")
            if (cur.get("data") or {}).get("ca.crt") != self.ca_pem:
                cur["data"] = {"ca.crt": self.ca_pem}
                await self.client.update(f"/api/v1/namespaces/{ns}/configmaps/kube-root-ca.crt", cur)

    async def _finalize(self, ns: Obj) -> None:
        name = ns["metadata"]["name"]
        try:
            for _ in range(600):
                remaining = 0
                for r in RESOURCES:
                    if not r.namespaced or r.virtual or "list" not in r.verbs:
                        continue
                    path = path_for(r.group, r.version, r.plural, name)
                    try:
                        items = (await self.client.get(path)).get("items") or []
                    except StatusError:
                        continue
                    for it in items:
                        remaining += 1
                        if it["metadata"].get("deletionTimestamp"):
                            continue
                        with contextlib.suppress(StatusError):
                            await self.client.delete(f"{path}/{it['metadata']['name']}")
                if remaining == 0:
                    break
                await asyncio.sleep(0.5)
            cur = await self.client.get(f"/api/v1/namespaces/{name}")
            spec = cur.setdefault("spec", {})
            spec["finalizers"] = [f for f in spec.get("finalizers") or [] if f != "kubernetes"]
            await self.client.update(f"/api/v1/namespaces/{name}/finalize", cur)
        except StatusError as err:
            if err.code != 404:
                log.warning("namespace controller: finalizing %s: %s", name, err.message)
        finally:
            self._deleting.discard(name)
