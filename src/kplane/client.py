"""A small asyncio client of the kplane API over HTTPS, for controllers, the scheduler and the node agent.

Components talk to the apiserver only through this network API, with their own client certificates or tokens.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson

from kplane.errors import StatusError

Obj = dict[str, Any]


class APIClient:
    def __init__(self, server: str, *, ca_file: Path, cert_file: Path | None = None, key_file: Path | None = None,
                 token: str | None = None) -> None:
        self.server = server.rstrip("/")
        self.ctx = ssl.create_default_context(cafile=str(ca_file))
        if cert_file is not None and key_file is not None:
            self.ctx.load_cert_chain(str(cert_file), str(key_file))
        self.headers = {"Accept": "application/json", "User-Agent": "kplane/0.1"}
        if token:
            self.headers["Authorization"] = f"Bearer {token}"
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self.ctx, limit=32),
                headers=self.headers,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def request(self, method: str, path: str, *, body: Any = None, params: dict[str, str] | None = None,
                      content_type: str = "application/json") -> Obj:
        data = orjson.dumps(body) if body is not None else None
        headers = {"Content-Type": content_type} if data is not None else None
        async with self.session.request(method, self.server + path, data=data, params=params,
                                        headers=headers, timeout=aiohttp.ClientTimeout(total=30)) as resp:
            raw = await resp.read()
            try:
                out = orjson.loads(raw) if raw else {}
            except orjson.JSONDecodeError:
                out = {"message": raw.decode(errors="replace")}
            if resp.status >= 400:
                raise StatusError(resp.status, str(out.get("message", resp.reason)), reason=out.get("reason"),
                                  details=out.get("details"))
            return out if isinstance(out, dict) else {"value": out}

    async def get(self, path: str, **kw: Any) -> Obj:
        return await self.request("GET", path, **kw)

    async def create(self, path: str, body: Obj) -> Obj:
        return await self.request("POST", path, body=body)

    async def update(self, path: str, body: Obj) -> Obj:
        return await self.request("PUT", path, body=body)

    async def delete(self, path: str) -> Obj:
        return await self.request("DELETE", path)

    async def watch(self, path: str, *, resource_version: str, timeout_s: int = 300) -> AsyncIterator[Obj]:
        params = {"watch": "true", "resourceVersion": resource_version, "allowWatchBookmarks": "true",
                  "timeoutSeconds": str(timeout_s)}
        async with self.session.get(self.server + path, params=params,
                                    timeout=aiohttp.ClientTimeout(total=timeout_s + 30)) as resp:
            if resp.status >= 400:
                raw = await resp.read()
                raise StatusError(resp.status, raw.decode(errors="replace"))
            async for line in resp.content:
                if line.strip():
                    yield orjson.loads(line)


def path_for(group: str, version: str, plural: str, namespace: str | None = None, name: str | None = None,
             sub: str | None = None) -> str:
    base = f"/apis/{group}/{version}" if group else f"/api/{version}"
    if namespace:
        base += f"/namespaces/{quote(namespace)}"
    base += f"/{plural}"
    if name:
        base += f"/{quote(name)}"
    if sub:
        base += f"/{sub}"
    return base


def _key(obj: Obj) -> str:
    md = obj.get("metadata") or {}
    return f"{md.get('namespace', '')}/{md.get('name', '')}"


async def informer(client: APIClient, path: str, stop: asyncio.Event) -> AsyncIterator[tuple[str, Obj]]:
    """LIST then WATCH forever, re-listing on 410 or a broken watch: yields ("ADDED"|"MODIFIED"|"DELETED"|"SYNC",
    obj). A re-list yields every listed object as "SYNC" and then "DELETED" (with the last state seen) for each
    object that disappeared while no watch was open, so a consumer's cache never keeps a deleted object."""
    known: dict[str, Obj] = {}
    while not stop.is_set():
        try:
            lst = await client.get(path)
            rv = lst.get("metadata", {}).get("resourceVersion", "0")
            listed: dict[str, Obj] = {}
            for item in lst.get("items") or []:
                listed[_key(item)] = item
                yield "SYNC", item
            for gone in known.keys() - listed.keys():
                yield "DELETED", known[gone]
            known = listed
            while not stop.is_set():
                async for ev in client.watch(path, resource_version=rv):
                    if ev.get("type") == "ERROR":
                        raise StatusError(int(ev.get("object", {}).get("code", 500)), "watch error")
                    obj = ev.get("object") or {}
                    rv = obj.get("metadata", {}).get("resourceVersion", rv)
                    kind = str(ev.get("type"))
                    if kind == "BOOKMARK":
                        continue
                    if kind == "DELETED":
                        known.pop(_key(obj), None)
                    else:
                        known[_key(obj)] = obj
                    yield kind, obj
        except (TimeoutError, aiohttp.ClientError, StatusError, OSError):
            await asyncio.sleep(0.5)
