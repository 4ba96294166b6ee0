"""What waits for one gRPC stream's writer, sans I/O.

A stream writer hands one message at a time to gRPC and waits for it to be taken. Everything queued behind it in
the meantime sits in an :class:`Outbox`, in order. DATA for a connection that is queued right behind DATA for the
same connection joins it, up to ``max_data`` payload bytes per packet: the busier the stream, the fewer and
larger its packets, and the per-packet cost (one gRPC write, one protobuf header, one receive on the far side)
is paid per batch instead of per socket read. Order is kept: bytes only ever join the *last* queued item, so
nothing overtakes a control packet or another connection's data.

How much can wait here is bounded by the senders' per-connection credit (:mod:`kplane.tunnel.flow`), not by
this class.
"""

from __future__ import annotations

from collections import deque

from kplane.tunnel import packets as P
from kplane.tunnel.packets import Packet

MAX_DATA = 512 << 10  # largest DATA payload we put in one packet (gRPC peers accept 4 MiB messages by default)


class DataBatch:
    """Payload bytes for one connection, to go out as one DATA packet."""

    __slots__ = ("chunks", "connect_id", "size")

    def __init__(self, connect_id: int) -> None:
        self.connect_id = connect_id
        self.chunks: list[bytes | memoryview] = []
        self.size = 0

    def encode(self) -> bytes:
        return P.encode_data(self.connect_id, self.chunks)


class Outbox:
    """A FIFO of control packets and DATA batches; ``bytes`` is the payload queued (for metrics)."""

    __slots__ = ("_items", "bytes", "max_data")

    def __init__(self, max_data: int = MAX_DATA) -> None:
        if max_data <= 0:
            raise ValueError("max_data must be positive")
        self.max_data = max_data
        self._items: deque[Packet | DataBatch] = deque()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    def put(self, packet: Packet) -> None:
        self._items.append(packet)

    def put_data(self, connect_id: int, payload: bytes | memoryview) -> None:
        """Queue ``payload`` for ``connect_id``: into the last batch if that is the same connection's and has
        room, the rest in new batches of at most ``max_data`` bytes. An empty payload queues nothing."""
        n = len(payload)
        if not n:
            return
        self.bytes += n
        items = self._items
        tail = items[-1] if items else None
        off = 0
        if isinstance(tail, DataBatch) and tail.connect_id == connect_id:
            off = min(self.max_data - tail.size, n)
            if off > 0:
                tail.chunks.append(payload if off == n else memoryview(payload)[:off])
                tail.size += off
            else:
                off = 0
        while off < n:
            take = min(self.max_data, n - off)
            batch = DataBatch(connect_id)
            batch.chunks.append(payload if take == n else memoryview(payload)[off : off + take])
            batch.size = take
            items.append(batch)
            off += take

    def pop(self) -> Packet | DataBatch:
        """The oldest item (IndexError when empty); it can no longer grow."""
        item = self._items.popleft()
        if isinstance(item, DataBatch):
            self.bytes -= item.size
        return item
