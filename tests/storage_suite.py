"""Backend-independent conformance tests for :class:`kplane.storage.base.Store`.

A backend test module subclasses :class:`StoreSuite` (as ``TestXxx``) and provides an async fixture
``store`` yielding a fresh, empty store (closed afterwards). The suite relies only on the ``Store`` API plus
``watcher_count()`` to know when a live watch is subscribed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import pytest

from kplane.storage.base import Change, Compacted, Event, KeyExists, KeyNotFound, RVConflict, Store

P = "/registry/pods/"


def pod(name: str, ns: str = "default", **labels: str) -> dict[str, Any]:
    return {"kind": "Pod", "metadata": {"name": name, "namespace": ns, "labels": labels}, "spec": {"n": 1}}


def rv_of(obj: dict[str, Any]) -> int:
    return int(obj["metadata"]["resourceVersion"])


async def next_event(it: AsyncIterator[Event], within: float = 2.0) -> Event:
    return await asyncio.wait_for(anext(it), within)


async def _anext(it: AsyncIterator[Event]) -> Event:
    return await anext(it)


async def wait_watchers(store: Store, n: int, within: float = 2.0) -> None:
    """Wait until exactly ``n`` watch subscriptions are active."""
    async with asyncio.timeout(within):
        while store.watcher_count() != n:  # noqa: ASYNC110
            await asyncio.sleep(0.001)


async def collect(it: AsyncGenerator[Event, None], n: int) -> list[Event]:
    out: list[Event] = []
    async with contextlib.aclosing(it):
        async for ev in it:
            out.append(ev)
            if len(out) == n:
                break
    return out


class Pusher:
    """A watch's ``push`` callback that records what it is offered and takes it while ``accept`` is true, unless
    its revision is in ``decline`` (or raises ``raise_`` instead)."""

    def __init__(self) -> None:
        self.accept = True
        self.decline: set[int] = set()
        self.raise_: Exception | None = None
        self.offered: list[Change] = []

    def __call__(self, ch: Change) -> bool:
        self.offered.append(ch)
        if self.raise_ is not None:
            raise self.raise_
        return self.accept and ch.rv not in self.decline

    def rvs(self) -> list[int]:
        return [c.rv for c in self.offered]


async def pushed_watch(store: Store, from_rv: int = 0, *, subscribed: int = 1,
                       ) -> tuple[Pusher, AsyncGenerator[Event, None], asyncio.Future[Event]]:
    """A watch of ``P`` with a :class:`Pusher`, its first ``anext`` pending (it completes only for an event that is
    yielded, not pushed), returned once ``subscribed`` watches are live."""
    push = Pusher()
    it = store.watch(P, from_rv, push)
    fut = asyncio.ensure_future(_anext(it))
    await wait_watchers(store, subscribed)
    return push, it, fut


class StoreSuite:
    """Subclass as ``TestSomething`` and provide an async ``store`` fixture."""

    # -- CRUD ---------------------------------------------------------------------------------------

    async def test_create_get(self, store: Store) -> None:
        src = pod("p1")
        out = await store.create(P + "default/p1", src)
        assert "resourceVersion" not in src["metadata"], "input must not be mutated"
        assert isinstance(out["metadata"]["resourceVersion"], str)
        got = await store.get(P + "default/p1")
        assert got == out
        assert rv_of(got) == await store.current_revision()
        with pytest.raises(KeyNotFound):
            await store.get(P + "default/nope")

    async def test_create_duplicate(self, store: Store) -> None:
        await store.create(P + "default/p1", pod("p1"))
        rev = await store.current_revision()
        with pytest.raises(KeyExists):
            await store.create(P + "default/p1", pod("p1"))
        assert await store.current_revision() == rev

    async def test_update_conditional(self, store: Store) -> None:
        a = await store.create(P + "default/p1", pod("p1"))
        b = dict(a, spec={"n": 2})
        b2 = await store.update(P + "default/p1", b, expected_rv=rv_of(a))
        assert rv_of(b2) > rv_of(a)
        assert (await store.get(P + "default/p1"))["spec"] == {"n": 2}
        with pytest.raises(RVConflict):
            await store.update(P + "default/p1", dict(a, spec={"n": 3}), expected_rv=rv_of(a))
        assert (await store.get(P + "default/p1"))["spec"] == {"n": 2}
        with pytest.raises(KeyNotFound):
            await store.update(P + "default/nope", pod("nope"), expected_rv=1)

    async def test_update_unconditional(self, store: Store) -> None:
        a = await store.create(P + "default/p1", pod("p1"))
        await store.update(P + "default/p1", dict(a, spec={"n": 2}))
        c = await store.update(P + "default/p1", dict(a, spec={"n": 3}))  # stale body, no precondition
        assert (await store.get(P + "default/p1")) == c
        assert c["spec"] == {"n": 3}
        with pytest.raises(KeyNotFound):
            await store.update(P + "default/nope", pod("nope"))

    async def test_delete(self, store: Store) -> None:
        a = await store.create(P + "default/p1", pod("p1"))
        d = await store.delete(P + "default/p1")
        assert d["spec"] == a["spec"]
        assert rv_of(d) == await store.current_revision() > rv_of(a)
        with pytest.raises(KeyNotFound):
            await store.get(P + "default/p1")
        with pytest.raises(KeyNotFound):
            await store.delete(P + "default/p1")
        # the key can be re-created after deletion
        await store.create(P + "default/p1", pod("p1"))

    async def test_delete_stale_rv(self, store: Store) -> None:
        a = await store.create(P + "default/p1", pod("p1"))
        b = await store.update(P + "default/p1", dict(a, spec={"n": 2}))
        with pytest.raises(RVConflict):
            await store.delete(P + "default/p1", expected_rv=rv_of(a))
        await store.get(P + "default/p1")
        await store.delete(P + "default/p1", expected_rv=rv_of(b))
        with pytest.raises(KeyNotFound):
            await store.get(P + "default/p1")

    async def test_revision_monotonic(self, store: Store) -> None:
        start = await store.current_revision()
        seen = [start]
        a = await store.create(P + "default/p1", pod("p1"))
        seen.append(rv_of(a))
        b = await store.update(P + "default/p1", a)
        seen.append(rv_of(b))
        await store.create(P + "default/p2", pod("p2"))
        seen.append(await store.current_revision())
        c = await store.delete(P + "default/p1")
        seen.append(rv_of(c))
        assert seen == sorted(set(seen)), seen
        assert seen[-1] == await store.current_revision()
        # failed writes do not bump the revision
        with pytest.raises(KeyExists):
            await store.create(P + "default/p2", pod("p2"))
        assert seen[-1] == await store.current_revision()

    # -- list ---------------------------------------------------------------------------------------

    async def test_list_order_and_prefix(self, store: Store) -> None:
        for key in ["ab/z", "a/y", "a/b", "ab/a", "a/a/x", "b/c"]:
            await store.create(P + key, {"metadata": {"name": key}})
        await store.create("/registry/podsx/a/b", {"metadata": {"name": "other"}})
        items, rev, cont = await store.list(P + "a/")
        assert [i["metadata"]["name"] for i in items] == ["a/a/x", "a/b", "a/y"]
        assert rev == await store.current_revision() and cont is None
        items, _, _ = await store.list(P + "ab/")
        assert [i["metadata"]["name"] for i in items] == ["ab/a", "ab/z"]
        items, _, _ = await store.list(P)
        assert [i["metadata"]["name"] for i in items] == ["a/a/x", "a/b", "a/y", "ab/a", "ab/z", "b/c"]
        items, _, _ = await store.list(P + "zzz/")
        assert items == []

    async def test_list_paging(self, store: Store) -> None:
        names = [f"p{i:02d}" for i in range(25)]
        for n in reversed(names):
            await store.create(P + "default/" + n, pod(n))
        first_rev = await store.current_revision()
        seen: list[str] = []
        token: str | None = None
        pages = 0
        while True:
            items, rev, token = await store.list(P, limit=7, continue_key=token)
            pages += 1
            assert rev == first_rev
            assert len(items) <= 7
            seen.extend(i["metadata"]["name"] for i in items)
            if token is None:
                break
            assert isinstance(token, str)
            # a write between pages must not break paging
            await store.create("/registry/other/x" + str(pages), {"metadata": {}})
        assert seen == names
        assert pages == 4

    async def test_list_predicate_with_limit(self, store: Store) -> None:
        for i in range(20):
            await store.create(
                P + f"default/p{i:02d}", pod(f"p{i:02d}", parity="even" if i % 2 == 0 else "odd")
            )

        def even(o: dict[str, Any]) -> bool:
            return bool(o["metadata"]["labels"].get("parity") == "even")

        seen: list[str] = []
        sizes: list[int] = []
        token: str | None = None
        while True:
            items, _, token = await store.list(P, limit=3, continue_key=token, predicate=even)
            sizes.append(len(items))
            seen.extend(i["metadata"]["name"] for i in items)
            if token is None:
                break
        assert seen == [f"p{i:02d}" for i in range(0, 20, 2)]
        assert sizes == [3, 3, 3, 1]
        items, _, token = await store.list(P, predicate=even)
        assert len(items) == 10 and token is None
        items, _, token = await store.list(P, limit=10, predicate=even)
        assert len(items) == 10 and token is None

    # -- watch --------------------------------------------------------------------------------------

    async def test_watch_from_now(self, store: Store) -> None:
        await store.create(P + "default/old", pod("old"))
        it = store.watch(P, 0)
        fut = asyncio.ensure_future(_anext(it))
        await wait_watchers(store, 1)
        a = await store.create(P + "default/p1", pod("p1"))
        await store.create("/registry/services/default/s1", {"metadata": {}})  # other prefix
        b = await store.update(P + "default/p1", dict(a, spec={"n": 2}))
        ev = await asyncio.wait_for(fut, 2)
        assert (ev.type, ev.key, ev.rv) == ("ADDED", P + "default/p1", rv_of(a))
        assert ev.obj == a
        ev = await next_event(it)
        assert (ev.type, ev.rv) == ("MODIFIED", rv_of(b))
        assert ev.obj["metadata"]["resourceVersion"] == str(ev.rv)
        await it.aclose()
        assert store.watcher_count() == 0

    async def test_watch_replays_history_then_live(self, store: Store) -> None:
        await store.create("/registry/x/first", {"metadata": {}})  # rv 0 would mean "from now"
        a = await store.create(P + "default/p1", pod("p1"))
        await store.create("/registry/services/default/s1", {"metadata": {}})
        b = await store.update(P + "default/p1", dict(a, spec={"n": 2}))
        c = await store.create(P + "default/p2", pod("p2"))
        it = store.watch(P, rv_of(a) - 1)
        evs = [await next_event(it) for _ in range(3)]
        assert [(e.type, e.rv) for e in evs] == [
            ("ADDED", rv_of(a)),
            ("MODIFIED", rv_of(b)),
            ("ADDED", rv_of(c)),
        ]
        assert evs[1].obj == b
        d = await store.delete(P + "default/p2")
        ev = await next_event(it)
        assert (ev.type, ev.key, ev.rv) == ("DELETED", P + "default/p2", rv_of(d))
        await it.aclose()

        # from an rv in the middle: only strictly newer events
        it = store.watch(P, rv_of(b))
        assert (await next_event(it)).rv == rv_of(c)
        assert (await next_event(it)).rv == rv_of(d)
        await it.aclose()

    async def test_watch_from_current_rv_sees_only_new(self, store: Store) -> None:
        await store.create(P + "default/p1", pod("p1"))
        _, rev, _ = await store.list(P)
        it = store.watch(P, rev)
        fut = asyncio.ensure_future(_anext(it))
        await wait_watchers(store, 1)
        b = await store.create(P + "default/p2", pod("p2"))
        ev = await asyncio.wait_for(fut, 2)
        assert ev.rv == rv_of(b) == rev + 1
        await it.aclose()

    async def test_watch_after_compact(self, store: Store) -> None:
        for i in range(10):
            await store.create(P + f"default/p{i}", pod(f"p{i}"))
        rev = await store.current_revision()
        await store.compact(2)
        it = store.watch(P, 1)
        with pytest.raises(Compacted):
            await next_event(it)
        # exactly at the edge of retained history still works
        it = store.watch(P, rev - 2)
        evs = [await next_event(it) for _ in range(2)]
        assert [e.rv for e in evs] == [rev - 1, rev]
        await it.aclose()
        # from "now" is never compacted
        it = store.watch(P, 0)
        fut = asyncio.ensure_future(_anext(it))
        await wait_watchers(store, 1)
        await store.create(P + "default/new", pod("new"))
        assert (await asyncio.wait_for(fut, 2)).rv == rev + 1
        await it.aclose()

    async def test_deleted_event_carries_last_object(self, store: Store) -> None:
        a = await store.create(P + "default/p1", pod("p1"))
        b = await store.update(P + "default/p1", dict(a, spec={"n": 42}))
        it = store.watch(P, rv_of(b))
        fut = asyncio.ensure_future(_anext(it))
        await wait_watchers(store, 1)
        d = await store.delete(P + "default/p1")
        ev = await asyncio.wait_for(fut, 2)
        assert ev.type == "DELETED"
        assert ev.obj["spec"] == {"n": 42}
        assert ev.obj["metadata"]["name"] == "p1"
        assert ev.obj["metadata"]["resourceVersion"] == str(ev.rv) == d["metadata"]["resourceVersion"]
        await it.aclose()

    async def test_concurrent_watchers(self, store: Store) -> None:
        n_watchers, n_events = 50, 12
        tasks = [asyncio.create_task(collect(store.watch(P, 0), n_events)) for _ in range(n_watchers)]
        await wait_watchers(store, n_watchers)
        for i in range(n_events // 2):
            o = await store.create(P + f"default/p{i}", pod(f"p{i}"))
            await store.update(P + f"default/p{i}", dict(o, spec={"n": i}))
            await asyncio.sleep(0)
        results = await asyncio.wait_for(asyncio.gather(*tasks), 5)
        expected = [(e.type, e.key, e.rv, e.obj) for e in results[0]]
        assert len(expected) == n_events
        assert [r for _, _, r, _ in expected] == sorted(r for _, _, r, _ in expected)
        for res in results[1:]:
            assert [(e.type, e.key, e.rv, e.obj) for e in res] == expected
        # each watcher got its own copy of the objects
        results[0][0].obj["mutated"] = True
        assert "mutated" not in results[1][0].obj
        await wait_watchers(store, 0)

    async def test_cancel_watch_task_unsubscribes(self, store: Store) -> None:
        received: list[Event] = []

        async def consume() -> None:
            async for ev in store.watch(P, 0):
                received.append(ev)

        task = asyncio.create_task(consume())
        await wait_watchers(store, 1)
        await store.create(P + "default/p1", pod("p1"))
        async with asyncio.timeout(2):
            while not received:  # noqa: ASYNC110
                await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert store.watcher_count() == 0
        # writes after unsubscribing still work
        await store.create(P + "default/p2", pod("p2"))

    # -- watch with push ----------------------------------------------------------------------------

    async def test_push_takes_live_events_after_the_writing_call(self, store: Store) -> None:
        push, _, fut = await pushed_watch(store)
        a = await store.create(P + "default/p1", pod("p1"))
        assert push.offered == [], "pushed inside the writing call"
        await asyncio.sleep(0)
        assert push.rvs() == [rv_of(a)]
        ch = push.offered[0]
        assert (ch.type, ch.key, ch.obj) == ("ADDED", P + "default/p1", a)
        await store.create("/registry/services/default/s1", {"metadata": {}})  # another prefix: not offered
        b = await store.delete(P + "default/p1")
        await asyncio.sleep(0)
        assert push.rvs() == [rv_of(a), rv_of(b)] and push.offered[1].type == "DELETED"
        assert not fut.done(), "a pushed event is not yielded as well"
        fut.cancel()
        await wait_watchers(store, 0)

    async def test_declined_push_queues_and_later_events_wait_behind_it(self, store: Store) -> None:
        push, it, fut = await pushed_watch(store)
        push.accept = False
        a = await store.create(P + "default/p1", pod("p1"))
        await asyncio.sleep(0)  # offered and declined
        push.accept = True
        b = await store.create(P + "default/p2", pod("p2"))  # a is queued: b must not overtake it
        c = await store.create(P + "default/p3", pod("p3"))
        assert [e.rv for e in [await asyncio.wait_for(fut, 2), await next_event(it), await next_event(it)]] == \
            [rv_of(a), rv_of(b), rv_of(c)]
        assert push.rvs() == [rv_of(a)]
        fut = asyncio.ensure_future(_anext(it))  # caught up: the next one is pushed again
        d = await store.create(P + "default/p4", pod("p4"))
        await asyncio.sleep(0)
        assert push.rvs() == [rv_of(a), rv_of(d)] and not fut.done()
        fut.cancel()
        await wait_watchers(store, 0)

    async def test_writes_offered_in_one_turn_keep_their_order_when_the_first_is_declined(self, store: Store) -> None:
        push, it, fut = await pushed_watch(store)
        first = await store.current_revision() + 1
        push.decline = {first}
        assert rv_of(await store.create(P + "default/p1", pod("p1"))) == first
        second = rv_of(await store.create(P + "default/p2", pod("p2")))  # both wait to be offered
        assert [(await asyncio.wait_for(fut, 2)).rv, (await next_event(it)).rv] == [first, second]
        assert push.rvs() == [first]
        await it.aclose()

    async def test_push_that_raises_counts_as_declined(self, store: Store) -> None:
        push, it, fut = await pushed_watch(store)
        push.raise_ = RuntimeError("boom")
        a = await store.create(P + "default/p1", pod("p1"))
        ev = await asyncio.wait_for(fut, 2)
        assert ev.rv == rv_of(a) and ev.obj == a and push.rvs() == [rv_of(a)]
        await it.aclose()

    async def test_push_waits_until_history_is_replayed(self, store: Store) -> None:
        await store.create("/registry/x/first", {"metadata": {}})  # rv 0 would mean "from now"
        a = await store.create(P + "default/p1", pod("p1"))
        b = await store.create(P + "default/p2", pod("p2"))
        push = Pusher()
        it = store.watch(P, rv_of(a) - 1, push)
        assert (await next_event(it)).rv == rv_of(a)  # history; b still to come
        c = await store.create(P + "default/p3", pod("p3"))
        await asyncio.sleep(0)
        assert push.offered == [], "a live event overtook the history"
        assert [(await next_event(it)).rv, (await next_event(it)).rv] == [rv_of(b), rv_of(c)]
        fut = asyncio.ensure_future(_anext(it))
        d = await store.create(P + "default/p4", pod("p4"))
        await asyncio.sleep(0)
        assert push.rvs() == [rv_of(d)] and not fut.done()
        fut.cancel()
        await wait_watchers(store, 0)

    async def test_push_skips_events_up_to_a_future_from_rv(self, store: Store) -> None:
        rev = await store.current_revision()
        push, _, fut = await pushed_watch(store, rev + 2)
        for i in range(3):
            await store.create(P + f"default/p{i}", pod(f"p{i}"))
        await asyncio.sleep(0)
        assert push.rvs() == [rev + 3] and not fut.done()
        fut.cancel()
        await wait_watchers(store, 0)

    async def test_one_decoded_object_is_shared_by_pushed_watches(self, store: Store) -> None:
        p0, _, f0 = await pushed_watch(store)
        p1, _, f1 = await pushed_watch(store, subscribed=2)
        a = await store.create(P + "default/p1", pod("p1"))
        await asyncio.sleep(0)
        (c0,), (c1,) = p0.offered, p1.offered
        assert c0.obj == a and c0.obj is c1.obj
        f0.cancel()
        f1.cancel()
        await wait_watchers(store, 0)

    async def test_no_push_after_the_watch_ends(self, store: Store) -> None:
        push, _, fut = await pushed_watch(store)
        fut.cancel()  # the watch ends at the loop's next turn, before the write below is offered to it
        await store.create(P + "default/p1", pod("p1"))
        with contextlib.suppress(asyncio.CancelledError):
            await fut
        await asyncio.sleep(0)
        assert push.offered == [] and store.watcher_count() == 0

    async def test_break_out_of_watch_unsubscribes(self, store: Store) -> None:
        await store.create("/registry/x/first", {"metadata": {}})  # rv 0 would mean "from now"
        a = await store.create(P + "default/p1", pod("p1"))
        await store.create(P + "default/p2", pod("p2"))
        async with contextlib.aclosing(store.watch(P, rv_of(a) - 1)) as it:
            async for ev in it:
                assert ev.rv == rv_of(a)
                assert store.watcher_count() == 1
                break
        assert store.watcher_count() == 0
