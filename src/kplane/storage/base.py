"""The storage model every kplane backend implements.

A :class:`Store` is a flat, ordered key/value space of JSON objects (plain dicts) with a single global,
monotonically increasing *revision* (like etcd's). Every successful write (create, update, delete) bumps
the revision by exactly one; the object written carries the new revision as the string
``metadata.resourceVersion``. Each write also appends an :class:`Event` to a bounded history, which lets
watchers resume from an older revision; once history is compacted past a revision, watching from it
raises :class:`Compacted` (HTTP 410 Gone at the API layer).

Keys look like ``/registry/pods/default/p1``; callers list and watch by *prefix* and always pass prefixes
ending in ``/`` so that ``/registry/pods/ab/`` never matches ``/registry/pods/a``.

List paging uses opaque continue tokens (base64 of ``{"k": last_key, "rv": revision}``). A continued
list returns the keys after ``last_key`` as they are *now* (not as of the token's revision), and reports
the token's revision as the list revision, so that a watch started from it replays anything that
changed in between (a client may see an update twice, but never misses one).
"""

from __future__ import annotations

import abc
import base64
import binascii
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Any

import orjson

from kplane.errors import StatusError

__all__ = [
    "Change",
    "Compacted",
    "Event",
    "KeyExists",
    "KeyNotFound",
    "Predicate",
    "Push",
    "RVConflict",
    "Store",
    "decode_continue",
    "encode_continue",
    "prefix_end",
]

Predicate = Callable[[dict[str, Any]], bool]


@dataclass(frozen=True, slots=True)
class Event:
    """One change: ``type`` is ``ADDED``, ``MODIFIED`` or ``DELETED``; ``obj`` carries ``rv`` as its
    ``metadata.resourceVersion`` (for ``DELETED`` it is the last state of the object)."""

    type: str
    key: str
    obj: dict[str, Any]
    rv: int


class Change:
    """A committed write as a watch's ``push`` callback gets it (see :meth:`Store.watch`). ``obj`` is decoded on
    first use and shared by every watch the write is pushed to: read it, never change it."""

    __slots__ = ("_obj", "key", "rv", "type", "value")

    def __init__(self, rv: int, key: str, type: str, value: bytes) -> None:
        self.rv, self.key, self.type, self.value = rv, key, type, value
        self._obj: dict[str, Any] | None = None

    @property
    def obj(self) -> dict[str, Any]:
        if self._obj is None:
            self._obj = orjson.loads(self.value)
        return self._obj


Push = Callable[[Change], bool]


class KeyExists(Exception):
    """``create`` on a key that already exists."""


class KeyNotFound(Exception):
    """``get``/``update``/``delete`` of a key that does not exist."""


class RVConflict(Exception):
    """The expected resource version did not match the stored one."""


class Compacted(Exception):
    """The requested revision is older than the retained history (or a watcher fell too far behind)."""


def encode_continue(last_key: str, rv: int) -> str:
    """Opaque continue token for a list page that ended at ``last_key`` at revision ``rv``."""
    return base64.urlsafe_b64encode(orjson.dumps({"k": last_key, "rv": rv})).decode("ascii")


def decode_continue(token: str) -> tuple[str, int]:
    """Inverse of :func:`encode_continue`; raises ``StatusError(400)`` on a malformed token."""
    try:
        data = orjson.loads(base64.urlsafe_b64decode(token.encode("ascii")))
        key, rv = data["k"], data["rv"]
        if not isinstance(key, str) or not isinstance(rv, int) or isinstance(rv, bool):
            raise ValueError("bad field types")
        return key, rv
    except (ValueError, TypeError, KeyError, UnicodeError, binascii.Error, orjson.JSONDecodeError) as e:
        raise StatusError(400, f"invalid continue token: {e}") from None


def prefix_end(prefix: str) -> str | None:
    """Smallest string greater than every string starting with ``prefix`` (None: no upper bound)."""
    p = prefix
    while p:
        last = ord(p[-1])
        if last < 0x10FFFF:
            return p[:-1] + chr(last + 1)
        p = p[:-1]
    return None


class Store(abc.ABC):
    """Abstract revisioned key/value store of JSON objects. See the module docstring for the model."""

    @abc.abstractmethod
    async def create(self, key: str, obj: dict[str, Any]) -> dict[str, Any]:
        """Store a new object; returns it with ``metadata.resourceVersion`` set. Raises KeyExists."""

    @abc.abstractmethod
    async def get(self, key: str) -> dict[str, Any]:
        """Return the stored object. Raises KeyNotFound."""

    @abc.abstractmethod
    async def update(self, key: str, obj: dict[str, Any], expected_rv: int | None = None) -> dict[str, Any]:
        """Replace an existing object (conditionally on ``expected_rv`` unless None).

        Raises KeyNotFound / RVConflict; returns the object with its new resourceVersion."""

    @abc.abstractmethod
    async def delete(self, key: str, expected_rv: int | None = None) -> dict[str, Any]:
        """Delete an object; returns its last state with the delete revision as resourceVersion.

        Raises KeyNotFound / RVConflict."""

    @abc.abstractmethod
    async def list(
        self,
        prefix: str,
        *,
        limit: int = 0,
        continue_key: str | None = None,
        predicate: Predicate | None = None,
    ) -> tuple[list[dict[str, Any]], int, str | None]:
        """Objects under ``prefix`` sorted by key: ``(items, revision, continue_token_or_None)``.

        ``limit`` (0 = all) counts items accepted by ``predicate``; ``continue_key`` is a token returned by a
        previous call. A continue token is returned only if more matching items exist."""

    @abc.abstractmethod
    def watch(self, prefix: str, from_rv: int, push: Push | None = None) -> AsyncGenerator[Event, None]:
        """Async generator of every event with ``rv > from_rv`` under ``prefix``: history first, then live,
        until the consumer stops (``aclose``/``break``/cancel remove the subscription).

        ``from_rv == 0`` means "from the revision current when iteration starts". Raises Compacted (on first
        iteration) if events after ``from_rv`` were already compacted, or later if the watcher falls too
        far behind.

        With ``push``, a live event that finds nothing queued for this watch (history replayed, every earlier
        event taken) is first offered to ``push`` as a :class:`Change`, from the event loop soon after the write
        (never inside the writing call). If it returns True the event is delivered and not yielded; if it
        returns False (or raises) the event is queued and yielded as usual, and so are the ones after it until
        the consumer has caught up: the order never changes. One call per write then serves every pushed watch,
        instead of one task wake-up and one decoded copy per watch. ``push`` must not block."""

    @abc.abstractmethod
    async def current_revision(self) -> int:
        """The revision of the latest write (0 for an empty new store)."""

    @abc.abstractmethod
    async def compact(self, keep: int) -> None:
        """Drop all but the newest ``keep`` history events."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release resources; active watches end."""

    def watcher_count(self) -> int:
        """Number of active watch subscriptions (for tests and metrics; backends should override)."""
        return 0
