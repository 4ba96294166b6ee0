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
has handed the packet to gRPC), and a receive buffer that outgrows ``limit`` closes *that* connection, the
crude rule upstream also applies (a stalled reader loses its connection instead of stalling everyone).
"""

from __future__ import annotations

# bytes per connection and direction; credit comes back in grants of half a window, so a larger window means
# fewer window updates and fewer times a fast sender stops reading its source
DEFAULT_WINDOW = 2 << 20
MIN_WINDOW = 64 << 10
MAX_WINDOW = 64 << 20
DEFAULT_BUFFER_LIMIT = 4 << 20  # receive buffer per connection when the peer does not do windows


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
        """Account ``n`` received bytes; raises FlowControlError when the buffer would exceed its limit."""
        if self.buffered + n > self.limit:
            raise FlowControlError(
                f"receive buffer overflow ({self.buffered} + {n} > {self.limit} bytes)"
                + ("" if self.window is not None else ": the destination is not reading")
            )
        self.buffered += n

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
