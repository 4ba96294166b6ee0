"""kube-proxy inside the node agent: watch Services and EndpointSlices, keep the node's ClusterIP rules in sync.

The I/O shell around the pure parts: ``model.from_api`` (API objects to validated service ports),
``nftables.render`` / ``iptables.render`` (rules as text) and ``health.Health`` (what ``/healthz`` says).

* Two reflectors LIST then WATCH ``v1 services`` and ``discovery.k8s.io/v1 endpointslices`` with the node's own
  client certificate (group ``system:nodes``, bound to ``system:node-proxier``). A relist replaces the cache, so
  objects deleted while the watch was down disappear too. After a client-certificate rotation the next watch
  round uses the new client.
* Any change marks the rules dirty; the sync loop applies at most once per ``min_sync_interval`` (100 ms), and
  again every ``sync_period`` even without changes (so a flushed ruleset comes back). Nothing is applied before
  both lists have arrived. A sync whose result equals the rules in place (only between periodic syncs) is free.
* After a sync, UDP conntrack entries that would keep datagrams on a removed endpoint, or un-DNATed to a VIP
  that now has endpoints, are deleted (``conntrack.py``).
* Health on ``127.0.0.1:<healthz_port>`` only (``/healthz``, ``/livez``): 200, or 503 with the reason.
* ``stop()`` removes the node's table (or chains), so a stopped agent leaves no service VIPs behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from aiohttp import web

from kplane.aio import cancel_and_wait
from kplane.client import APIClient
from kplane.errors import StatusError
from kplane.proxy import conntrack, iptables, nftables
from kplane.proxy.health import Health
from kplane.proxy.model import ServicePort, from_api, table_name

log = logging.getLogger(__name__)

SERVICES_PATH = "/api/v1/services"
SLICES_PATH = "/apis/discovery.k8s.io/v1/endpointslices"
DEFAULT_HEALTHZ_PORT = 10256
COMMAND_TIMEOUT_S = 30.0

Obj = dict[str, Any]


class ProxyError(RuntimeError):
    """Applying or removing rules failed (the tool's message is in the text)."""


async def run_tool(argv: Sequence[str], stdin: str = "") -> str:
    proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin.encode()), COMMAND_TIMEOUT_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise ProxyError(f"{argv[0]} did not finish in {COMMAND_TIMEOUT_S:.0f}s") from None
    if proc.returncode != 0:
        msg = (err or out).decode(errors="replace").strip()
        raise ProxyError(f"{' '.join(argv)} exited with {proc.returncode}: {msg[-2000:]}")
    return out.decode(errors="replace")


class Backend(Protocol):
    name: str

    async def apply(self, ports: Sequence[ServicePort]) -> None: ...

    async def cleanup(self) -> None: ...


class NftBackend:
    """``wrap`` prefixes every command (tests run one inside a namespace with ``ip netns exec NS``)."""

    def __init__(self, table: str, nft: str = "nft", *, wrap: Sequence[str] = ()) -> None:
        self.table, self.nft, self.name = nftables.check_table(table), nft, f"nftables table ip {table}"
        self.wrap = list(wrap)

    async def _existing(self) -> list[str] | None:
        """The table's chains, or None when there is no table yet."""
        try:
            text = await run_tool([*self.wrap, self.nft, "-j", "list", "table", "ip", self.table])
        except ProxyError:
            return None
        return nftables.chains_in_json(text)

    async def apply(self, ports: Sequence[ServicePort]) -> None:
        text = nftables.render(self.table, ports, existing=await self._existing())
        await run_tool([*self.wrap, self.nft, "-f", "-"], text)

    async def cleanup(self) -> None:
        await run_tool([*self.wrap, self.nft, "-f", "-"], nftables.render_delete(self.table))


class IptablesBackend:
    def __init__(self, table: str, iptables_cmd: str = "iptables", *, wrap: Sequence[str] = ()) -> None:
        self.prefix = iptables.prefix_for(table)
        self.iptables = iptables_cmd
        self.wrap = list(wrap)
        self.name = f"iptables chains {self.prefix}*"

    async def _existing(self) -> dict[str, list[str]]:
        return {t: iptables.chains_in_save(await run_tool([*self.wrap, f"{self.iptables}-save", "-t", t]))
                for t in ("nat", "filter")}

    async def apply(self, ports: Sequence[ServicePort]) -> None:
        text = iptables.render(self.prefix, ports, existing=await self._existing())
        await run_tool([*self.wrap, f"{self.iptables}-restore", "-w", "--noflush"], text)
        for table, chain, spec in iptables.jumps(self.prefix):
            try:
                await run_tool([*self.wrap, self.iptables, "-w", "-t", table, "-C", chain, *spec])
            except ProxyError:
                await run_tool([*self.wrap, self.iptables, "-w", "-t", table, "-I", chain, "1", *spec])

    async def cleanup(self) -> None:
        for table, chain, spec in iptables.jumps(self.prefix):
            for _ in range(10):  # every copy, should one have been inserted twice
                try:
                    await run_tool([*self.wrap, self.iptables, "-w", "-t", table, "-D", chain, *spec])
                except ProxyError:
                    break
        await run_tool([*self.wrap, f"{self.iptables}-restore", "-w", "--noflush"],
                       iptables.render_cleanup(self.prefix, await self._existing()))


def pick_backend(table: str) -> Backend | None:
    """nftables as upstream's current mode; iptables only when ``nft`` is missing."""
    nft = shutil.which("nft")
    if nft:
        return NftBackend(table, nft)
    if shutil.which("iptables") and shutil.which("iptables-restore") and shutil.which("iptables-save"):
        return IptablesBackend(table)
    return None


def _key(obj: Obj) -> str:
    meta = obj.get("metadata") or {}
    return f"{meta.get('namespace', '')}/{meta.get('name', '')}"


class Proxier:
    def __init__(self, client: Callable[[], APIClient | None], backend: Backend, *, node_name: str,
                 healthz_port: int | None = DEFAULT_HEALTHZ_PORT, healthz_host: str = "127.0.0.1",
                 min_sync_interval: float = 0.1, sync_period: float = 30.0, retry_interval: float = 2.0,
                 stale_after: float | None = None, watch_timeout_s: int = 300) -> None:
        self._client = client
        self.backend = backend
        self.node_name = node_name
        self.healthz_port = healthz_port
        self.healthz_host = healthz_host
        self.min_sync_interval = min_sync_interval
        self.sync_period = sync_period
        self.retry_interval = retry_interval
        self.watch_timeout_s = watch_timeout_s
        self.health = Health(stale_after=stale_after if stale_after is not None else 2 * sync_period)
        self.services: dict[str, Obj] = {}
        self.slices: dict[str, Obj] = {}
        self.listed: set[str] = set()
        self.applied: list[ServicePort] | None = None
        self.syncs = 0  # successful applies, for tests and logs
        self._problems: list[str] = []
        self._dirty = asyncio.Event()
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._runner: web.AppRunner | None = None

    # --- lifecycle ---------------------------------------------------------------------------------------

    async def start(self) -> None:
        if self.healthz_port is not None:
            await self._serve_health()
        self._tasks = [
            asyncio.create_task(self._reflect("services", SERVICES_PATH, self.services)),
            asyncio.create_task(self._reflect("endpointslices", SLICES_PATH, self.slices)),
            asyncio.create_task(self._sync_loop()),
        ]
        log.info("kube-proxy for node %s: %s, health on %s:%s", self.node_name, self.backend.name,
                 self.healthz_host, self.healthz_port)

    async def stop(self) -> None:
        self._stop.set()
        await cancel_and_wait(self._tasks)
        if self._runner is not None:
            await self._runner.cleanup()
        try:
            await self.backend.cleanup()
            log.info("kube-proxy for node %s: removed %s", self.node_name, self.backend.name)
        except (ProxyError, OSError) as exc:
            log.warning("kube-proxy for node %s: could not remove %s: %s", self.node_name, self.backend.name, exc)

    # --- health ------------------------------------------------------------------------------------------

    async def _serve_health(self) -> None:
        async def handle(_: web.Request) -> web.Response:
            code, body = self.health.response(time.monotonic(), time.time())
            return web.Response(status=code, body=body, content_type="application/json")

        app = web.Application(client_max_size=1024)
        app.router.add_get("/healthz", handle)
        app.router.add_get("/livez", handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.healthz_host, self.healthz_port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            log.error("kube-proxy for node %s: health endpoint %s:%s not available: %s", self.node_name,
                      self.healthz_host, self.healthz_port, exc)

    # --- watching ----------------------------------------------------------------------------------------

    def _changed(self) -> None:
        self.health.queued(time.monotonic())
        self._dirty.set()

    async def _reflect(self, kind: str, path: str, store: dict[str, Obj]) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            client = self._client()
            try:
                if client is None:
                    raise StatusError(503, "no API client yet")
                lst = await client.get(path)
                store.clear()
                for item in lst.get("items") or []:
                    store[_key(item)] = item
                rv = str((lst.get("metadata") or {}).get("resourceVersion") or "0")
                self.listed.add(kind)
                self._changed()
                backoff = 0.5
                while not self._stop.is_set() and self._client() is client:
                    began = time.monotonic()
                    async for ev in client.watch(path, resource_version=rv, timeout_s=self.watch_timeout_s):
                        typ, obj = ev.get("type"), ev.get("object") or {}
                        if typ == "ERROR":
                            raise StatusError(int(obj.get("code") or 500), str(obj.get("message") or "watch error"))
                        rv = str((obj.get("metadata") or {}).get("resourceVersion") or rv)
                        if typ in ("ADDED", "MODIFIED"):
                            store[_key(obj)] = obj
                            self._changed()
                        elif typ == "DELETED":
                            store.pop(_key(obj), None)
                            self._changed()
                    if time.monotonic() - began < 1.0:  # a watch that ends at once must not spin
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._stop.wait(), 1.0)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a broken stream or object must not end the watch for good
                if not self._stop.is_set():
                    log.warning("kube-proxy for node %s: %s list/watch: %s: %s; retrying", self.node_name, kind,
                                type(exc).__name__, exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), backoff)
                backoff = min(backoff * 2, 10.0)

    # --- syncing -----------------------------------------------------------------------------------------

    def desired(self) -> list[ServicePort]:
        ports, problems = from_api(list(self.services.values()), list(self.slices.values()))
        if problems != self._problems:
            for p in problems:
                if p not in self._problems:
                    log.warning("kube-proxy for node %s: skipped: %s", self.node_name, p)
            self._problems = problems
        return ports

    async def sync_once(self, *, force: bool) -> bool:
        """Apply the desired rules (unless they are in place and ``force`` is false). True when they are."""
        started = time.monotonic()
        try:
            ports = self.desired()
        except Exception as exc:  # from_api skips what it cannot use; this is a bug, not bad input
            log.exception("kube-proxy for node %s: could not compute rules", self.node_name)
            self.health.failed(f"could not compute rules: {exc}")
            return False
        if not force and ports == self.applied:
            self.health.synced(time.monotonic(), time.time(), queued_before=started)
            return True
        try:
            await self.backend.apply(ports)
        except (ProxyError, OSError, ValueError) as exc:
            self.health.failed(str(exc))
            log.error("kube-proxy for node %s: sync failed: %s", self.node_name, exc)
            return False
        before, self.applied = self.applied, ports
        self.syncs += 1
        flows = conntrack.stale_udp_flows(before, ports)
        if flows:
            try:
                n = await asyncio.to_thread(conntrack.clear, flows)
                log.debug("kube-proxy for node %s: %d stale UDP conntrack entries deleted", self.node_name, n)
            except Exception as exc:  # stale UDP flows are a nuisance, not a reason to fail the sync
                log.warning("kube-proxy for node %s: could not clear stale UDP conntrack entries: %s",
                            self.node_name, exc)
        self.health.synced(time.monotonic(), time.time(), queued_before=started)
        log.debug("kube-proxy for node %s: %d service ports programmed", self.node_name, len(ports))
        return True

    async def _sync_loop(self) -> None:
        last_attempt = -1e9
        due = time.monotonic() + self.sync_period
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._dirty.wait(), max(0.0, due - time.monotonic()))
            pause = last_attempt + self.min_sync_interval - time.monotonic()
            if pause > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), pause)
            if self._stop.is_set():
                return
            self._dirty.clear()
            if self.listed != {"services", "endpointslices"}:
                due = time.monotonic() + self.retry_interval
                continue
            periodic = time.monotonic() >= due
            last_attempt = time.monotonic()
            ok = await self.sync_once(force=periodic or self.health.last_error is not None)
            if not ok:
                due = time.monotonic() + self.retry_interval
            elif periodic:
                due = time.monotonic() + self.sync_period


async def start_for_agent(agent: Any) -> Proxier | None:
    """Start kube-proxy in a node agent when it can program rules (root, and nft or iptables); otherwise say
    clearly that Service ClusterIPs do not work on this node."""
    from cryptography import x509

    from kplane import pki

    name = agent.cfg.name
    if os.geteuid() != 0:
        log.warning("node %s: not running as root: kube-proxy is off and Service ClusterIPs (VIPs) are not "
                    "reachable from this node", name)
        return None
    cluster_id = pki.ca_cert_hash(x509.load_pem_x509_certificate(agent.ca_path.read_bytes()))
    table = table_name(name, cluster_id)
    backend = pick_backend(table)
    if backend is None:
        log.warning("node %s: neither nft nor iptables-restore found: kube-proxy is off and Service ClusterIPs "
                    "(VIPs) are not reachable from this node", name)
        return None
    proxier = Proxier(lambda: agent.client, backend, node_name=name,
                      healthz_port=getattr(agent.cfg, "proxy_healthz_port", DEFAULT_HEALTHZ_PORT))
    await proxier.start()
    return proxier
