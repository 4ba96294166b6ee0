from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kplane.kubelet.crilog import (
    RotatingLogWriter,
    encode,
    encode_lines,
    follow,
    format_ts,
    parse_line,
    parse_ts,
    read_logs,
    rotated_files,
)

TS = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)


def test_format_and_parse_ts() -> None:
    assert format_ts(TS) == "2024-05-06T07:08:09.123456000Z"
    assert parse_ts("2024-05-06T07:08:09.123456789Z") == TS
    assert parse_ts("2024-05-06T09:08:09.1+02:00") == datetime(2024, 5, 6, 7, 8, 9, 100000, tzinfo=UTC)
    assert parse_ts("2024-05-06T07:08:09Z") == TS.replace(microsecond=0)
    for bad in ["2024-05-06 07:08:09Z", "2024-13-06T07:08:09Z", "nope", "2024-05-06T07:08:09"]:
        with pytest.raises(ValueError):
            parse_ts(bad)


def test_encode_simple() -> None:
    assert encode(TS, "stdout", b"hello\nworld\n") == (
        b"2024-05-06T07:08:09.123456000Z stdout F hello\n"
        b"2024-05-06T07:08:09.123456000Z stdout F world\n"
    )
    assert encode(TS, "stderr", b"no newline") == b"2024-05-06T07:08:09.123456000Z stderr P no newline\n"
    assert encode(TS, "stdout", b"") == b""
    assert encode(TS, "stdout", b"\n") == b"2024-05-06T07:08:09.123456000Z stdout F \n"
    lines = encode_lines(TS, "stdout", b"abcdefg\n", max_line=3)
    assert [parse_line(x)[2:] for x in lines] == [(True, b"abc"), (True, b"def"), (False, b"g")]
    with pytest.raises(ValueError):
        encode(TS, "stdin", b"x")


def test_parse_line_errors() -> None:
    assert parse_line(b"2024-05-06T07:08:09Z stdout F") == (TS.replace(microsecond=0), "stdout", False, b"")
    assert parse_line(b"2024-05-06T07:08:09Z stdout P:x a b  c\n")[2:] == (True, b"a b  c")
    for bad in [b"", b"garbage", b"2024-05-06T07:08:09Z stdin F x", b"2024-05-06T07:08:09Z stdout X x",
                b"xx stdout F x", b"2024-05-06T07:08:09Z stdout F a\nb"]:
        with pytest.raises(ValueError):
            parse_line(bad)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=300), stream=st.sampled_from(["stdout", "stderr"]),
       max_line=st.integers(min_value=1, max_value=40),
       ts=st.datetimes(min_value=datetime(1970, 1, 1), max_value=datetime(9999, 1, 1), timezones=st.just(UTC)))
def test_encode_parse_roundtrip(data: bytes, stream: str, max_line: int, ts: datetime) -> None:
    out = b""
    lines = encode_lines(ts, stream, data, max_line=max_line)
    assert b"".join(lines) == encode(ts, stream, data, max_line=max_line)
    for line in lines:
        assert line.endswith(b"\n") and line.count(b"\n") == 1
        pts, pstream, partial, content = parse_line(line)
        assert pts == ts and pstream == stream
        assert len(content) <= max_line
        out += content + (b"" if partial else b"\n")
    assert out == data


@settings(max_examples=100, deadline=None)
@given(chunks=st.lists(st.tuples(st.sampled_from(["stdout", "stderr"]), st.binary(max_size=60)), max_size=20))
def test_writer_reader_roundtrip(tmp_path_factory: pytest.TempPathFactory,
                                 chunks: list[tuple[str, bytes]]) -> None:
    path = tmp_path_factory.mktemp("w") / "c.log"
    w = RotatingLogWriter(path, max_bytes=500, max_files=1000, max_line=16)
    for stream, data in chunks:
        w.write(stream, data)
    w.close()
    for stream in ("stdout", "stderr"):
        expected = b"".join(d for s, d in chunks if s == stream)
        assert read_logs(path, streams={stream}) == expected


def test_rotation_and_reader(tmp_path: Path) -> None:
    path = tmp_path / "c.log"
    clock = iter(TS + timedelta(seconds=i) for i in range(10_000))
    w = RotatingLogWriter(path, max_bytes=300, max_files=3, clock=lambda: next(clock))
    for i in range(40):
        w.write("stdout" if i % 2 == 0 else "stderr", f"line {i:03d}\n".encode())
    w.close()
    rotated = rotated_files(path)
    assert [p.name for p in rotated] == ["c.log.2", "c.log.1"]
    for p in [*rotated, path]:
        assert p.stat().st_size <= 300
    out = read_logs(path).decode().splitlines()
    nums = [int(x.split()[1]) for x in out]
    assert nums == list(range(nums[0], 40)) and nums[0] > 0  # oldest lines rotated away, rest in order
    assert read_logs(path, tail=3) == b"line 037\nline 038\nline 039\n"
    assert read_logs(path, tail=2, streams={"stdout"}) == b"line 036\nline 038\n"
    assert read_logs(path, tail=0) == b""
    assert read_logs(path, tail=1, timestamps=True).startswith(b"2024-05-06T07:")
    since = TS + timedelta(seconds=38)
    assert read_logs(path, since=since) == b"line 038\nline 039\n"
    assert read_logs(path, limit_bytes=5) == out[0].encode()[:5]


def test_reader_joins_partials_across_rotation(tmp_path: Path) -> None:
    path = tmp_path / "c.log"
    w = RotatingLogWriter(path, max_bytes=100, max_files=10, max_line=10)
    w.write("stdout", b"x" * 35 + b"\n")
    w.write("stdout", b"tail-without-newline")
    w.close()
    assert len(rotated_files(path)) >= 1
    assert read_logs(path) == b"x" * 35 + b"\n" + b"tail-without-newline"
    assert read_logs(path, tail=1) == b"tail-without-newline"


def test_reader_skips_malformed(tmp_path: Path) -> None:
    path = tmp_path / "c.log"
    path.write_bytes(b"junk\n" + encode(TS, "stdout", b"ok\n") + b"2024-05-06T07:08:09Z stdout F torn")
    assert read_logs(path) == b"ok\ntorn\n"
    assert read_logs(tmp_path / "missing.log") == b""


async def test_follow_survives_rotation(tmp_path: Path) -> None:
    path = tmp_path / "c.log"
    w = RotatingLogWriter(path, max_bytes=200, max_files=50)
    w.write("stdout", b"before-1\nbefore-2\n")
    done = False
    got: list[bytes] = []

    async def reader() -> None:
        async for chunk in follow(path, tail=1, poll_interval=0.01, stop=lambda: done):
            got.append(chunk)

    task = asyncio.create_task(reader())
    await asyncio.sleep(0.05)
    expected = [f"after-{i}".encode() for i in range(30)]
    for i, line in enumerate(expected):
        w.write("stderr" if i % 3 == 0 else "stdout", line + b"\n")
        await asyncio.sleep(0.02)
    w.write("stdout", b"partial")
    w.flush()
    await asyncio.sleep(0.05)
    w.write("stdout", b" done\n")
    w.close()
    assert len(rotated_files(path)) >= 3
    done = True
    await asyncio.wait_for(task, 5)
    assert b"".join(got) == b"before-2\n" + b"".join(x + b"\n" for x in expected) + b"partial done\n"


async def test_follow_waits_for_file_and_timestamps(tmp_path: Path) -> None:
    path = tmp_path / "late.log"
    done = False
    got: list[bytes] = []

    async def reader() -> None:
        async for chunk in follow(path, timestamps=True, poll_interval=0.01, stop=lambda: done):
            got.append(chunk)

    task = asyncio.create_task(reader())
    await asyncio.sleep(0.05)
    path.write_bytes(encode(TS, "stdout", b"a\n"))
    await asyncio.sleep(0.05)
    done = True
    await asyncio.wait_for(task, 5)
    assert b"".join(got) == b"2024-05-06T07:08:09.123456000Z a\n"
