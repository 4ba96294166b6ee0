"""Run the storage conformance suite against :class:`SQLiteStore`, plus SQLite-specific tests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from kplane.errors import StatusError
from kplane.storage import sqlite as sqlite_mod
from kplane.storage.base import Compacted
from kplane.storage.sqlite import SQLiteStore
from tests.storage_suite import P, StoreSuite, next_event, pod, rv_of, wait_watchers


class TestSQLiteStore(StoreSuite):
    @pytest.fixture
    async def store(self, tmp_path: Path) -> AsyncIterator[SQLiteStore]:
        s = await SQLiteStore.open(str(tmp_path / "kv.db"))
        yield s
        await s.close()


async def test_reopen_persistence(tmp_path: Path) -> None:
    path = str(tmp_path / "kv.db")
    s = await SQLiteStore.open(path)
    await s.create("/registry/x/first", {"metadata": {}})  # rv 0 would mean "from now"
    a = await s.create(P + "default/p1", pod("p1"))
    b = await s.update(P + "default/p1", dict(a, spec={"n": 7}))
    await s.create(P + "default/p2", pod("p2"))
    await s.delete(P + "default/p2")
    rev = await s.current_revision()
    await s.close()

    s = await SQLiteStore.open(path)
    try:
        assert await s.current_revision() == rev
        assert await s.get(P + "default/p1") == b
        items, lrev, _ = await s.list(P)
        assert items == [b] and lrev == rev
        c = await s.create(P + "default/p3", pod("p3"))
        assert rv_of(c) == rev + 1
        # history survives too
        it = s.watch(P, rv_of(a) - 1)
        assert [(await next_event(it)).type for _ in range(5)] == [
            "ADDED",
            "MODIFIED",
            "ADDED",
            "DELETED",
            "ADDED",
        ]
        await it.aclose()
    finally:
        await s.close()


async def test_memory_store() -> None:
    s = await SQLiteStore.open(":memory:")
    await s.create(P + "a/b", pod("b"))
    assert (await s.list(P))[1] == 1
    await s.close()


async def test_auto_compaction(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlite_mod, "COMPACT_EVERY", 10)
    s = await SQLiteStore.open(str(tmp_path / "kv.db"), history=5)
    try:
        for i in range(30):
            await s.create(P + f"d/p{i}", pod(f"p{i}"))
        n = s._db.execute("SELECT count(*) FROM history").fetchone()[0]
        assert n == 5
        with pytest.raises(Compacted):
            await next_event(s.watch(P, 1))
        it = s.watch(P, 25)
        assert [(await next_event(it)).rv for _ in range(5)] == [26, 27, 28, 29, 30]
        await it.aclose()
    finally:
        await s.close()


async def test_slow_watcher_is_terminated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlite_mod, "MAX_WATCH_QUEUE", 5)
    s = await SQLiteStore.open(str(tmp_path / "kv.db"))
    try:
        it = s.watch(P, 0)
        fut = asyncio.ensure_future(anext(it))
        await wait_watchers(s, 1)
        for i in range(20):
            await s.create(P + f"d/p{i}", pod(f"p{i}"))
        assert s.watcher_count() == 0  # dropped without waiting for the consumer
        assert (await asyncio.wait_for(fut, 2)).rv == 1
        got = []
        with pytest.raises(Compacted):
            while True:
                got.append((await next_event(it)).rv)
        assert got == [2, 3, 4, 5]  # 1..5 filled the queue, 6 overflowed it
    finally:
        await s.close()


async def test_bad_continue_token(tmp_path: Path) -> None:
    s = await SQLiteStore.open(str(tmp_path / "kv.db"))
    try:
        with pytest.raises(StatusError) as ei:
            await s.list(P, continue_key="not-a-token!!")
        assert ei.value.code == 400
    finally:
        await s.close()


async def test_close_ends_watches(tmp_path: Path) -> None:
    s = await SQLiteStore.open(str(tmp_path / "kv.db"))
    it = s.watch(P, 0)
    fut = asyncio.ensure_future(anext(it))
    await wait_watchers(s, 1)
    await s.close()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(fut, 2)
