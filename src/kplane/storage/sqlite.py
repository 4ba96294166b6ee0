"""SQLite-backed :class:`~kplane.storage.base.Store` (single process).

Schema::

    kv(key TEXT PRIMARY KEY, rv INTEGER NOT NULL, value BLOB NOT NULL)   -- current objects (orjson)
    history(rv INTEGER PRIMARY KEY, key TEXT, type TEXT, value BLOB)     -- one row per write
    meta(k TEXT PRIMARY KEY, v INTEGER)                                  -- 'rev', 'compacted'

One connection in WAL mode with ``synchronous=NORMAL``. Every operation is a small indexed statement run
synchronously on the event-loop thread, so each write (revision bump + kv row + history row, in one
transaction) is atomic with respect to other coroutines without any locking. After commit the event is
fanned out to in-process watchers, each owning an unbounded queue (a deque) of encoded events; a
watcher that lets more than ``MAX_WATCH_QUEUE`` events pile up is terminated with :class:`Compacted`
(the client must relist) rather than growing memory. Each watcher decodes its own copy of the object, except
for events taken by a watch's ``push`` callback: one scheduled call per write offers the write to every such
watch with nothing queued, decoded once and shared.

``meta.compacted`` is the highest revision removed from history; watching from ``rv < compacted`` raises
:class:`Compacted`. History is trimmed to ``history`` rows automatically every ``COMPACT_EVERY`` writes.

WAL checkpoints (copying the log back into the database file, then an fsync) mostly run off the event loop:
SQLite's automatic checkpoint, every 1,000 pages by default, stalled whichever write crossed the threshold for as
long as the disk took (~15 ms here, one write in ~300). A daemon thread with its own connection runs a PASSIVE
checkpoint every ``CHECKPOINT_EVERY`` writes (PASSIVE never blocks the writer). Under a steady stream of writes
that checkpoint never quite catches up, so the log could not start over; the writer's own checkpoint, raised to
``WAL_AUTOCHECKPOINT`` pages, finishes the job (the log is then reused from the start) and finds almost
everything already copied. SQLite checkpoints what is left when the store closes.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
from collections import deque
from collections.abc import AsyncGenerator, Iterator
from typing import Any

import orjson

from .base import (
    Change,
    Compacted,
    Event,
    KeyExists,
    KeyNotFound,
    Predicate,
    Push,
    RVConflict,
    Store,
    decode_continue,
    encode_continue,
    prefix_end,
)

__all__ = ["CHECKPOINT_EVERY", "COMPACT_EVERY", "MAX_WATCH_QUEUE", "SQLiteStore"]

log = logging.getLogger(__name__)

MAX_WATCH_QUEUE = 10000
COMPACT_EVERY = 1000
CHECKPOINT_EVERY = 200
WAL_AUTOCHECKPOINT = 10000  # pages: the writer's own (blocking) checkpoint, when the background one lags

_SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, rv INTEGER NOT NULL, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS history (rv INTEGER PRIMARY KEY, key TEXT, type TEXT, value BLOB);
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v INTEGER);
INSERT OR IGNORE INTO meta (k, v) VALUES ('rev', 0);
INSERT OR IGNORE INTO meta (k, v) VALUES ('compacted', 0);
"""

# A queued item: (rv, key, type, encoded object), an exception to raise, or None (store closed).
_Item = tuple[int, str, str, bytes] | BaseException | None


class _Watcher:
    """A watcher's backlog: a deque and one waiter future (lighter than an asyncio.Queue, which matters when one
    write is handed to a thousand watchers)."""

    __slots__ = ("_waiter", "from_rv", "items", "prefix", "push")

    def __init__(self, prefix: str, from_rv: int) -> None:
        self.prefix = prefix
        self.from_rv = from_rv
        self.items: deque[_Item] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self.push: Push | None = None  # set once the history backlog has been yielded

    def put(self, item: _Item) -> None:
        self.items.append(item)
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def get(self) -> _Item:
        while not self.items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self.items.popleft()


def _with_rv(obj: dict[str, Any], rv: int) -> dict[str, Any]:
    """Shallow copy of ``obj`` with ``metadata.resourceVersion`` set (the input is not mutated)."""
    out = dict(obj)
    meta = out.get("metadata")
    out["metadata"] = {**(meta if isinstance(meta, dict) else {}), "resourceVersion": str(rv)}
    return out


class _Checkpointer(threading.Thread):
    """Runs ``PRAGMA wal_checkpoint(PASSIVE)`` on its own connection whenever :meth:`poke` is called."""

    def __init__(self, path: str) -> None:
        super().__init__(daemon=True, name="sqlite-wal-checkpoint")
        self._path = path
        self._wake = threading.Event()
        self._stopping = False
        self.checkpoints = 0

    def poke(self) -> None:
        self._wake.set()

    def run(self) -> None:
        conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False, timeout=1.0)
        try:
            while True:
                self._wake.wait()
                self._wake.clear()
                if self._stopping:
                    return
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                    self.checkpoints += 1
                except sqlite3.Error as exc:  # the next poke tries again
                    log.warning("sqlite: WAL checkpoint failed: %s", exc)
        finally:
            conn.close()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self.ident is not None:
            self.join(10)


def _range_sql(prefix: str) -> tuple[str, list[Any]]:
    end = prefix_end(prefix)
    if end is None:
        return "key >= ?", [prefix]
    return "key >= ? AND key < ?", [prefix, end]


class SQLiteStore(Store):
    """See the module docstring. Create with ``await SQLiteStore.open(path)``."""

    def __init__(self, conn: sqlite3.Connection, history: int) -> None:
        self._db = conn
        self._history = history
        self._watchers: set[_Watcher] = set()
        self._writes_since_compact = 0
        self._writes_since_checkpoint = 0
        self._checkpointer: _Checkpointer | None = None
        self._closed = False
        row = conn.execute("SELECT v FROM meta WHERE k = 'rev'").fetchone()
        self._rev: int = int(row[0])
        row = conn.execute("SELECT v FROM meta WHERE k = 'compacted'").fetchone()
        self._compacted: int = int(row[0])

    @classmethod
    async def open(cls, path: str, *, history: int = 10000) -> SQLiteStore:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        wal = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"  # not for ":memory:"
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.executescript(_SCHEMA)
        store = cls(conn, history)
        if wal:
            conn.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT}")
            store._checkpointer = _Checkpointer(path)
            store._checkpointer.start()
        if store._rev - store._compacted > history:
            store._compact_sync(history)
        return store

    # -- writes -------------------------------------------------------------------------------------

    def _write(self, key: str, etype: str, value: bytes, *, delete: bool = False) -> int:
        """One transaction: bump revision, update kv, append history. Returns the new revision."""
        rev = self._rev + 1
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            if delete:
                db.execute("DELETE FROM kv WHERE key = ?", (key,))
            else:
                db.execute(
                    "INSERT INTO kv (key, rv, value) VALUES (?, ?, ?) "
                    "ON CONFLICT(key) DO UPDATE SET rv = excluded.rv, value = excluded.value",
                    (key, rev, value),
                )
            db.execute(
                "INSERT INTO history (rv, key, type, value) VALUES (?, ?, ?, ?)", (rev, key, etype, value)
            )
            db.execute("UPDATE meta SET v = ? WHERE k = 'rev'", (rev,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self._rev = rev
        self._notify((rev, key, etype, value))
        if self._checkpointer is not None:
            self._writes_since_checkpoint += 1
            if self._writes_since_checkpoint >= CHECKPOINT_EVERY:
                self._writes_since_checkpoint = 0
                self._checkpointer.poke()
        self._writes_since_compact += 1
        if self._writes_since_compact >= COMPACT_EVERY:
            self._writes_since_compact = 0
            if self._rev - self._compacted > self._history:
                self._compact_sync(self._history)
        return rev

    def _notify(self, item: tuple[int, str, str, bytes]) -> None:
        key = item[1]
        pushed: list[_Watcher] = []
        for w in list(self._watchers):
            if not key.startswith(w.prefix):
                continue
            if w.push is not None and not w.items:
                pushed.append(w)
            else:
                self._enqueue(w, item)
        if pushed:
            # after the writer's call has returned, and in write order (call_soon is FIFO)
            asyncio.get_running_loop().call_soon(self._push, item, pushed)

    def _push(self, item: tuple[int, str, str, bytes], watchers: list[_Watcher]) -> None:
        change = Change(*item)
        for w in watchers:
            if w not in self._watchers:  # unsubscribed since the write
                continue
            if not w.items and w.push is not None:
                if item[0] <= w.from_rv:
                    continue
                try:
                    if w.push(change):
                        continue
                except Exception:  # the consumer meets the same error when it takes the event itself
                    log.debug("watch push failed; queueing the event", exc_info=True)
            self._enqueue(w, item)

    def _enqueue(self, w: _Watcher, item: tuple[int, str, str, bytes]) -> None:
        if len(w.items) >= MAX_WATCH_QUEUE:
            self._watchers.discard(w)
            w.put(Compacted(f"watcher fell more than {MAX_WATCH_QUEUE} events behind"))
        else:
            w.put(item)

    def _current(self, key: str) -> tuple[int, bytes] | None:
        row = self._db.execute("SELECT rv, value FROM kv WHERE key = ?", (key,)).fetchone()
        return None if row is None else (int(row[0]), bytes(row[1]))

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("store is closed")

    async def create(self, key: str, obj: dict[str, Any]) -> dict[str, Any]:
        self._check_open()
        if self._current(key) is not None:
            raise KeyExists(key)
        out = _with_rv(obj, self._rev + 1)
        self._write(key, "ADDED", orjson.dumps(out))
        return out

    async def get(self, key: str) -> dict[str, Any]:
        self._check_open()
        cur = self._current(key)
        if cur is None:
            raise KeyNotFound(key)
        result: dict[str, Any] = orjson.loads(cur[1])
        return result

    async def update(self, key: str, obj: dict[str, Any], expected_rv: int | None = None) -> dict[str, Any]:
        self._check_open()
        cur = self._current(key)
        if cur is None:
            raise KeyNotFound(key)
        if expected_rv is not None and cur[0] != expected_rv:
            raise RVConflict(f"{key}: expected resourceVersion {expected_rv}, have {cur[0]}")
        out = _with_rv(obj, self._rev + 1)
        self._write(key, "MODIFIED", orjson.dumps(out))
        return out

    async def delete(self, key: str, expected_rv: int | None = None) -> dict[str, Any]:
        self._check_open()
        cur = self._current(key)
        if cur is None:
            raise KeyNotFound(key)
        if expected_rv is not None and cur[0] != expected_rv:
            raise RVConflict(f"{key}: expected resourceVersion {expected_rv}, have {cur[0]}")
        out = _with_rv(orjson.loads(cur[1]), self._rev + 1)
        self._write(key, "DELETED", orjson.dumps(out), delete=True)
        return out

    # -- reads --------------------------------------------------------------------------------------

    async def list(
        self,
        prefix: str,
        *,
        limit: int = 0,
        continue_key: str | None = None,
        predicate: Predicate | None = None,
    ) -> tuple[list[dict[str, Any]], int, str | None]:
        self._check_open()
        where, args = _range_sql(prefix)
        rev = self._rev
        if continue_key:
            after, rev = decode_continue(continue_key)
            where += " AND key > ?"
            args.append(after)
        cursor = self._db.execute(f"SELECT key, value FROM kv WHERE {where} ORDER BY key", args)
        items: list[dict[str, Any]] = []
        last_key = ""
        try:
            for key, value in cursor:
                obj: dict[str, Any] = orjson.loads(value)
                if predicate is not None and not predicate(obj):
                    continue
                if limit > 0 and len(items) >= limit:
                    # Another matching item exists beyond this page.
                    return items, rev, encode_continue(last_key, rev)
                items.append(obj)
                last_key = key
        finally:
            cursor.close()
        return items, rev, None

    async def current_revision(self) -> int:
        return self._rev

    def watcher_count(self) -> int:
        return len(self._watchers)

    def _history_rows(self, prefix: str, from_rv: int, to_rv: int) -> Iterator[tuple[int, str, str, bytes]]:
        where, args = _range_sql(prefix)
        cursor = self._db.execute(
            f"SELECT rv, key, type, value FROM history WHERE rv > ? AND rv <= ? AND {where} ORDER BY rv",
            [from_rv, to_rv, *args],
        )
        try:
            for rv, key, etype, value in cursor:
                yield int(rv), str(key), str(etype), bytes(value)
        finally:
            cursor.close()

    async def watch(self, prefix: str, from_rv: int, push: Push | None = None) -> AsyncGenerator[Event, None]:
        self._check_open()
        if from_rv < 0:
            raise ValueError("from_rv must be >= 0")
        # Everything up to registering the watcher runs without awaiting, so no write can slip in between
        # reading history and subscribing.
        now = self._rev
        backlog: list[tuple[int, str, str, bytes]] = []
        if from_rv != 0 and from_rv < now:
            if from_rv < self._compacted:
                raise Compacted(
                    f"resourceVersion {from_rv} is too old (history starts after {self._compacted})"
                )
            backlog = list(self._history_rows(prefix, from_rv, now))
        watcher = _Watcher(prefix, from_rv)
        self._watchers.add(watcher)
        try:
            for rv, key, etype, value in backlog:
                yield Event(etype, key, orjson.loads(value), rv)
            del backlog
            watcher.push = push
            while True:
                item = await watcher.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                rv, key, etype, value = item
                if rv <= from_rv:  # watching from a future revision
                    continue
                yield Event(etype, key, orjson.loads(value), rv)
        finally:
            self._watchers.discard(watcher)

    # -- maintenance --------------------------------------------------------------------------------

    def _compact_sync(self, keep: int) -> None:
        upto = self._rev - max(keep, 0)
        if upto <= self._compacted:
            return
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("DELETE FROM history WHERE rv <= ?", (upto,))
            db.execute("UPDATE meta SET v = ? WHERE k = 'compacted'", (upto,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self._compacted = upto

    async def compact(self, keep: int) -> None:
        self._check_open()
        self._compact_sync(keep)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for w in list(self._watchers):
            w.put(None)
        self._watchers.clear()
        if self._checkpointer is not None:
            self._checkpointer.stop()
        self._db.close()
