"""kube-proxy health as explicit state (sans-I/O): what ``/healthz`` and ``/livez`` answer, given the clock.

Healthy means the rules in the kernel reflect what the API says, recently: the last sync succeeded, no change
has waited longer than ``stale_after`` seconds for a sync, and the last successful sync (changed or not: the
proxier reapplies periodically) is younger than ``stale_after`` as well. Anything else is a 503 that says why.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime


def _iso(wall: float | None) -> str | None:
    return None if wall is None else datetime.fromtimestamp(wall, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class Health:
    stale_after: float = 60.0
    queued_at: float | None = None  # monotonic time of the oldest change not yet synced
    last_success: float | None = None  # monotonic
    last_success_wall: float | None = None
    last_error: str | None = None

    def queued(self, now: float) -> None:
        if self.queued_at is None:
            self.queued_at = now

    def synced(self, now: float, wall: float, *, queued_before: float | None) -> None:
        """A sync succeeded; changes queued after it started (``queued_before``) stay queued."""
        self.last_success, self.last_success_wall, self.last_error = now, wall, None
        if self.queued_at is not None and (queued_before is None or self.queued_at <= queued_before):
            self.queued_at = None

    def failed(self, error: str) -> None:
        self.last_error = error or "sync failed"

    def problem(self, now: float) -> str | None:
        if self.last_error is not None:
            return f"last sync failed: {self.last_error}"
        if self.last_success is None:
            return "rules not synced yet"
        if self.queued_at is not None and now - self.queued_at > self.stale_after:
            return f"a change has waited {now - self.queued_at:.0f}s for a sync"
        if now - self.last_success > self.stale_after:
            return f"last successful sync was {now - self.last_success:.0f}s ago"
        return None

    def response(self, now: float, wall: float) -> tuple[int, bytes]:
        problem = self.problem(now)
        body: dict[str, object] = {"lastUpdated": _iso(self.last_success_wall), "currentTime": _iso(wall),
                                   "healthy": problem is None}
        if problem is not None:
            body["reason"] = problem
        return (200 if problem is None else 503), json.dumps(body).encode() + b"\n"
