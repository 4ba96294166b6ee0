"""CRI container log format: encoding, parsing, rotation-aware reading and following.

Each log line is ``<RFC3339Nano timestamp> <stdout|stderr> <F|P> <content>\\n``.  ``P`` marks a
partial fragment (a line split because it is longer than ``max_line`` or because it had no trailing
newline when it was flushed); the fragments of one logical line are concatenated until an ``F``
fragment ends it.

The encoder/parser are pure functions; :class:`RotatingLogWriter` (used by the shim) and the
readers do plain file I/O.  Rotated files are ``<log>.1`` (newest) ... ``<log>.N`` (oldest).
"""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

__all__ = [
    "MAX_LINE",
    "STREAMS",
    "LogRecord",
    "RotatingLogWriter",
    "encode",
    "encode_lines",
    "follow",
    "format_ts",
    "parse_line",
    "parse_ts",
    "read_logs",
    "rotated_files",
]

MAX_LINE = 16 * 1024
STREAMS = frozenset({"stdout", "stderr"})
_ALL_STREAMS: frozenset[str] = STREAMS

_TS_RE = re.compile(
    rb"^(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?(Z|[+-]\d{2}:\d{2})$"
)


def format_ts(ts: datetime) -> str:
    """RFC3339 with a fixed 9-digit fraction, always UTC (``...T12:00:00.123456000Z``)."""
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    ts = ts.astimezone(UTC)
    return ts.strftime("%Y-%m-%dT%H:%M:%S") + f".{ts.microsecond:06d}000Z"


def parse_ts(raw: bytes | str) -> datetime:
    """Parse an RFC3339(Nano) timestamp (precision is truncated to microseconds)."""
    if isinstance(raw, str):
        raw = raw.encode()
    m = _TS_RE.match(raw)
    if m is None:
        raise ValueError(f"malformed timestamp {raw!r}")
    year, month, day, hour, minute, second = (int(g) for g in m.groups()[:6])
    frac = m.group(7) or b""
    micro = int((frac + b"000000")[:6]) if frac else 0
    tz_raw = m.group(8)
    if tz_raw == b"Z":
        tz: timezone = UTC
    else:
        sign = -1 if tz_raw[:1] == b"-" else 1
        tz = timezone(sign * timedelta(hours=int(tz_raw[1:3]), minutes=int(tz_raw[4:6])))
    try:
        return datetime(year, month, day, hour, minute, second, micro, tzinfo=tz)
    except ValueError as e:
        raise ValueError(f"malformed timestamp {raw!r}: {e}") from None


def _check_stream(stream: str) -> None:
    if stream not in STREAMS:
        raise ValueError(f"invalid stream {stream!r}")


def encode_lines(ts: datetime, stream: str, data: bytes, *, max_line: int = MAX_LINE) -> list[bytes]:
    """Encode ``data`` into CRI log lines (each ending in ``\\n``).

    Complete lines end with an ``F`` fragment; pieces of lines longer than ``max_line`` and a
    trailing remainder without newline are ``P`` fragments.
    """
    _check_stream(stream)
    if max_line < 1:
        raise ValueError("max_line must be >= 1")
    prefix_p = f"{format_ts(ts)} {stream} P ".encode()
    prefix_f = prefix_p[:-2] + b"F "
    out: list[bytes] = []
    pos = 0
    n = len(data)
    while pos < n:
        nl = data.find(b"\n", pos)
        end = n if nl < 0 else nl
        # chunks of [pos, end)
        while end - pos > max_line:
            out.append(prefix_p + data[pos : pos + max_line] + b"\n")
            pos += max_line
        if nl < 0:
            if end > pos:
                out.append(prefix_p + data[pos:end] + b"\n")
            pos = n
        else:
            out.append(prefix_f + data[pos:end] + b"\n")
            pos = nl + 1
    return out


def encode(ts: datetime, stream: str, data: bytes, *, max_line: int = MAX_LINE) -> bytes:
    return b"".join(encode_lines(ts, stream, data, max_line=max_line))


@dataclass(frozen=True, slots=True)
class LogRecord:
    raw_ts: bytes
    ts: datetime
    stream: str
    partial: bool
    content: bytes


def _parse(line: bytes) -> LogRecord:
    if line.endswith(b"\n"):
        line = line[:-1]
    if b"\n" in line:
        raise ValueError("embedded newline in CRI log line")
    parts = line.split(b" ", 3)
    if len(parts) < 3:
        raise ValueError(f"malformed CRI log line {line[:80]!r}")
    raw_ts, stream_b, tag = parts[0], parts[1], parts[2]
    content = parts[3] if len(parts) == 4 else b""
    ts = parse_ts(raw_ts)
    stream = stream_b.decode("ascii", "replace")
    if stream not in STREAMS:
        raise ValueError(f"invalid stream {stream!r} in CRI log line")
    first_tag = tag.split(b":", 1)[0]
    if first_tag not in (b"F", b"P"):
        raise ValueError(f"invalid tag {tag!r} in CRI log line")
    return LogRecord(raw_ts, ts, stream, first_tag == b"P", content)


def parse_line(line: bytes) -> tuple[datetime, str, bool, bytes]:
    """Parse one CRI log line -> ``(timestamp, stream, partial, content)``; ValueError if malformed."""
    r = _parse(line)
    return r.ts, r.stream, r.partial, r.content


# --------------------------------------------------------------------------- writer


def rotated_files(path: Path) -> list[Path]:
    """Existing rotated files of ``path`` ordered oldest first (``log.N`` ... ``log.1``)."""
    path = Path(path)
    found: list[tuple[int, Path]] = []
    try:
        names = os.listdir(path.parent)
    except FileNotFoundError:
        return []
    prefix = path.name + "."
    for name in names:
        if name.startswith(prefix):
            suffix = name[len(prefix) :]
            if suffix.isdigit() and not suffix.startswith("0"):
                found.append((int(suffix), path.parent / name))
    found.sort(reverse=True)
    return [p for _, p in found]


class RotatingLogWriter:
    """Writes CRI log lines to ``path``, rotating ``path -> path.1 -> ... `` when ``max_bytes`` would
    be exceeded.  ``max_files`` counts the live file too (like kubelet's containerLogMaxFiles), so at
    most ``max_files - 1`` rotated files are kept.  Buffers incomplete lines per stream; call
    :meth:`flush` (e.g. when the stream is idle or at EOF) to write them out as ``P`` fragments.
    """

    def __init__(self, path: Path | str, *, max_bytes: int = 10 * 1024 * 1024, max_files: int = 5,
                 max_line: int = MAX_LINE, clock: Callable[[], datetime] | None = None) -> None:
        self.path = Path(path)
        self.max_bytes = max(1, int(max_bytes))
        self.max_files = max(1, int(max_files))
        self.max_line = max_line
        self._clock = clock or (lambda: datetime.now(UTC))
        self._pending: dict[str, bytes] = {s: b"" for s in STREAMS}
        self._fd = -1
        self._size = 0
        self._open()

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        self._size = os.fstat(self._fd).st_size

    def close(self) -> None:
        for s in STREAMS:
            self.flush(s)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def rotate(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        keep = self.max_files - 1
        for old in rotated_files(self.path):
            n = int(old.name.rsplit(".", 1)[1])
            if n >= keep:
                old.unlink(missing_ok=True)
        for n in range(keep - 1, 0, -1):
            src = self.path.with_name(f"{self.path.name}.{n}")
            if src.exists():
                os.replace(src, self.path.with_name(f"{self.path.name}.{n + 1}"))
        if keep >= 1:
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        else:
            self.path.unlink(missing_ok=True)
        self._open()

    def _emit(self, lines: Iterable[bytes]) -> None:
        batch: list[bytes] = []
        batch_size = 0
        for line in lines:
            if self._size + batch_size + len(line) > self.max_bytes and self._size + batch_size > 0:
                if batch:
                    self._write_all(b"".join(batch))
                    batch, batch_size = [], 0
                self.rotate()
            batch.append(line)
            batch_size += len(line)
        if batch:
            self._write_all(b"".join(batch))

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        self._size += len(data)

    def write(self, stream: str, data: bytes) -> None:
        """Append raw container output; complete lines are written immediately."""
        _check_stream(stream)
        buf = self._pending[stream] + data
        cut = buf.rfind(b"\n") + 1
        complete, rest = buf[:cut], buf[cut:]
        if len(rest) > self.max_line:
            whole = len(rest) - len(rest) % self.max_line
            complete, rest = complete + rest[:whole], rest[whole:]
        self._pending[stream] = rest
        if complete:
            self._emit(encode_lines(self._clock(), stream, complete, max_line=self.max_line))

    def flush(self, stream: str | None = None) -> None:
        """Write buffered incomplete lines as partial (``P``) fragments."""
        for s in [stream] if stream else sorted(STREAMS):
            rest = self._pending[s]
            if rest:
                self._pending[s] = b""
                self._emit(encode_lines(self._clock(), s, rest, max_line=self.max_line))

    def write_line(self, stream: str, text: str) -> None:
        """Write one complete line (used for runtime-generated messages)."""
        self.flush(stream)
        self._emit(encode_lines(self._clock(), stream, text.encode() + b"\n", max_line=self.max_line))


# --------------------------------------------------------------------------- reader


@dataclass(slots=True)
class _Logical:
    raw_ts: bytes
    ts: datetime
    stream: str
    content: bytes
    complete: bool


class _Assembler:
    """Joins P fragments of each stream into logical lines."""

    def __init__(self, streams: frozenset[str]) -> None:
        self.streams = streams
        self.pending: dict[str, _Logical] = {}

    def feed(self, rec: LogRecord) -> _Logical | None:
        if rec.stream not in self.streams:
            return None
        cur = self.pending.get(rec.stream)
        if cur is None:
            cur = _Logical(rec.raw_ts, rec.ts, rec.stream, rec.content, False)
        else:
            cur.content += rec.content
        if rec.partial:
            self.pending[rec.stream] = cur
            return None
        self.pending.pop(rec.stream, None)
        cur.content += b"\n"
        cur.complete = True
        return cur

    def incomplete(self) -> list[_Logical]:
        return list(self.pending.values())


def _records(data: bytes) -> Iterable[LogRecord]:
    for line in data.split(b"\n"):
        if not line:
            continue
        try:
            yield _parse(line)
        except ValueError:
            continue  # skip malformed lines (e.g. torn writes)


def _norm_since(since: datetime | None) -> datetime | None:
    if since is not None and since.tzinfo is None:
        return since.replace(tzinfo=UTC)
    return since


def _render(lines: Iterable[_Logical], timestamps: bool) -> bytes:
    out = bytearray()
    for ln in lines:
        if timestamps:
            out += ln.raw_ts + b" "
        out += ln.content
    return bytes(out)


def _logical_lines(data_chunks: Iterable[bytes], streams: frozenset[str], since: datetime | None,
                   tail: int | None) -> tuple[list[_Logical], _Assembler]:
    asm = _Assembler(streams)
    lines: list[_Logical] = []
    for chunk in data_chunks:
        for rec in _records(chunk):
            ln = asm.feed(rec)
            if ln is not None:
                lines.append(ln)
    lines.extend(asm.incomplete())
    if since is not None:
        lines = [ln for ln in lines if ln.ts >= since]
    if tail is not None:
        lines = lines[-tail:] if tail > 0 else []
    return lines, asm


def _read_file(p: Path) -> bytes:
    try:
        return p.read_bytes()
    except FileNotFoundError:
        return b""


def read_logs(path: Path | str, *, tail: int | None = None, since: datetime | None = None,
              timestamps: bool = False, limit_bytes: int | None = None,
              streams: Iterable[str] = _ALL_STREAMS) -> bytes:
    """Read a container's logs (rotated files oldest first, then the live file) as plain output."""
    path = Path(path)
    chunks = [_read_file(p) for p in rotated_files(path)] + [_read_file(path)]
    lines, _ = _logical_lines(chunks, frozenset(streams), _norm_since(since), tail)
    out = _render(lines, timestamps)
    if limit_bytes is not None and limit_bytes >= 0:
        out = out[:limit_bytes]
    return out


async def follow(path: Path | str, *, tail: int | None = None, since: datetime | None = None,
                 timestamps: bool = False, streams: Iterable[str] = _ALL_STREAMS,
                 poll_interval: float = 0.1, stop: Callable[[], bool] | None = None,
                 ) -> AsyncIterator[bytes]:
    """Yield existing logs (subject to ``tail``/``since``) then new output as the log grows.

    Survives rotation (reopens ``path`` when its inode changes).  Ends when ``stop()`` returns true
    and everything written so far has been yielded; otherwise runs until cancelled.
    """
    import asyncio  # here, not at the top: the container shim imports this module and never follows

    path = Path(path)
    stream_set = frozenset(streams)
    since = _norm_since(since)

    fd = -1
    while fd < 0:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            if stop is not None and stop():
                return
            await asyncio.sleep(poll_interval)

    def read_to_eof(f: int) -> bytes:
        parts: list[bytes] = []
        while True:
            b = os.read(f, 1 << 16)
            if not b:
                return b"".join(parts)
            parts.append(b)

    try:
        initial = [_read_file(p) for p in rotated_files(path)] + [read_to_eof(fd)]
        # keep a torn trailing line (no newline yet) for later
        last = initial[-1]
        cut = last.rfind(b"\n") + 1
        initial[-1], buf = last[:cut], last[cut:]
        lines, asm = _logical_lines(initial, stream_set, since, tail)
        # streaming state: which streams are in the middle of an emitted line / a skipped line
        in_line: dict[str, bool] = {}
        skipping: dict[str, bool] = {}
        shown = {id(ln) for ln in lines}
        for inc in asm.incomplete():
            if id(inc) in shown:
                in_line[inc.stream] = True
            else:
                skipping[inc.stream] = True
        out = _render(lines, timestamps)
        if out:
            yield out

        def stream_records(data: bytes) -> bytes:
            res = bytearray()
            for rec in _records(data):
                s = rec.stream
                if s not in stream_set:
                    continue
                if skipping.get(s):
                    if not rec.partial:
                        skipping[s] = False
                    continue
                if not in_line.get(s):
                    if since is not None and rec.ts < since:
                        if rec.partial:
                            skipping[s] = True
                        continue
                    if timestamps:
                        res += rec.raw_ts + b" "
                res += rec.content
                if rec.partial:
                    in_line[s] = True
                else:
                    res += b"\n"
                    in_line[s] = False
            return bytes(res)

        while True:
            data = read_to_eof(fd)
            if data:
                buf += data
                cut = buf.rfind(b"\n") + 1
                if cut:
                    out = stream_records(buf[:cut])
                    buf = buf[cut:]
                    if out:
                        yield out
                continue
            # at EOF: rotated?
            try:
                st = os.stat(path)
                rotated = st.st_ino != os.fstat(fd).st_ino or st.st_dev != os.fstat(fd).st_dev
            except FileNotFoundError:
                st = None
                rotated = False
            if rotated:
                rest = buf + read_to_eof(fd)
                out = stream_records(rest)
                if out:
                    yield out
                buf = b""
                os.close(fd)
                fd = -1
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:
                    fd = -1
                while fd < 0:
                    await asyncio.sleep(poll_interval)
                    try:
                        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                    except FileNotFoundError:
                        if stop is not None and stop():
                            return
                continue
            if stop is not None and stop():
                # one last drain: the writer may have finished between our read and stop()
                data = read_to_eof(fd)
                out = stream_records(buf + data) if data or buf else b""
                if out:
                    yield out
                return
            await asyncio.sleep(poll_interval)
    finally:
        if fd >= 0:
            os.close(fd)
