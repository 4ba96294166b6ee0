"""Konnectivity, sans I/O: byte-level packet fixtures, identifiers, addresses, flow control, the clientset
planner, the HTTP CONNECT codec, the relay core and the agent authorizer."""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kplane.tunnel import konnectivity_pb2 as pb
from kplane.tunnel import packets as P
from kplane.tunnel.auth import AgentClaim, AgentRejected, Identity, NodeAgentAuthorizer, identity_from_token
from kplane.tunnel.clientset import Backoff, ClientSetPlanner
from kplane.tunnel.core import ERR_AGENT_GONE, ERR_DIAL_TIMEOUT, ERR_NO_AGENT, ProxyCore
from kplane.tunnel.flow import FlowControlError, ReadGate, ReceiveBuffer, SendCredit, parse_window
from kplane.tunnel.httpconnect import (
    ESTABLISHED,
    HTTPError,
    connect_request,
    error_response,
    parse_connect,
    parse_response,
    status_for_dial_error,
)
from kplane.tunnel.outbox import DataBatch, Outbox
from kplane.tunnel.packets import AddressPolicy, AgentIdentifiers, PacketType

# --------------------------------------------------------------------------------------------------
# byte fixtures: assembled by hand from upstream's field numbers (tag = field << 3 | wire type)
# --------------------------------------------------------------------------------------------------

ADDR = b"10.0.0.5:10250"
FIXTURES: list[tuple[str, bytes, Any]] = [
    (
        # type DIAL_REQ (0) is the proto3 default and is not written; payload dialRequest is field 2
        "dial_request",
        b"\x12\x17" + b"\x0a\x03tcp" + b"\x12\x0e" + ADDR + b"\x18\x2a",
        P.dial_request("10.0.0.5:10250", 42),
    ),
    (
        "dial_response_ok",
        b"\x08\x01" + b"\x1a\x04" + b"\x10\x07" + b"\x18\x2a",
        P.dial_response(42, connect_id=7),
    ),
    (
        "dial_response_error",
        b"\x08\x01" + b"\x1a\x16" + b"\x0a\x12connection refused" + b"\x18\x2a",
        P.dial_response(42, error="connection refused"),
    ),
    (
        "data",
        b"\x08\x04" + b"\x22\x09" + b"\x08\x07" + b"\x1a\x05hello",
        P.data(7, b"hello"),
    ),
    ("close_request", b"\x08\x02" + b"\x2a\x02" + b"\x08\x07", P.close_request(7)),
    ("close_response", b"\x08\x03" + b"\x32\x02" + b"\x10\x07", P.close_response(7)),
    (
        "close_response_error",
        b"\x08\x03" + b"\x32\x15" + b"\x0a\x11Unknown connectID" + b"\x10\x07",
        P.close_response(7, "Unknown connectID"),
    ),
    ("close_dial", b"\x08\x05" + b"\x3a\x02" + b"\x08\x2a", P.close_dial(42)),
    ("drain", b"\x08\x06" + b"\x42\x00", P.drain()),
    (
        # int64 fields are plain varints: a negative value takes ten bytes
        "dial_request_negative_random",
        b"\x12\x1a" + b"\x0a\x03tcp" + b"\x12\x08" + b"a.b:8080" + b"\x18" + b"\xff" * 9 + b"\x01",
        P.dial_request("a.b:8080", -1),
    ),
    (
        # Go's rand.Int63(): up to 2^63-1
        "dial_response_max_random",
        b"\x08\x01" + b"\x1a\x0c" + b"\x10\x01" + b"\x18" + b"\xff" * 8 + b"\x7f",
        P.dial_response(2**63 - 1, connect_id=1),
    ),
    (
        # kplane extension: type 1000 and payload field 1000 (tag 8002 = c2 3e)
        "window_update",
        b"\x08\xe8\x07" + b"\xc2\x3e\x06" + b"\x08\x07" + b"\x10\x80\x80\x04",
        P.window_update(7, 65536),
    ),
]


@pytest.mark.parametrize(("name", "wire", "message"), FIXTURES, ids=[f[0] for f in FIXTURES])
def test_fixture_decodes_and_reencodes_identically(name: str, wire: bytes, message: Any) -> None:
    decoded = P.decode(wire)
    assert decoded == message
    P.check(decoded)
    assert P.encode(decoded) == wire
    assert P.encode(message) == wire


def test_bare_drain_is_accepted() -> None:
    # upstream's tests send Packet{Type: DRAIN} without a payload
    p = P.decode(b"\x08\x06")
    assert p.type == PacketType.DRAIN
    P.check(p)


def test_unknown_fields_survive_a_round_trip() -> None:
    # an old upstream Packet carried `Network dest = 9`; an unknown field must not break decoding
    wire = b"\x08\x04" + b"\x22\x09\x08\x07\x1a\x05hello" + b"\x48\x02"
    p = P.decode(wire)
    assert p.data.data == b"hello"
    assert P.encode(p) == wire


def test_service_and_message_names_are_package_less() -> None:
    assert pb.DESCRIPTOR.package == ""
    assert pb.DESCRIPTOR.services_by_name["AgentService"].methods_by_name["Connect"].full_name == \
        "AgentService.Connect"
    assert pb.DESCRIPTOR.services_by_name["ProxyService"].methods_by_name["Proxy"].full_name == "ProxyService.Proxy"
    assert pb.Packet.DESCRIPTOR.full_name == "Packet"
    fields = {f.name: f.number for f in pb.Packet.DESCRIPTOR.fields}
    assert fields == {"type": 1, "dialRequest": 2, "dialResponse": 3, "data": 4, "closeRequest": 5,
                      "closeResponse": 6, "closeDial": 7, "drain": 8, "windowUpdate": 1000}
    assert [(v.name, v.number) for v in pb.PacketType.DESCRIPTOR.values][:7] == [
        ("DIAL_REQ", 0), ("DIAL_RSP", 1), ("CLOSE_REQ", 2), ("CLOSE_RSP", 3), ("DATA", 4), ("DIAL_CLS", 5),
        ("DRAIN", 6)]


@pytest.mark.parametrize("wire", [b"\x12\x05\x0a", b"\xff", b"\x22\x80\x80\x80\x80\x10"])
def test_undecodable_bytes_raise_packet_error(wire: bytes) -> None:
    with pytest.raises(P.PacketError):
        P.decode(wire)


def test_payload_must_match_type() -> None:
    with pytest.raises(P.PacketError):
        P.check(pb.Packet(type=pb.DATA))  # DATA without a data payload
    with pytest.raises(P.PacketError):
        P.check(pb.Packet(type=pb.DATA, closeRequest=pb.CloseRequest(connectID=1)))
    with pytest.raises(P.PacketError):
        P.check(pb.Packet(type=77, data=pb.Data()))


@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_raise_anything_but_packet_error(wire: bytes) -> None:
    try:
        p = P.decode(wire)
        P.check(p)
    except P.PacketError:
        pass


@given(st.integers(-(2**63), 2**63 - 1), st.binary(max_size=300), st.text(max_size=50))
def test_data_round_trip(cid: int, payload: bytes, err: str) -> None:
    p = P.data(cid, payload, err)
    assert P.decode(P.encode(p)) == p


# --------------------------------------------------------------------------------------------------
# DATA without protobuf objects (encode_data / parse_data) and the outbox that batches it
# --------------------------------------------------------------------------------------------------


def test_encode_data_matches_the_fixture_and_protobuf() -> None:
    assert P.encode_data(7, [b"hel", b"lo"]) == b"\x08\x04" + b"\x22\x09" + b"\x08\x07" + b"\x1a\x05hello"
    assert P.encode_data(0, []) == b"\x08\x04\x22\x00" == P.encode(P.data(0, b""))  # zero fields are left out
    assert P.encode_data(0, [b"x"]) == b"\x08\x04\x22\x03\x1a\x01x" == P.encode(P.data(0, b"x"))
    assert P.encode_data(5, [b""]) == P.encode(P.data(5, b""))
    # int64 edges: a negative connectID is ten varint bytes; lengths past one varint byte
    for cid in (1, 127, 128, 2**63 - 1, -1, -(2**63)):
        for size in (127, 128, 16383, 16384, 300_000):
            payload = bytes(range(256)) * (size // 256) + b"z" * (size % 256)
            assert P.encode_data(cid, [payload[:100], memoryview(payload)[100:]]) == P.encode(P.data(cid, payload))


@given(st.integers(-(2**63), 2**63 - 1), st.lists(st.binary(max_size=300), max_size=5))
def test_encode_data_is_what_protobuf_writes(cid: int, chunks: list[bytes]) -> None:
    wire = P.encode_data(cid, chunks)
    assert wire == P.encode(P.data(cid, b"".join(chunks)))
    got = P.parse_data(wire)
    assert got is not None
    assert got[0] == cid and bytes(got[1]) == b"".join(chunks)


def test_parse_data_returns_a_view_not_a_copy() -> None:
    wire = P.encode_data(9, [b"a" * 1000])
    got = P.parse_data(wire)
    assert got is not None
    cid, payload = got
    assert cid == 9 and isinstance(payload, memoryview) and payload.obj is wire and payload == b"a" * 1000


DATA_7_HELLO = b"\x08\x07\x1a\x05hello"


@pytest.mark.parametrize(("wire", "why"), [
    (b"\x08\x04\x22\x10" + DATA_7_HELLO + b"\x12\x05oops!", "error field set"),
    (b"\x08\x04\x22\x09" + b"\x1a\x05hello" + b"\x08\x07", "fields in another order"),
    (b"\x08\x04\x22\x09" + DATA_7_HELLO + b"\x48\x02", "an unknown field after the payload"),
    (b"\x22\x09" + DATA_7_HELLO + b"\x08\x04", "type written after the payload"),
    (b"\x08\x04\x22\x0b" + DATA_7_HELLO + b"\x28\x01", "an unknown field inside Data"),
    (b"\x08\x04\x22\x09" + DATA_7_HELLO + b"\x22\x02\x08\x08", "a second data field (protobuf merges them)"),
])
def test_parse_data_leaves_other_valid_encodings_to_protobuf(wire: bytes, why: str) -> None:
    assert P.parse_data(wire) is None, why
    p = P.decode(wire)  # the fallback still reads them
    P.check(p)
    assert p.type == PacketType.DATA


def test_parse_data_reads_non_minimal_varints_as_protobuf_does() -> None:
    wire = b"\x08\x04\x22\x8a\x00" + b"\x08\x87\x00" + b"\x1a\x05hello"
    got = P.parse_data(wire)
    assert got is not None and got[0] == 7 and got[1] == b"hello"
    assert P.decode(wire) == P.data(7, b"hello")


@pytest.mark.parametrize("wire", [
    b"", b"\x08", b"\x08\x04", b"\x08\x04\x22", b"\x08\x04\x22\x0a" + DATA_7_HELLO,  # truncated
    b"\x08\x04\x22\x08" + DATA_7_HELLO,  # the payload runs past Data's length
    b"\x08\x04\x22\x09\x08\x07\x1a\x06hello",  # the data length runs past the end
    b"\x08\x04\x22\x0c\x08" + b"\xff" * 10 + b"\x01",  # a varint longer than 64 bits
    b"\x08\x04\x22" + b"\x80" * 11,  # a length that never ends
    b"\x08\x02\x2a\x02\x08\x07",  # CLOSE_REQ
    b"\x08\x05\x22\x09" + DATA_7_HELLO,  # DIAL_CLS type with a data payload
])
def test_parse_data_refuses_what_is_not_a_plain_data_packet(wire: bytes) -> None:
    assert P.parse_data(wire) is None


@given(st.binary(max_size=64))
def test_parse_data_agrees_with_protobuf_whenever_it_answers(wire: bytes) -> None:
    got = P.parse_data(wire)
    if got is None:
        return
    p = P.decode(wire)
    assert p.type == PacketType.DATA and p.data.connectID == got[0] and p.data.data == bytes(got[1])
    assert not p.data.error


@given(st.integers(-(2**63), 2**63 - 1), st.binary(max_size=40), st.binary(min_size=1, max_size=8))
def test_parse_data_agrees_with_protobuf_on_damaged_packets(cid: int, payload: bytes, junk: bytes) -> None:
    wire = P.encode_data(cid, [payload])
    for bad in (wire + junk, wire[: len(wire) - 1], junk + wire, wire[:3] + junk + wire[3:]):
        got = P.parse_data(bad)
        if got is not None:
            p = P.decode(bad)
            assert (p.type, p.data.connectID, p.data.data) == (PacketType.DATA, got[0], bytes(got[1]))


def _drain(box: Outbox) -> list[Any]:
    """What the writer would send, decoded: control packets as they are, DATA as (cid, payload)."""
    out: list[Any] = []
    while box:
        item = box.pop()
        if isinstance(item, DataBatch):
            wire = item.encode()
            p = P.decode(wire)  # protobuf reads what we wrote
            assert p.type == PacketType.DATA and len(p.data.data) == item.size
            out.append((p.data.connectID, p.data.data))
        else:
            out.append(item)
    return out


def test_outbox_merges_data_queued_back_to_back_for_one_connection() -> None:
    box = Outbox(max_data=10)
    box.put_data(1, b"abc")
    box.put_data(1, memoryview(b"defg"))
    box.put_data(1, b"hij")
    assert len(box) == 1 and box.bytes == 10
    assert _drain(box) == [(1, b"abcdefghij")]
    assert box.bytes == 0


def test_outbox_never_reorders_across_control_packets_or_connections() -> None:
    box = Outbox(max_data=100)
    box.put_data(1, b"a1")
    box.put_data(2, b"b1")
    box.put_data(1, b"a2")  # not merged into the first: b1 sits between them
    box.put(P.close_request(1))
    box.put_data(1, b"a3")  # not merged across the control packet
    box.put_data(1, b"a4")
    assert _drain(box) == [(1, b"a1"), (2, b"b1"), (1, b"a2"), P.close_request(1), (1, b"a3a4")]


def test_outbox_splits_at_max_data_after_filling_the_last_batch() -> None:
    box = Outbox(max_data=4)
    box.put_data(3, b"xy")
    box.put_data(3, b"0123456789")  # fills "xy01", then "2345", "6789"
    box.put_data(3, b"!")
    assert _drain(box) == [(3, b"xy01"), (3, b"2345"), (3, b"6789"), (3, b"!")]
    box.put_data(4, b"abcdefghi")  # into an empty box: "abcd", "efgh", "i"
    assert _drain(box) == [(4, b"abcd"), (4, b"efgh"), (4, b"i")]


def test_outbox_popped_batches_do_not_grow_and_empty_data_is_nothing() -> None:
    box = Outbox(max_data=8)
    box.put_data(1, b"abc")
    first = box.pop()
    box.put_data(1, b"def")  # the writer holds the first batch: a new one
    assert isinstance(first, DataBatch) and first.size == 3 and P.parse_data(first.encode()) == (1, b"abc")
    box.put_data(2, b"")
    box.put_data(1, b"g")
    assert _drain(box) == [(1, b"defg")]
    box.put_data(1, b"")
    assert not box
    with pytest.raises(ValueError):
        Outbox(max_data=0)
    with pytest.raises(IndexError):
        box.pop()


@given(st.integers(1, 64), st.lists(st.one_of(
    st.tuples(st.sampled_from([1, 2, 3]), st.binary(max_size=150)),
    st.sampled_from([P.drain(), P.close_request(2)]))))
def test_outbox_sends_every_byte_in_order_within_the_size_limit(max_data: int, ops: list[Any]) -> None:
    box = Outbox(max_data=max_data)
    for op in ops:
        if isinstance(op, tuple):
            box.put_data(*op)
        else:
            box.put(op)
    assert box.bytes == sum(len(op[1]) for op in ops if isinstance(op, tuple))
    sent = _drain(box)
    assert all(len(x[1]) <= max_data for x in sent if isinstance(x, tuple))

    def canon(events: list[Any]) -> list[Any]:
        """Empty DATA dropped, adjacent DATA for one connection joined: what the peer can tell apart."""
        out: list[Any] = []
        for e in events:
            if isinstance(e, tuple):
                if not e[1]:
                    continue
                if out and isinstance(out[-1], tuple) and out[-1][0] == e[0]:
                    out[-1] = (e[0], out[-1][1] + e[1])
                    continue
            out.append(e)
        return out

    assert canon(sent) == canon(ops)
    assert all(x[1] for x in sent if isinstance(x, tuple))  # no empty packets


# --------------------------------------------------------------------------------------------------
# identifiers and addresses
# --------------------------------------------------------------------------------------------------


def test_identifiers_parse_upstream_example() -> None:
    ids = AgentIdentifiers.parse(
        "host=node1&host=10.0.0.5&ipv4=1.2.3.4&ipv6=%3A%3A1&cidr=10.0.0.0/16&default-route=true&future=x")
    assert ids.hosts == ("node1", "10.0.0.5")
    assert ids.ipv4 == ("1.2.3.4",)
    assert ids.ipv6 == ("::1",)
    assert ids.cidrs == ("10.0.0.0/16",)
    assert ids.default_route
    assert ids.matches_host("10.0.0.5") and ids.matches_host("node1") and ids.matches_host("::1")
    assert ids.matches_cidr("10.0.200.1") and not ids.matches_cidr("10.1.0.1")
    assert AgentIdentifiers.parse(ids.format()) == ids


@pytest.mark.parametrize("text", ["ipv4=1.2.3", "ipv4=::1", "ipv6=1.2.3.4", "cidr=10.0.0.0/33",
                                  "default-route=maybe", "host=bad host", "host=a&&", "x" * 5000])
def test_identifiers_reject_malformed_values(text: str) -> None:
    with pytest.raises(ValueError):
        AgentIdentifiers.parse(text)


def test_empty_identifiers_cover_nothing() -> None:
    ids = AgentIdentifiers.parse("")
    assert ids == AgentIdentifiers()
    assert not ids.covers("10.0.0.1")
    assert AgentIdentifiers.of(default_route=True).covers("8.8.8.8")


@pytest.mark.parametrize(("addr", "want"), [
    ("10.0.0.5:10250", ("10.0.0.5", 10250)),
    ("[fd00::1]:443", ("fd00::1", 443)),
    ("Node-1.Example.:80", ("node-1.example", 80)),
])
def test_split_host_port(addr: str, want: tuple[str, int]) -> None:
    assert P.split_host_port(addr) == want


@pytest.mark.parametrize("addr", ["", "10.0.0.5", "10.0.0.5:0", "10.0.0.5:65536", "fd00::1:80", "[fd00::1]80",
                                  "a b:80", "host:8o", "[1.2.3.4]:80", "x" * 400 + ":80", "h\x00:80"])
def test_split_host_port_rejects(addr: str) -> None:
    with pytest.raises(ValueError):
        P.split_host_port(addr)


def test_address_policy() -> None:
    pol = AddressPolicy.parse(["10.0.0.5", "10.1.0.0/24", "127.0.0.1:8080", "[::1]:443", "node1"])
    assert pol.allows("10.0.0.5", 1) and pol.allows("10.1.0.77", 22)
    assert pol.allows("127.0.0.1", 8080) and not pol.allows("127.0.0.1", 8081)
    assert pol.allows("::1", 443) and not pol.allows("::1", 80)
    assert pol.allows("NODE1", 10250) and not pol.allows("node2", 10250)
    assert not pol.allows("10.0.0.6", 1)
    assert AddressPolicy.parse(["*"]).allows("203.0.113.9", 9)
    default = AddressPolicy.from_identifiers(AgentIdentifiers.parse("ipv4=10.0.0.5&default-route=true"))
    assert default.allows("10.0.0.5", 10250) and not default.allows("10.0.0.6", 10250)


# --------------------------------------------------------------------------------------------------
# flow control
# --------------------------------------------------------------------------------------------------


def test_window_negotiation_values() -> None:
    assert parse_window("1048576") == 1 << 20
    assert parse_window(b"65536") == 65536
    for bad in (None, "", "abc", "-5", "1", str(1 << 40), b"\xff"):
        assert parse_window(bad) is None


def test_send_credit() -> None:
    c = SendCredit(100, ceiling=200)
    assert c.take(60) == 60 and c.take(60) == 40 and c.take(1) == 0
    c.give(150)
    with pytest.raises(FlowControlError):
        c.give(100)  # above the ceiling
    with pytest.raises(FlowControlError):
        c.give(0)


def test_receive_buffer_with_window_grants_half_windows_and_enforces_it() -> None:
    rb = ReceiveBuffer(window=1000)
    rb.received(1000)
    with pytest.raises(FlowControlError):
        rb.received(1)
    assert rb.consumed(400) == 0
    assert rb.consumed(100) == 500
    rb.received(500)


def test_receive_buffer_without_window_refuses_nothing_and_says_when_it_is_over() -> None:
    rb = ReceiveBuffer(window=None, limit=10)
    rb.received(10)
    assert not rb.over
    assert rb.consumed(10) == 0
    rb.received(10)
    rb.received(5)  # a peer without windows broke no rule: the reader is slow, and the stream must wait
    assert rb.over
    assert rb.consumed(5) == 0 and not rb.over
    assert not ReceiveBuffer(window=1000).over


class GateLog:
    def __init__(self) -> None:
        self.timers = FakeTimers()
        self.events: list[str] = []
        self.gate = ReadGate(pause=lambda: self.events.append("pause"), resume=lambda: self.events.append("resume"),
                             schedule=self.timers, on_stall=lambda k: self.events.append(f"stall {k}"),
                             stall_timeout=7.0)


def test_read_gate_pauses_for_the_first_held_connection_and_resumes_after_the_last() -> None:
    g = GateLog()
    g.gate.update("a", False)
    assert g.events == [] and g.gate.open
    g.gate.update("a", True)
    g.gate.update("a", True)  # still over: nothing new, one timer
    g.gate.update("b", True)
    assert g.events == ["pause"] and not g.gate.open
    assert [d for d, _, _ in g.timers.pending] == [7.0, 7.0]
    g.gate.update("a", False)
    assert g.events == ["pause"]  # b still holds it
    g.gate.release("b")
    g.gate.release("b")  # twice is harmless
    assert g.events == ["pause", "resume"] and g.gate.open
    g.timers.fire_all()  # both timers were cancelled
    assert g.events == ["pause", "resume"]


def test_read_gate_hands_a_connection_that_stays_over_to_on_stall_and_lets_the_others_go() -> None:
    g = GateLog()
    g.gate.update("a", True)
    g.timers.fire_all()
    assert g.events == ["pause", "stall a", "resume"] and g.gate.open
    g.gate.update("a", False)  # a late consume of a connection already given up: nothing
    assert g.events == ["pause", "stall a", "resume"]


# --------------------------------------------------------------------------------------------------
# clientset planner
# --------------------------------------------------------------------------------------------------


def test_backoff_is_capped_and_jittered() -> None:
    b = Backoff(base=0.5, cap=3.0, jitter=0.5)
    rng = random.Random(1)
    delays = [b.delay(n, rng) for n in range(1, 12)]
    assert b.delay(0, rng) == 0
    assert all(0 < d <= 3.0 for d in delays)
    assert delays[0] <= 0.5 and max(delays[5:]) > 1.5


def test_planner_single_address_discovers_server_count() -> None:
    p = ClientSetPlanner(["lb:8132"], backoff=Backoff(1, 8), sync_interval=1.0, rng=random.Random(0))
    addr, wait = p.next_dial(0)
    assert addr == "lb:8132" and wait == 0
    assert p.next_dial(0) == (None, None)  # one attempt at a time per address
    assert p.on_connected("lb:8132", "s1", 2, 0)
    # servercount 2, only one held: dial the load balancer again at once
    assert p.next_dial(0)[0] == "lb:8132"
    assert not p.on_connected("lb:8132", "s1", 2, 0)  # duplicate: wait a sync interval
    addr, wait = p.next_dial(0)
    assert addr is None and wait is not None and 0 < wait <= 1.0
    assert p.next_dial(1.0)[0] == "lb:8132"
    assert p.on_connected("lb:8132", "s2", 2, 1.0)
    assert p.next_dial(1.0) == (None, None)
    p.on_disconnected("s1", 5.0)
    assert p.next_dial(5.0)[0] == "lb:8132"


def test_planner_address_list_and_failures() -> None:
    p = ClientSetPlanner(["a:1", "b:1"], backoff=Backoff(1, 4, jitter=0), rng=random.Random(0))
    assert {p.next_dial(0)[0], p.next_dial(0)[0]} == {"a:1", "b:1"}
    assert p.on_connected("a:1", "s1", 1, 0)
    assert p.on_failed("b:1", 0) == 1
    assert p.next_dial(0.5) == (None, 0.5)
    assert p.next_dial(1)[0] == "b:1"
    assert p.on_failed("b:1", 1) == 2
    assert p.next_dial(3)[0] == "b:1"
    assert p.on_failed("b:1", 3) == 4
    assert p.next_dial(7)[0] == "b:1"
    assert p.on_failed("b:1", 7) == 4  # capped
    assert p.next_dial(11)[0] == "b:1"
    # b reaches the server a already holds: b is covered until that server goes
    assert not p.on_connected("b:1", "s1", 1, 11)
    assert p.next_dial(100) == (None, None)
    p.on_disconnected("s1", 100)
    assert {p.next_dial(100)[0], p.next_dial(100)[0]} == {"a:1", "b:1"}


def test_planner_needs_an_address() -> None:
    with pytest.raises(ValueError):
        ClientSetPlanner([])


# --------------------------------------------------------------------------------------------------
# HTTP CONNECT codec
# --------------------------------------------------------------------------------------------------

REQ = b"CONNECT 10.0.0.5:10250 HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: x\r\n\r\n"


def _feed_bytewise(data: bytes) -> Any:
    for i in range(len(data) + 1):
        r = parse_connect(data[:i])
        if r is not None:
            return r, i
    return None, None


def test_connect_parsed_whole_bytewise_and_with_trailing_bytes() -> None:
    r = parse_connect(REQ)
    assert r is not None and (r.host, r.port, r.head_length) == ("10.0.0.5", 10250, len(REQ))
    r2, at = _feed_bytewise(REQ)
    assert r2 == r and at == len(REQ)
    r3 = parse_connect(REQ + b"\x16\x03\x01early tls bytes")
    assert r3 == r
    assert parse_connect(connect_request("fd00::1", 443)).address == "[fd00::1]:443"


@pytest.mark.parametrize(("req", "status"), [
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 405),
    (b"CONNECT 10.0.0.5 HTTP/1.1\r\n\r\n", 400),
    (b"CONNECT 10.0.0.5:99999 HTTP/1.1\r\n\r\n", 400),
    (b"CONNECT a:1 HTTP/2.0\r\n\r\n", 505),
    (b"CONNECT a:1 FOO\r\n\r\n", 400),
    (b"CONNECT  a:1 HTTP/1.1\r\n\r\n", 400),
    (b"CONNECT a:1 HTTP/1.1\r\nno colon\r\n\r\n", 400),
    (b"CONNECT a:1 HTTP/1.1\r\nX-\xff: 1\r\n\r\n", 400),
    (b"\x00\x01garbage\r\n\r\n", 400),
])
def test_connect_errors(req: bytes, status: int) -> None:
    with pytest.raises(HTTPError) as ei:
        parse_connect(req)
    assert ei.value.status == status


def test_connect_oversized() -> None:
    with pytest.raises(HTTPError) as ei:
        parse_connect(b"CONNECT " + b"a" * 10000)
    assert ei.value.status == 414
    with pytest.raises(HTTPError) as ei:
        parse_connect(b"CONNECT a:1 HTTP/1.1\r\n" + b"X: y\r\n" * 4000)
    assert ei.value.status == 431
    with pytest.raises(HTTPError) as ei:
        parse_connect(b"CONNECT a:1 HTTP/1.1\r\n" + b"X: y\r\n" * 4000 + b"\r\n")
    assert ei.value.status == 431


def test_responses() -> None:
    r = parse_response(ESTABLISHED + b"server speaks first")
    assert r is not None and r.status == 200 and r.head_length == len(ESTABLISHED)
    e = error_response(503, "no agent\r\nX-Injected: 1")
    r = parse_response(e)
    assert r is not None and r.status == 503
    assert b"X-Injected" not in e[: r.head_length]
    assert parse_response(b"HTTP/1.1 200 OK\r\n") is None
    with pytest.raises(ValueError):
        parse_response(b"SSH-2.0-OpenSSH\r\n\r\n")


@pytest.mark.parametrize(("err", "status"), [
    ("dial tcp 10.0.0.1:80: i/o timeout", 504), (ERR_DIAL_TIMEOUT, 504), ("dial to x is not allowed", 403),
    (f"{ERR_NO_AGENT} for 10.0.0.1", 503), ("dial tcp 10.0.0.1:80: Connection refused", 502),
    (ERR_AGENT_GONE, 502)])
def test_dial_error_statuses(err: str, status: int) -> None:
    assert status_for_dial_error(err) == status


# --------------------------------------------------------------------------------------------------
# relay core
# --------------------------------------------------------------------------------------------------


class FakeLink:
    def __init__(self) -> None:
        self.sent: list[pb.Packet] = []
        self.closed: str | None = None
        self.woken: list[int] = []
        self.paused = False

    def send(self, packet: pb.Packet) -> None:
        self.sent.append(packet)

    def send_data(self, cid: int, payload: bytes | memoryview) -> None:
        self.sent.append(P.data(cid, bytes(payload)))

    def close(self, reason: str) -> None:
        self.closed = reason

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def wake(self, cid: int) -> None:
        self.woken.append(cid)

    def take(self) -> list[pb.Packet]:
        out, self.sent = self.sent, []
        return out


class FakeTimers:
    def __init__(self) -> None:
        self.pending: list[tuple[float, Any, list[bool]]] = []

    def __call__(self, delay: float, fn: Any) -> Any:
        flag = [False]
        self.pending.append((delay, fn, flag))

        class H:
            def cancel(self) -> None:
                flag[0] = True

        return H()

    def fire_all(self) -> None:
        pending, self.pending = self.pending, []
        for _, fn, cancelled in pending:
            if not cancelled[0]:
                fn()


def _core(**kw: Any) -> tuple[ProxyCore, FakeTimers]:
    timers = FakeTimers()
    return ProxyCore(schedule=timers, rng=random.Random(0), **kw), timers


def _agent(core: ProxyCore, name: str, ids: str, window: int | None = None) -> tuple[Any, FakeLink]:
    link = FakeLink()
    return core.add_agent(name, AgentIdentifiers.parse(ids), f"system:node:{name}", link, window), link


def test_core_dial_data_close_round_trip_with_renumbering() -> None:
    core, _ = _core()
    agent, alink = _agent(core, "n1", "ipv4=10.0.0.1")
    flink = FakeLink()
    f = core.add_frontend(flink, "grpc")
    core.dial(f, 999, "tcp", "10.0.0.1:10250")
    (req,) = alink.take()
    assert req.type == PacketType.DIAL_REQ and req.dialRequest.address == "10.0.0.1:10250"
    assert req.dialRequest.random != 999  # the server picks its own dial id toward the agent
    core.from_agent(agent, P.dial_response(req.dialRequest.random, connect_id=55))
    (rsp,) = flink.take()
    assert rsp.dialResponse.random == 999 and rsp.dialResponse.connectID == 1 and not rsp.dialResponse.error
    assert core.frontend_data(f, 1, b"ping") == 4
    assert alink.take() == [P.data(55, b"ping")]
    core.from_agent(agent, P.data(55, b"pong"))
    assert flink.take() == [P.data(1, b"pong")]
    assert core.frontend_close(f, 1)
    assert alink.take() == [P.close_request(55)]
    core.from_agent(agent, P.close_response(55))
    assert flink.take() == [P.close_response(1)]
    assert core.gauges()["established_connections"] == 0


def test_core_routes_dest_host_first_then_only_declared_defaults() -> None:
    core, _ = _core(strategies=("destHost", "default"))
    _a1, l1 = _agent(core, "n1", "ipv4=10.0.0.1&cidr=10.42.1.0/24")
    _a2, l2 = _agent(core, "n2", "ipv4=10.0.0.2&default-route=true")
    flink = FakeLink()
    f = core.add_frontend(flink, "http-connect")
    core.dial(f, 1, "tcp", "10.0.0.1:10250")
    assert len(l1.take()) == 1 and not l2.sent
    core.dial(f, 2, "tcp", "10.42.1.7:8080")  # inside n1's cidr: n1 (n2 is a default route too)
    core.dial(f, 3, "tcp", "10.42.1.8:8080")
    core.dial(f, 4, "tcp", "10.42.1.9:8080")
    assert len(l1.sent) + len(l2.sent) == 3
    l1.take()
    l2.take()
    core.dial(f, 5, "tcp", "192.0.2.1:80")  # only the default-route agent declared that
    assert len(l2.take()) == 1 and not l1.sent


def test_core_refuses_undeclared_destinations() -> None:
    core, _ = _core()
    _agent(core, "n1", "ipv4=10.0.0.1")
    flink = FakeLink()
    f = core.add_frontend(flink, "grpc")
    core.dial(f, 7, "tcp", "10.0.0.99:22")
    (rsp,) = flink.take()
    assert rsp.dialResponse.random == 7 and ERR_NO_AGENT in rsp.dialResponse.error
    # without only_declared the default strategy picks any agent, as upstream does
    core2, _ = _core(only_declared=False)
    _, link2 = _agent(core2, "n1", "ipv4=10.0.0.1")
    core2.dial(core2.add_frontend(FakeLink(), "grpc"), 7, "tcp", "10.0.0.99:22")
    assert len(link2.take()) == 1


def test_core_prefers_non_draining_agents() -> None:
    core, _ = _core()
    a1, l1 = _agent(core, "n1", "host=node")
    _a2, l2 = _agent(core, "n2", "host=node")
    core.from_agent(a1, P.drain())
    f = core.add_frontend(FakeLink(), "grpc")
    for i in range(20):
        core.dial(f, i, "tcp", "node:1")
    assert not l1.sent and len(l2.sent) == 20


def test_core_fails_pending_dials_fast_when_the_agent_drops() -> None:
    core, _ = _core()
    agent, _alink = _agent(core, "n1", "ipv4=10.0.0.1")
    flink = FakeLink()
    f = core.add_frontend(flink, "grpc")
    core.dial(f, 1, "tcp", "10.0.0.1:1")
    core.remove_agent(agent)
    (rsp,) = flink.take()
    assert rsp.dialResponse.random == 1 and ERR_AGENT_GONE in rsp.dialResponse.error
    core.dial(f, 2, "tcp", "10.0.0.1:1")
    assert ERR_NO_AGENT in flink.take()[0].dialResponse.error


def test_core_dial_timeout_tells_both_sides() -> None:
    core, timers = _core()
    _, alink = _agent(core, "n1", "ipv4=10.0.0.1")
    flink = FakeLink()
    f = core.add_frontend(flink, "grpc")
    core.dial(f, 1, "tcp", "10.0.0.1:1")
    (req,) = alink.take()
    timers.fire_all()
    assert flink.take()[0].dialResponse.error == ERR_DIAL_TIMEOUT
    assert alink.take() == [P.close_dial(req.dialRequest.random)]
    # a late answer is cleaned up
    core.from_agent(core.agents["n1"][0], P.dial_response(req.dialRequest.random, connect_id=9))
    assert alink.take() == [P.close_request(9)]
    assert not flink.sent


def _established(core: ProxyCore, f: Any, flink: FakeLink, agent: Any, alink: FakeLink, frandom: int,
                 agent_cid: int) -> int:
    core.dial(f, frandom, "tcp", "10.0.0.1:1")
    (req,) = alink.take()
    core.from_agent(agent, P.dial_response(req.dialRequest.random, connect_id=agent_cid))
    (rsp,) = flink.take()
    return int(rsp.dialResponse.connectID)


def test_core_upstream_agent_reconnect_takes_over_after_the_grace_period() -> None:
    core, timers = _core()
    old, old_link = _agent(core, "n1", "ipv4=10.0.0.1")
    flink = FakeLink()
    f = core.add_frontend(flink, "grpc")
    cid = _established(core, f, flink, old, old_link, 1, 3)
    new, new_link = _agent(core, "n1", "ipv4=10.0.0.1")  # no kplane metadata: could be a duplicate probe
    core.dial(f, 2, "tcp", "10.0.0.1:1")
    assert len(old_link.take()) == 1 and not new_link.sent  # the established stream keeps the dials for now
    core.from_agent(old, P.data(3, b"still here"))
    assert flink.take() == [P.data(cid, b"still here")]
    timers.pending = [t for t in timers.pending if t[0] == core.replace_grace]
    timers.fire_all()  # the new stream outlived the grace period: it is the agent's stream now
    assert old_link.closed and "replaced" in old_link.closed
    assert core.agents["n1"] == [new]
    assert P.close_response(cid, ERR_AGENT_GONE) in flink.take()
    core.from_agent(old, P.data(3, b"late"))  # the old stream is dead to the relay
    assert not flink.sent
    core.dial(f, 3, "tcp", "10.0.0.1:1")
    assert len(new_link.take()) == 1


def test_core_short_lived_duplicate_stream_leaves_the_established_one_alone() -> None:
    # an agent probing a load balancer connects again, sees a serverid it holds, and closes the duplicate
    core, timers = _core()
    first, first_link = _agent(core, "n1", "ipv4=10.0.0.1")
    dup, dup_link = _agent(core, "n1", "ipv4=10.0.0.1")
    core.dial(core.add_frontend(FakeLink(), "grpc"), 1, "tcp", "10.0.0.1:1")
    assert len(first_link.take()) == 1 and not dup_link.sent
    core.remove_agent(dup)
    timers.pending = [t for t in timers.pending if t[0] == core.replace_grace]
    timers.fire_all()
    assert first_link.closed is None and core.agents["n1"] == [first]


def test_core_kplane_agent_reconnect_takes_over_at_once_without_killing_anything() -> None:
    core, _ = _core()
    old, old_link = _agent(core, "n1", "ipv4=10.0.0.1")
    flink = FakeLink()
    f = core.add_frontend(flink, "grpc")
    _established(core, f, flink, old, old_link, 1, 3)
    new_link = FakeLink()
    new = core.add_agent("n1", AgentIdentifiers.parse("ipv4=10.0.0.1"), "system:node:n1", new_link, None,
                         replaces=True)
    core.dial(f, 2, "tcp", "10.0.0.1:1")
    assert len(new_link.take()) == 1 and not old_link.sent and old_link.closed is None
    # two attempts raced and the agent kept the older one: dials fall back to it
    core.remove_agent(new)
    core.dial(f, 3, "tcp", "10.0.0.1:1")
    assert len(old_link.take()) == 1


def test_core_bounds_streams_per_agent() -> None:
    core, _ = _core()
    links = [_agent(core, "n1", "ipv4=10.0.0.1")[1] for _ in range(6)]
    assert len(core.agents["n1"]) == 4
    assert [bool(link.closed) for link in links] == [True, True, False, False, False, False]


def test_core_answers_agent_packets_for_unknown_connections() -> None:
    core, _ = _core()
    agent, alink = _agent(core, "n1", "ipv4=10.0.0.1")
    core.from_agent(agent, P.data(77, b"x"))
    core.from_agent(agent, P.dial_response(12345, connect_id=5))
    core.from_agent(agent, P.dial_request("10.0.0.1:1", 1))  # agents don't dial servers
    core.from_agent(agent, pb.Packet(type=pb.DATA))  # malformed
    assert alink.take() == [P.close_request(77), P.close_request(5)]
    assert core.stats["agent_bad_packet"] == 1 and core.stats["agent_unexpected_packet"] == 1


def test_core_frontends_cannot_touch_each_others_connections() -> None:
    core, _ = _core()
    agent, alink = _agent(core, "n1", "ipv4=10.0.0.1")
    fa, fb = FakeLink(), FakeLink()
    a = core.add_frontend(fa, "grpc")
    b = core.add_frontend(fb, "grpc")
    core.dial(a, 1, "tcp", "10.0.0.1:1")
    core.from_agent(agent, P.dial_response(alink.take()[0].dialRequest.random, connect_id=3))
    assert core.frontend_data(b, 1, b"steal") == -1
    assert not core.frontend_close(b, 1)
    core.cancel_dial(b, 1)
    assert not alink.sent


def test_core_windowed_agent_flow_control() -> None:
    core, _ = _core(window=1000)
    agent, alink = _agent(core, "n1", "ipv4=10.0.0.1", window=2000)
    flink = FakeLink()
    f = core.add_frontend(flink, "grpc")
    core.dial(f, 1, "tcp", "10.0.0.1:1")
    core.from_agent(agent, P.dial_response(alink.take()[0].dialRequest.random, connect_id=3))
    flink.take()
    # toward the agent: at most its announced 2000 bytes until it grants more
    assert core.frontend_data(f, 1, b"x" * 5000) == 2000
    assert core.frontend_data(f, 1, b"x") == 0
    alink.take()
    core.from_agent(agent, P.window_update(3, 500))
    assert 1 in flink.woken
    assert core.frontend_data(f, 1, b"x" * 5000) == 500
    # from the agent: our window is 1000; consuming half of it grants it back
    core.from_agent(agent, P.data(3, b"y" * 600))
    flink.take()
    alink.take()
    core.frontend_consumed(f, 1, 600)
    assert alink.take() == [P.window_update(3, 600)]
    # an agent that overruns the window loses that connection, not the stream
    core.from_agent(agent, P.data(3, b"y" * 1001))
    assert alink.take() == [P.close_request(3)]
    assert flink.take()[-1].type == PacketType.CLOSE_RSP
    assert not alink.closed


def test_core_unwindowed_agent_gets_local_credit_and_its_stream_held_while_a_frontend_lags() -> None:
    core, timers = _core(window=1000, buffer_limit=100, stall_timeout=3.0)
    agent, alink = _agent(core, "n1", "ipv4=10.0.0.1", window=None)  # an upstream agent
    flink = FakeLink()
    f = core.add_frontend(flink, "grpc")
    core.dial(f, 1, "tcp", "10.0.0.1:1")
    core.from_agent(agent, P.dial_response(alink.take()[0].dialRequest.random, connect_id=3))
    flink.take()
    n = core.frontend_data(f, 1, b"x" * (2 << 20))
    assert 0 < n < (2 << 20)
    (pkt,) = alink.take()
    core.agent_sent_data(agent, pkt.data.connectID, len(pkt.data.data))  # written to gRPC: credit back
    assert core.frontend_data(f, 1, b"x") == 1
    assert alink.take() == [P.data(3, b"x")]
    timers.pending.clear()  # the dial's timeout
    core.from_agent(agent, P.data(3, b"y" * 100))
    assert not alink.paused
    core.from_agent(agent, P.data(3, b"y"))  # the frontend has not written these out yet: over the limit
    assert alink.paused and alink.take() == []  # nothing is refused or closed, the agent's stream waits
    assert [p.data.data for p in flink.take()] == [b"y" * 100, b"y"]
    core.frontend_consumed(f, 1, 1)
    assert not alink.paused  # back at the limit: read on
    core.from_agent(agent, P.data(3, b"z" * 50))
    assert alink.paused
    (_, _, cancelled), (delay, fire, _) = timers.pending
    assert cancelled[0] and delay == 3.0  # the first hold's timer went with it; this one is running
    fire()  # the frontend took nothing more for stall_timeout
    assert alink.take() == [P.close_request(3)] and not alink.paused
    assert flink.take()[-1] == P.close_response(1, "its reader stayed over 100 bytes behind for 3 s")
    assert core.stats["conn_stalled"] == 1
    assert core.frontend_consumed(f, 1, 10) is None


def test_core_a_held_stream_is_let_go_when_its_connection_closes() -> None:
    core, _ = _core(window=1000, buffer_limit=10)
    agent, alink = _agent(core, "n1", "ipv4=10.0.0.1", window=None)
    f = core.add_frontend(FakeLink(), "grpc")
    core.dial(f, 1, "tcp", "10.0.0.1:1")
    core.from_agent(agent, P.dial_response(alink.take()[0].dialRequest.random, connect_id=3))
    core.from_agent(agent, P.data(3, b"y" * 11))
    assert alink.paused
    core.from_agent(agent, P.close_response(3))  # the target closed: its buffered bytes go, and so does the hold
    assert not alink.paused


def test_core_removing_a_frontend_cleans_up_at_the_agent() -> None:
    core, _ = _core()
    agent, alink = _agent(core, "n1", "ipv4=10.0.0.1")
    f = core.add_frontend(FakeLink(), "grpc")
    core.dial(f, 1, "tcp", "10.0.0.1:1")
    core.dial(f, 2, "tcp", "10.0.0.1:2")
    r1, r2 = (p.dialRequest.random for p in alink.take())
    core.from_agent(agent, P.dial_response(r1, connect_id=8))
    core.remove_frontend(f)
    assert alink.take() == [P.close_dial(r2), P.close_request(8)]


def test_core_bounds_and_validation() -> None:
    core, _ = _core()
    _agent(core, "n1", "ipv4=10.0.0.1")
    flink = FakeLink()
    f = core.add_frontend(flink, "grpc")
    core.dial(f, 1, "udp", "10.0.0.1:1")
    core.dial(f, 2, "tcp", "not an address")
    for i in range(300):
        core.dial(f, 100 + i, "tcp", "10.0.0.1:1")
    core.dial(f, 100, "tcp", "10.0.0.1:1")
    errs = [p.dialResponse.error for p in flink.take()]
    assert "unsupported protocol" in errs[0] and "invalid address" in errs[1]
    assert errs.count("too many pending dials") == 300 - 256 and errs[-1] == "duplicate dial id"
    with pytest.raises(ValueError):
        ProxyCore(strategies=("destCIDRx",))


# --------------------------------------------------------------------------------------------------
# agent authorization
# --------------------------------------------------------------------------------------------------


async def _owned(node: str) -> list[str]:
    return {"n1": ["10.0.0.1", "fd00::1", "10.42.1.0/24"]}.get(node, [])


NODE1 = Identity(user="system:node:n1", groups=("system:nodes", "system:authenticated"))


@pytest.mark.parametrize(("ident", "agent_id", "ids"), [
    (NODE1, "n1", ""),
    (NODE1, "n1", "host=n1&ipv4=10.0.0.1&ipv6=fd00::1&cidr=10.42.1.128/25"),
    (Identity(user="system:serviceaccount:kube-system:konnectivity-agent",
              extra={"authentication.kubernetes.io/node-name": ("n1",)}, method="token"), "n1", "ipv4=10.0.0.1"),
    (Identity(user="system:serviceaccount:kube-system:konnectivity-agent", method="token"), "anything", ""),
])
async def test_authorizer_allows(ident: Identity, agent_id: str, ids: str) -> None:
    await NodeAgentAuthorizer(node_addresses=_owned)(AgentClaim(ident, agent_id, AgentIdentifiers.parse(ids)))


@pytest.mark.parametrize(("ident", "agent_id", "ids", "why"), [
    (NODE1, "n2", "", "does not match"),
    (NODE1, "n1", "ipv4=10.0.0.2", "does not own"),
    (NODE1, "n1", "host=n2", "does not own"),
    (NODE1, "n1", "cidr=10.42.0.0/16", "does not own"),
    (NODE1, "n1", "default-route=true", "default-route"),
    (Identity(user="system:node:n1"), "n1", "", "may not connect"),  # not in system:nodes
    (Identity(user="alice", groups=("system:masters",)), "n1", "", "may not connect"),
    (Identity(user="system:serviceaccount:kube-system:konnectivity-agent", method="token"), "n1", "ipv4=10.0.0.1",
     "not bound to a node"),
    (Identity(user="system:serviceaccount:default:default", method="token"), "n1", "", "may not connect"),
])
async def test_authorizer_refuses(ident: Identity, agent_id: str, ids: str, why: str) -> None:
    with pytest.raises(AgentRejected, match=why):
        await NodeAgentAuthorizer(node_addresses=_owned)(AgentClaim(ident, agent_id, AgentIdentifiers.parse(ids)))


async def test_authorizer_without_node_addresses_only_allows_the_node_name() -> None:
    auth = NodeAgentAuthorizer()
    await auth(AgentClaim(NODE1, "n1", AgentIdentifiers.parse("host=n1")))
    with pytest.raises(AgentRejected):
        await auth(AgentClaim(NODE1, "n1", AgentIdentifiers.parse("ipv4=10.0.0.1")))


@pytest.mark.parametrize(("status", "ok"), [
    ({"authenticated": True, "user": {"username": "u", "groups": ["g"]}, "audiences": ["system:konnectivity-server"]},
     True),
    ({"authenticated": True, "user": {"username": "u"}}, True),
    ({"authenticated": False, "error": ""}, False),
    ({"authenticated": True, "user": {"username": "u"}, "audiences": ["api"]}, False),
    ({"authenticated": True, "user": {}}, False),
    ({"error": "token expired"}, False),
])
async def test_token_review_outcomes(status: dict[str, Any], ok: bool) -> None:
    seen: list[Any] = []

    async def reviewer(token: str, audiences: Any) -> dict[str, Any]:
        seen.append((token, list(audiences)))
        return status

    if ok:
        ident = await identity_from_token(reviewer, "tok", "system:konnectivity-server")
        assert ident.user == "u" and ident.method == "token"
    else:
        with pytest.raises(AgentRejected):
            await identity_from_token(reviewer, "tok", "system:konnectivity-server")
    assert seen == [("tok", ["system:konnectivity-server"])]
