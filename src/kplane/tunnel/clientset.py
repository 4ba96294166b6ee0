"""Which server an agent should dial next, and when: sans I/O.

Upstream's agent knows one address (usually a load balancer) and keeps dialling it until it holds connections to
``servercount`` distinct ``serverid``s (the count arrives in every server's response headers). kplane's agent
also takes a list of addresses (what upstream users ask for most). The rules here:

- Every configured address is dialled until it yields a connection. If the server behind it is one we already
  hold (a duplicate ``serverid``), that address counts as covered by that server and is retried only when that
  server's connection drops (or, for load-balancer discovery, below).
- While we hold fewer distinct servers than the largest ``servercount`` any live server reported, addresses are
  dialled round-robin anyway, so that a load balancer eventually hands us the missing servers; a duplicate waits
  a jittered ``sync_interval`` first.
- Failures back off exponentially per address, with jitter, capped.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Backoff:
    """Capped exponential back-off with multiplicative jitter in ``[1 - jitter, 1]``."""

    base: float = 0.5
    cap: float = 3.0
    jitter: float = 0.5

    def delay(self, failures: int, rng: random.Random) -> float:
        if failures <= 0:
            return 0.0
        d = min(self.cap, self.base * (2 ** min(failures - 1, 30)))
        return d * (1.0 - self.jitter * rng.random())


@dataclass
class _Address:
    address: str
    failures: int = 0
    next_try: float = 0.0
    covered_by: str | None = None
    dialing: bool = False


@dataclass
class ClientSetPlanner:
    addresses: Sequence[str]
    backoff: Backoff = field(default_factory=Backoff)
    sync_interval: float = 1.0
    rng: random.Random = field(default_factory=random.Random)

    def __post_init__(self) -> None:
        if not self.addresses:
            raise ValueError("an agent needs at least one server address")
        self._state = [_Address(a) for a in dict.fromkeys(self.addresses)]
        self.connected: dict[str, str] = {}  # serverid -> address it was reached through
        self._counts: dict[str, int] = {}  # serverid -> servercount it reported
        self._rr = 0

    @property
    def server_count(self) -> int:
        return max(self._counts.values(), default=1)

    def _wanted(self, a: _Address) -> bool:
        if a.covered_by is None or a.covered_by not in self.connected:
            return True
        return len(self.connected) < self.server_count

    def next_dial(self, now: float) -> tuple[str | None, float | None]:
        """``(address, 0)`` to dial now (it counts as being dialled until ``on_failed``/``on_connected``),
        ``(None, seconds)`` to wait, or ``(None, None)``: nothing to do until something changes."""
        wanted = [a for a in self._state if not a.dialing and self._wanted(a)]
        if not wanted:
            return None, None
        n = len(self._state)
        # round-robin among the addresses whose time has come
        for i in range(n):
            a = self._state[(self._rr + i) % n]
            if a in wanted and a.next_try <= now:
                self._rr = (self._rr + i + 1) % n
                a.dialing = True
                return a.address, 0.0
        return None, max(0.0, min(a.next_try for a in wanted) - now)

    def _get(self, address: str) -> _Address:
        for a in self._state:
            if a.address == address:
                return a
        raise KeyError(address)

    def on_failed(self, address: str, now: float) -> float:
        a = self._get(address)
        a.dialing = False
        a.failures += 1
        d = self.backoff.delay(a.failures, self.rng)
        a.next_try = now + d
        return d

    def on_connected(self, address: str, server_id: str, server_count: int, now: float) -> bool:
        """Record a successful connect. False: ``server_id`` is already connected, close this one."""
        a = self._get(address)
        a.dialing = False
        a.failures = 0
        a.covered_by = server_id
        if server_id in self.connected:
            a.next_try = now + self.sync_interval * (1.0 - 0.5 * self.rng.random())
            return False
        self.connected[server_id] = address
        self._counts[server_id] = max(1, server_count)
        a.next_try = now
        return True

    def on_disconnected(self, server_id: str, now: float) -> None:
        address = self.connected.pop(server_id, None)
        self._counts.pop(server_id, None)
        if address is not None:
            a = self._get(address)
            a.next_try = now
