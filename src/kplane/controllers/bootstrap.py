"""Bootstrap-token controllers (kube-controller-manager's ``bootstrapsigner`` and ``tokencleaner``):

* BootstrapSigner keeps ConfigMap ``kube-public/cluster-info``: key ``kubeconfig`` (a cluster-only kubeconfig with
  the apiserver URL and the CA) and ``jws-kubeconfig-<token-id>`` (detached HS256 JWS of that kubeconfig keyed by
  the full token) for every valid, unexpired bootstrap token allowed for signing. Stale signatures are removed.
* TokenCleaner deletes expired bootstrap token Secrets.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import Any

from kplane import bootstraptoken
from kplane.aio import cancel_and_wait
from kplane.api import meta
from kplane.client import APIClient, informer
from kplane.errors import StatusError

log = logging.getLogger(__name__)

Obj = dict[str, Any]

CM_NS = "kube-public"
CM_NAME = "cluster-info"
CM_PATH = f"/api/v1/namespaces/{CM_NS}/configmaps/{CM_NAME}"
SECRETS_PATH = f"/api/v1/namespaces/{bootstraptoken.NAMESPACE}/secrets"
JWS_PREFIX = "jws-kubeconfig-"


def cluster_kubeconfig(server: str, ca_pem: bytes) -> str:
    """The cluster-only kubeconfig kubeadm publishes in cluster-info (no users, no contexts)."""
    return "\n".join([
        "apiVersion: v1",
        "clusters:",
        "- cluster:",
        f"    certificate-authority-data: {base64.b64encode(ca_pem).decode()}",
        f"    server: {json.dumps(server)}",
        '  name: ""',
        "contexts: null",
        'current-context: ""',
        "kind: Config",
        "preferences: {}",
        "users: null",
        "",
    ])


def _secret_data(secret: Obj) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in (secret.get("data") or {}).items():
        try:
            out[k] = base64.b64decode(v, validate=True).decode()
        except (binascii.Error, ValueError, TypeError):
            continue
    return out


def token_from_secret(secret: Obj) -> tuple[str, datetime | None] | None:
    """(full token, expiration) if ``secret`` is a well-formed bootstrap token Secret, else None."""
    md = secret.get("metadata") or {}
    name = md.get("name", "")
    if secret.get("type") != bootstraptoken.SECRET_TYPE or not name.startswith(bootstraptoken.SECRET_PREFIX):
        return None
    if md.get("deletionTimestamp"):
        return None
    data = _secret_data(secret)
    tid, sec = data.get("token-id", ""), data.get("token-secret", "")
    if name != bootstraptoken.SECRET_PREFIX + tid:
        return None
    token = f"{tid}.{sec}"
    if not bootstraptoken.TOKEN_RE.match(token):
        return None
    exp: datetime | None = None
    if data.get("expiration"):
        exp = meta.parse_time(data["expiration"])
        if exp is None:  # unparsable expiration: treat as expired (upstream logs and skips it)
            exp = datetime.min.replace(tzinfo=UTC)
    return token, exp


def _expired(exp: datetime | None, now: datetime) -> bool:
    return exp is not None and exp <= now


class _Base:
    def __init__(self, client: APIClient, poll_s: float) -> None:
        self.client = client
        self.poll_s = poll_s
        self.stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._secrets: dict[str, Obj] = {}
        self._dirty = asyncio.Event()

    def _spawn(self, *coros: Callable[[], Coroutine[Any, Any, None]]) -> None:
        self._tasks = [asyncio.create_task(c()) for c in coros]

    async def close(self) -> None:
        self.stop.set()
        await cancel_and_wait(self._tasks)
        self._tasks = []

    async def _watch_secrets(self) -> None:
        async for ev, s in informer(self.client, SECRETS_PATH, self.stop):
            name = (s.get("metadata") or {}).get("name", "")
            if not name.startswith(bootstraptoken.SECRET_PREFIX):
                continue
            if ev == "DELETED":
                self._secrets.pop(name, None)
            else:
                self._secrets[name] = s
            self._dirty.set()

    async def _loop(self, fn: Callable[[], Coroutine[Any, Any, None]]) -> None:
        while not self.stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._dirty.wait(), self.poll_s)
            self._dirty.clear()
            try:
                await fn()
            except (StatusError, OSError, TimeoutError) as err:
                log.warning("%s: %s", type(self).__name__, err)
                await asyncio.sleep(0.5)
                self._dirty.set()
            except Exception:
                log.exception("%s: sync failed", type(self).__name__)
                await asyncio.sleep(1)


class BootstrapSigner(_Base):
    """Signs ``kube-public/cluster-info`` for every signing-enabled bootstrap token."""

    def __init__(self, client: APIClient, *, server: str, ca_pem: bytes, poll_s: float = 5.0) -> None:
        super().__init__(client, poll_s)
        self.kubeconfig = cluster_kubeconfig(server, ca_pem)

    def start(self) -> None:
        self._spawn(self._watch_secrets, self._watch_configmap, lambda: self._loop(self.sync))

    async def _watch_configmap(self) -> None:
        async for _ev, _cm in informer(self.client, f"/api/v1/namespaces/{CM_NS}/configmaps?fieldSelector="
                                       f"metadata.name%3D{CM_NAME}", self.stop):
            self._dirty.set()

    def desired_signatures(self, kubeconfig: str) -> dict[str, str]:
        now = datetime.now(UTC)
        out: dict[str, str] = {}
        soonest: float | None = None
        for s in self._secrets.values():
            parsed = token_from_secret(s)
            if parsed is None:
                continue
            token, exp = parsed
            if _expired(exp, now) or _secret_data(s).get("usage-bootstrap-signing") != "true":
                continue
            if exp is not None:
                left = (exp - now).total_seconds()
                soonest = left if soonest is None else min(soonest, left)
            out[JWS_PREFIX + token.split(".")[0]] = bootstraptoken.jws_detached(kubeconfig.encode(), token)
        if soonest is not None and soonest < self.poll_s:
            # re-sync right after the next expiry instead of waiting for the poll
            asyncio.get_running_loop().call_later(soonest + 0.05, self._dirty.set)
        return out

    async def sync(self) -> None:
        try:
            cm: Obj | None = await self.client.get(CM_PATH)
        except StatusError as err:
            if err.code != 404:
                raise
            cm = None
        if cm is None:
            data = {"kubeconfig": self.kubeconfig, **self.desired_signatures(self.kubeconfig)}
            body = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": CM_NAME, "namespace": CM_NS},
                    "data": data}
            try:
                await self.client.create(f"/api/v1/namespaces/{CM_NS}/configmaps", body)
            except StatusError as err:
                if err.code != 409:
                    raise
                self._dirty.set()
            return
        cur = dict(cm.get("data") or {})
        new = {k: v for k, v in cur.items() if not k.startswith(JWS_PREFIX)}
        new["kubeconfig"] = self.kubeconfig
        new.update(self.desired_signatures(self.kubeconfig))
        if new != cur:
            cm["data"] = new
            try:
                await self.client.update(CM_PATH, cm)
            except StatusError as err:
                if err.code not in (409, 404):
                    raise
                self._dirty.set()


class TokenCleaner(_Base):
    """Deletes bootstrap token Secrets whose expiration has passed."""

    def __init__(self, client: APIClient, *, poll_s: float = 5.0) -> None:
        super().__init__(client, poll_s)

    def start(self) -> None:
        self._spawn(self._watch_secrets, lambda: self._loop(self.sync))

    async def sync(self) -> None:
        now = datetime.now(UTC)
        soonest: float | None = None
        for name, s in list(self._secrets.items()):
            if s.get("type") != bootstraptoken.SECRET_TYPE:
                continue
            exp_s = _secret_data(s).get("expiration")
            if not exp_s:
                continue
            exp = meta.parse_time(exp_s)
            if exp is not None and exp > now:
                left = (exp - now).total_seconds()
                soonest = left if soonest is None else min(soonest, left)
                continue
            log.info("tokencleaner: deleting expired bootstrap token secret %s", name)
            try:
                await self.client.delete(f"{SECRETS_PATH}/{name}")
            except StatusError as err:
                if err.code != 404:
                    raise
            self._secrets.pop(name, None)
        if soonest is not None and soonest < self.poll_s:
            asyncio.get_running_loop().call_later(soonest + 0.05, self._dirty.set)
