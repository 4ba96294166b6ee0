"""kplane.client.informer against a real apiserver: a deletion that happens while no watch is open (the
connection broke) is still reported, as "DELETED" after the re-list."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from kplane.client import APIClient, informer
from tests.cluster import Cluster


class FlakyWatch(APIClient):
    """A real client whose watch connections can be cut from the test (what a restarted apiserver looks like)."""

    cut = False

    async def watch(self, path: str, *, resource_version: str, timeout_s: int = 300) -> AsyncIterator[Any]:
        async for ev in super().watch(path, resource_version=resource_version, timeout_s=timeout_s):
            if self.cut:
                raise OSError("connection reset (test)")
            yield ev


async def test_deletion_while_the_watch_is_down_is_reported(cluster: Cluster, ns: str) -> None:
    admin = APIClient(cluster.url, ca_file=cluster.pki / "ca.crt", cert_file=cluster.pki / "admin.crt",
                      key_file=cluster.pki / "admin.key")
    flaky = FlakyWatch(cluster.url, ca_file=cluster.pki / "ca.crt", cert_file=cluster.pki / "admin.crt",
                       key_file=cluster.pki / "admin.key")
    base = f"/api/v1/namespaces/{ns}/configmaps"
    for name in ("keep", "drop"):
        await admin.create(base, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}})
    stop = asyncio.Event()
    seen: list[tuple[str, str]] = []

    async def run() -> None:
        async for ev, obj in informer(flaky, base, stop):
            seen.append((ev, obj["metadata"]["name"]))

    task = asyncio.create_task(run())
    try:
        async def until(pred: Any) -> None:
            for _ in range(200):
                if pred():
                    return
                await asyncio.sleep(0.05)
            raise AssertionError(seen)

        await until(lambda: {("SYNC", "keep"), ("SYNC", "drop")} <= set(seen))
        flaky.cut = True  # the next watch event breaks the watch
        await admin.delete(f"{base}/drop")  # ...and this deletion is the event it loses
        await asyncio.sleep(0.3)
        flaky.cut = False
        await until(lambda: ("DELETED", "drop") in seen)
        assert ("DELETED", "keep") not in seen
    finally:
        stop.set()
        task.cancel()
        await admin.close()
        await flaky.close()
