"""Per-connection flow control for tunnelled connections, sans I/O.

Many TCP connections share one gRPC stream between an agent and a server. HTTP/2 flow control works per
stream, so it cannot slow one tunnelled connection without slowing all of them. Each end therefore keeps, for
every tunnelled connection and each direction:

- a :class:`SendCredit`: how many more bytes it may send. Sending takes credit; a sender with no credit stops
  *reading its source* (a socket, or a frontend's stream), which pushes back through TCP or HTTP/2 to whoever is
  writing, and never blocks the shared stream's receive loop.
- a :class:`ReceiveBuffer`: bytes received and not yet written to the destination. Writing them out
  ("consuming") is what earns the peer more credit.

With the kplane extension negotiated (both ends sent ``kplane-window-v1: N`` in the Connect metadata), credit
travels end to end: a receiver announces ``N`` bytes per connection and returns credit with
``KPLANE_WINDOW_UPDATE`` as it consumes; a peer that overruns the window broke the protocol and its connection is
closed. With an upstream peer there is no such packet: credit is then local (returned when our own stream writer
has handed the packet to gRPC), and the only brake left is the shared stream itself, as upstream has it. A
receive buffer holding more than ``limit`` *pauses reading the stream* (HTTP/2 flow control then stops the peer,
and every connection on the stream waits) until the buffer drains; a connection that stays over its limit for
``STALL_TIMEOUT`` is closed, so one dead reader holds the others up for that long at most (upstream's client
tears its tunnel down after the same 10 s). A reader that is only slower than its sender never loses a byte.
:class:`ReadGate` keeps that state for one stream.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Protocol

# bytes per connection and direction; credit comes back in grants of half a window, so a larger window means
# fewer window updates and fewer times a fast sender stops reading its source
DEFAULT_WINDOW = 2 << 20
MIN_WINDOW = 64 << 10
MAX_WINDOW = 64 << 20
DEFAULT_BUFFER_LIMIT = 4 << 20  # receive buffer per connection when the peer does not do windows
STALL_TIMEOUT = 10.0  # seconds a connection may stay over that limit (holding its stream) before it is closed


class Cancellable(Protocol):
    def cancel(self) -> None: ...


Scheduler = Callable[[float, Callable[[], None]], Cancellable]  # (delay, callback) -> handle, as loop.call_later


class FlowControlError(Exception):
    """The peer sent more than it was allowed to, or granted an absurd amount of credit."""


def parse_window(value: str | bytes | None) -> int | None:
    """The peer's ``kplane-window-v1`` metadata value, or None when absent or unusable (no extension then)."""
    if value is None:
        return None
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return None
    v = value.strip()
    if not v.isdigit() or len(v) > 12:
        return None
    n = int(v)
    return n if MIN_WINDOW <= n <= MAX_WINDOW else None


class SendCredit:
    """Bytes we may still send on one connection."""

    __slots__ = ("available", "ceiling")

    def __init__(self, initial: int, *, ceiling: int | None = None) -> None:
        self.available = initial
        # more credit than this outstanding is a peer bug (or an attack on our arithmetic)
        self.ceiling = ceiling if ceiling is not None else max(initial, 1) * 4

    def take(self, want: int) -> int:
        n = min(want, self.available)
        if n > 0:
            self.available -= n
            return n
        return 0

    def give(self, n: int) -> None:
        if n <= 0 or self.available + n > self.ceiling:
            raise FlowControlError(f"invalid credit grant {n} (have {self.available}, ceiling {self.ceiling})")
        self.available += n


class ReceiveBuffer:
    """Bytes received on one connection and not yet consumed.

    ``window``: what we announced to a peer that does windows (None: the peer does not), ``limit``: the most we
    hold before giving up on the connection."""

    __slots__ = ("buffered", "limit", "unacked", "window")

    def __init__(self, *, window: int | None, limit: int = DEFAULT_BUFFER_LIMIT) -> None:
        self.window = window
        self.limit = window if window is not None else limit
        self.buffered = 0
        self.unacked = 0

    def received(self, n: int) -> None:
        """Account ``n`` received bytes; raises FlowControlError when a peer that does windows overran ours.
        Without windows nothing is refused: see :attr:`over`."""
        if self.window is not None and self.buffered + n > self.limit:
            raise FlowControlError(f"receive buffer overflow ({self.buffered} + {n} > {self.limit} bytes)")
        self.buffered += n

    @property
    def over(self) -> bool:
        """More than ``limit`` is held (only possible without windows): the stream must not be read for now."""
        return self.buffered > self.limit

    def consumed(self, n: int) -> int:
        """``n`` bytes were written out; returns the credit to grant the peer now (0: nothing yet)."""
        self.buffered = max(0, self.buffered - n)
        if self.window is None:
            return 0
        self.unacked += n
        if self.unacked >= self.window // 2:
            grant, self.unacked = self.unacked, 0
            return grant
        return 0


class ReadGate:
    """Whether one shared stream may be read, for peers without windows.

    Call :meth:`update` with a connection's key and its buffer's :attr:`ReceiveBuffer.over` after every receive
    and every consume, and :meth:`release` when the connection goes. The first connection over its limit calls
    ``pause``; the last one back under calls ``resume``. A connection still over its limit ``stall_timeout``
    seconds after it went over is handed to ``on_stall`` (which is expected to close it) and released."""

    __slots__ = ("_held", "on_stall", "pause", "resume", "schedule", "stall_timeout")

    def __init__(self, *, pause: Callable[[], None], resume: Callable[[], None], schedule: Scheduler,
                 on_stall: Callable[[Hashable], None], stall_timeout: float = STALL_TIMEOUT) -> None:
        self.pause, self.resume, self.schedule = pause, resume, schedule
        self.on_stall = on_stall
        self.stall_timeout = stall_timeout
        self._held: dict[Hashable, Cancellable] = {}

    @property
    def open(self) -> bool:
        return not self._held

    def update(self, key: Hashable, over: bool) -> None:
        if over:
            if key not in self._held:
                self._held[key] = self.schedule(self.stall_timeout, lambda: self._stalled(key))
                if len(self._held) == 1:
                    self.pause()
        elif key in self._held:
            self.release(key)

    def release(self, key: Hashable) -> None:
        timer = self._held.pop(key, None)
        if timer is None:
            return
        timer.cancel()
        if not self._held:
            self.resume()

    def _stalled(self, key: Hashable) -> None:
        if key in self._held:
            self.on_stall(key)
            self.release(key)
