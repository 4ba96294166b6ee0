"""k8s channel framing, resize and status payload tests (kplane.streams.channels)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kplane.streams import channels
from kplane.streams.channels import ChannelError, ResizeDecoder


def test_binary_and_base64_encoding() -> None:
    assert channels.encode(1, b"hi", base64=False) == b"\x01hi"
    # example from the wsstream source comment: stdin "foo\n"
    assert channels.encode(0, b"foo\n", base64=True) == "0Zm9vCg=="
    assert channels.decode("0Zm9vCg==", base64=True) == (0, b"foo\n")
    assert channels.decode(b"\x03{}", base64=False) == (3, b"{}")
    assert channels.decode(b"\x01", base64=False) == (1, b"")


@given(st.integers(0, 9), st.binary(max_size=200), st.booleans())
def test_roundtrip(ch: int, data: bytes, b64: bool) -> None:
    assert channels.decode(channels.encode(ch, data, base64=b64), base64=b64) == (ch, data)


@pytest.mark.parametrize("msg", ["", "x", "0Zm9v!", "A"])
def test_bad_base64(msg: str) -> None:
    with pytest.raises(ChannelError):
        channels.decode(msg, base64=True)


@given(st.one_of(st.binary(max_size=50), st.text(max_size=50)), st.booleans())
def test_decode_only_channel_error(msg: bytes | str, b64: bool) -> None:
    try:
        channels.decode(msg, base64=b64)
    except ChannelError:
        pass


def test_close_signal() -> None:
    assert channels.close_message(0) == b"\xff\x00"
    ch, data = channels.decode(b"\xff\x00", base64=False)
    assert ch == channels.CLOSE and channels.parse_close(data) == 0
    with pytest.raises(ChannelError):
        channels.parse_close(b"\x00\x01")
    with pytest.raises(ChannelError):
        channels.parse_close(b"")


def test_port_prefix() -> None:
    assert channels.port_prefix(8080) == b"\x90\x1f"
    with pytest.raises(ChannelError):
        channels.port_prefix(0)


def test_resize() -> None:
    assert channels.parse_resize(b'{"Width":100,"Height":30}\n') == (100, 30)
    for bad in (b"[]", b'{"Width":-1,"Height":3}', b'{"Width":true,"Height":3}', b"nope",
                b'{"Width":70000,"Height":1}', b'{"Width":1.5,"Height":1}'):
        with pytest.raises(ChannelError):
            channels.parse_resize(bad)


def test_resize_decoder_streaming() -> None:
    raw = b'{"Width":100,"Height":30}\n{"Width":80,"Height":24}\n'
    dec = ResizeDecoder()
    out = []
    for i in range(len(raw)):
        out += dec.feed(raw[i:i + 1])
    assert out == [(100, 30), (80, 24)]
    assert ResizeDecoder().feed(raw) == [(100, 30), (80, 24)]
    with pytest.raises(ChannelError):
        ResizeDecoder().feed(b"xx")
    with pytest.raises(ChannelError):
        ResizeDecoder().feed(b"{" + b" " * 5000)


def test_protocol_table() -> None:
    v5 = channels.protocol_info("v5.channel.k8s.io")
    assert v5.status_json and v5.supports_close and not v5.base64
    v4b = channels.protocol_info("v4.base64.channel.k8s.io")
    assert v4b.status_json and v4b.base64 and not v4b.supports_close
    v1 = channels.protocol_info("channel.k8s.io")
    assert not v1.status_json and not v1.spdy_resize and v1.spdy
    assert channels.protocol_info("v3.channel.k8s.io").spdy_resize
    assert not channels.protocol_info("v2.channel.k8s.io").spdy_resize
    assert channels.protocol_info(None).version == 1
    assert channels.protocol_info("base64.channel.k8s.io").base64
    with pytest.raises(ChannelError):
        channels.protocol_info("v9.channel.k8s.io")
    assert channels.REMOTECOMMAND_SPDY_PROTOCOLS[0] == "v4.channel.k8s.io"
    assert "v5.channel.k8s.io" not in channels.PORTFORWARD_WS_PROTOCOLS


def test_exit_status_json() -> None:
    assert json.loads(channels.exit_status(0)) == {"metadata": {}, "status": "Success"}
    s = json.loads(channels.exit_status(3))
    assert s["status"] == "Failure" and s["reason"] == "NonZeroExitCode"
    assert s["details"]["causes"] == [{"reason": "ExitCode", "message": "3"}]
    assert s["message"].startswith("command terminated with non-zero exit code: ")
    e = json.loads(channels.error_status("boom"))
    assert e == {"metadata": {}, "status": "Failure", "reason": "InternalError",
                 "message": "Internal error occurred: boom", "code": 500}


def test_status_payload_by_version() -> None:
    assert json.loads(channels.status_payload("v4.channel.k8s.io", 0, None))["status"] == "Success"
    assert json.loads(channels.status_payload("v5.channel.k8s.io", 7, None))["details"]["causes"][0][
        "message"] == "7"
    assert json.loads(channels.status_payload("v4.channel.k8s.io", None, "x"))["reason"] == "InternalError"
    assert channels.status_payload("v3.channel.k8s.io", 0, None) == b""
    assert channels.status_payload("channel.k8s.io", None, None) == b""
    assert channels.status_payload("v2.channel.k8s.io", None, "bad thing") == b"bad thing"
    assert b"exit" in channels.status_payload("v2.channel.k8s.io", 2, None)
