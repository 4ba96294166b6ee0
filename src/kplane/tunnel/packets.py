"""Konnectivity packets, metadata and addresses, sans I/O.

The wire messages are the generated ``konnectivity_pb2`` classes (our own ``konnectivity.proto`` with upstream's
names and field numbers). This module adds what both ends need around them:

- constructors for every packet type, and :func:`check` which says whether a packet's payload matches its type
  (a ``DATA`` packet without a ``data`` payload is a protocol violation, not an empty write);
- the gRPC metadata keys (lowercase on the wire: grpcio refuses uppercase keys, Go peers read them
  case-insensitively);
- :class:`AgentIdentifiers`, the URL-query string an agent declares (``host=``, ``ipv4=``, ``ipv6=``, ``cidr=``,
  ``default-route=``), and what "this agent declared that destination" means;
- ``host:port`` parsing and :class:`AddressPolicy`, the agent's list of destinations it agrees to dial.

Theory of operation (one tunnelled TCP connection): the dialer sends ``DIAL_REQ{address, random}``; the agent
answers ``DIAL_RSP{random, connectID}`` (or ``error``); bytes flow as ``DATA{connectID, data}`` both ways; either
``CLOSE_REQ{connectID}`` → ``CLOSE_RSP{connectID}`` or an unsolicited ``CLOSE_RSP`` when the remote end closes.
``DIAL_CLS{random}`` cancels a dial that has no answer yet; an agent sends ``DRAIN`` when it is going away.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlencode

from google.protobuf.message import DecodeError

from kplane.tunnel import konnectivity_pb2 as pb

Packet = pb.Packet

# --------------------------------------------------------------------------------------------------
# gRPC metadata (request metadata from the agent, response headers from the server)
# --------------------------------------------------------------------------------------------------

MD_AGENT_ID = "agentid"
MD_AGENT_IDENTIFIERS = "agentidentifiers"
MD_AUTHORIZATION = "authorization"
MD_SERVER_ID = "serverid"
MD_SERVER_COUNT = "servercount"
# kplane extension: "I understand KPLANE_WINDOW_UPDATE; you may send me this many bytes per connection before
# waiting for a window update". Both ends must send it for the extension to be used.
MD_WINDOW = "kplane-window-v1"
# kplane extension: the serverids the agent holds live streams to (comma-separated, possibly empty). Its presence
# says "this is kplane's agent": a server it lists answers with its headers and ends the stream (a duplicate from
# load-balancer discovery); a server it does not list knows the agent's older streams to it are dead.
MD_HELD_SERVERS = "kplane-held-servers"

BEARER_PREFIX = "Bearer "
TOKEN_AUDIENCE = "system:konnectivity-server"

# Upper bounds for things a peer controls.
MAX_ADDRESS = 300  # "host:port"; a DNS name is at most 253 characters
MAX_IDENTIFIERS = 4096  # the agentidentifiers header
MAX_AGENT_ID = 253


class PacketType(enum.IntEnum):
    DIAL_REQ = pb.DIAL_REQ
    DIAL_RSP = pb.DIAL_RSP
    CLOSE_REQ = pb.CLOSE_REQ
    CLOSE_RSP = pb.CLOSE_RSP
    DATA = pb.DATA
    DIAL_CLS = pb.DIAL_CLS
    DRAIN = pb.DRAIN
    KPLANE_WINDOW_UPDATE = pb.KPLANE_WINDOW_UPDATE


# which oneof payload each type carries
PAYLOAD_FOR_TYPE: dict[int, str] = {
    PacketType.DIAL_REQ: "dialRequest",
    PacketType.DIAL_RSP: "dialResponse",
    PacketType.CLOSE_REQ: "closeRequest",
    PacketType.CLOSE_RSP: "closeResponse",
    PacketType.DATA: "data",
    PacketType.DIAL_CLS: "closeDial",
    PacketType.DRAIN: "drain",
    PacketType.KPLANE_WINDOW_UPDATE: "windowUpdate",
}


class PacketError(ValueError):
    """A packet that cannot be decoded or whose payload does not match its type (the peer's fault)."""


def type_name(packet: Packet) -> str:
    try:
        return PacketType(packet.type).name
    except ValueError:
        return f"UNKNOWN({packet.type})"


def check(packet: Packet) -> None:
    """Raise :class:`PacketError` unless ``packet`` has a known type and the payload that type needs.

    ``DRAIN`` is accepted without a payload: upstream's tests send ``Packet{Type: DRAIN}`` bare."""
    want = PAYLOAD_FOR_TYPE.get(packet.type)
    if want is None:
        raise PacketError(f"unknown packet type {packet.type}")
    got = packet.WhichOneof("payload")
    if got != want and not (packet.type == PacketType.DRAIN and got is None):
        raise PacketError(f"{type_name(packet)} packet carries payload {got!r}, want {want!r}")


def decode(data: bytes) -> Packet:
    p = Packet()
    try:
        p.ParseFromString(data)
    except DecodeError as e:
        raise PacketError(f"undecodable packet: {e}") from e
    return p


def encode(packet: Packet) -> bytes:
    return packet.SerializeToString()


def dial_request(address: str, random: int, protocol: str = "tcp") -> Packet:
    return Packet(type=pb.DIAL_REQ, dialRequest=pb.DialRequest(protocol=protocol, address=address, random=random))


def dial_response(random: int, connect_id: int = 0, error: str = "") -> Packet:
    return Packet(type=pb.DIAL_RSP, dialResponse=pb.DialResponse(error=error, connectID=connect_id, random=random))


def data(connect_id: int, payload: bytes, error: str = "") -> Packet:
    return Packet(type=pb.DATA, data=pb.Data(connectID=connect_id, error=error, data=payload))


# --------------------------------------------------------------------------------------------------
# DATA without the protobuf runtime: the byte-moving path encodes and parses its packets directly
# --------------------------------------------------------------------------------------------------

# type = DATA (field 1, varint 4), then the data payload (field 4, length-delimited)
_DATA_HEAD = b"\x08\x04\x22"
_U64 = (1 << 64) - 1


def _varint(n: int) -> bytes:
    """Protobuf varint of ``n`` (an int64: a negative value is its 64-bit two's complement, ten bytes)."""
    n &= _U64
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def encode_data(connect_id: int, chunks: Sequence[bytes | memoryview]) -> bytes:
    """The wire bytes of ``DATA{connectID, data = the chunks joined}``, exactly what protobuf writes for
    :func:`data` (fields in number order, zero and empty fields left out), with one copy of the payload."""
    size = sum(len(c) for c in chunks)
    inner = b"\x08" + _varint(connect_id) if connect_id else b""
    if size:
        inner += b"\x1a" + _varint(size)
    return b"".join((_DATA_HEAD, _varint(len(inner) + size), inner, *chunks))


def _read_varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    """(value, next position); (-1, pos) when ``buf[pos:end]`` does not start with a varint of at most 64 bits."""
    value = shift = 0
    while pos < end and shift < 64:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return (value, pos) if value <= _U64 else (-1, pos)
        shift += 7
    return -1, pos


def parse_data(msg: bytes) -> tuple[int, memoryview] | None:
    """``(connectID, payload)`` if ``msg`` is a DATA packet in the layout protobuf writes (type, then
    ``data{connectID, data}``, nothing else); the payload is a view into ``msg``, not a copy. None for anything
    else, including other valid encodings of a DATA packet: those go through :func:`decode`."""
    end = len(msg)
    if msg[:3] != _DATA_HEAD:
        return None
    n, pos = _read_varint(msg, 3, end)
    if n < 0 or pos + n != end:
        return None
    cid = 0
    if pos < end and msg[pos] == 0x08:
        cid, pos = _read_varint(msg, pos + 1, end)
        if cid < 0:
            return None
        if cid >= 1 << 63:
            cid -= 1 << 64
    if pos == end:
        return cid, memoryview(b"")
    if msg[pos] != 0x1A:
        return None
    n, pos = _read_varint(msg, pos + 1, end)
    if n < 0 or pos + n != end:
        return None
    return cid, memoryview(msg)[pos:end]


def close_request(connect_id: int) -> Packet:
    return Packet(type=pb.CLOSE_REQ, closeRequest=pb.CloseRequest(connectID=connect_id))


def close_response(connect_id: int, error: str = "") -> Packet:
    return Packet(type=pb.CLOSE_RSP, closeResponse=pb.CloseResponse(error=error, connectID=connect_id))


def close_dial(random: int) -> Packet:
    return Packet(type=pb.DIAL_CLS, closeDial=pb.CloseDial(random=random))


def drain() -> Packet:
    return Packet(type=pb.DRAIN, drain=pb.Drain())


def window_update(connect_id: int, nbytes: int) -> Packet:
    return Packet(type=pb.KPLANE_WINDOW_UPDATE, windowUpdate=pb.WindowUpdate(connectID=connect_id, bytes=nbytes))


# --------------------------------------------------------------------------------------------------
# addresses
# --------------------------------------------------------------------------------------------------

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?$")


def parse_ip(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def normalize_host(host: str) -> str:
    """Canonical form of a host for comparisons: an IP in its compressed form, a name lowercased without
    a trailing dot. Raises ValueError for something that is neither."""
    h = host.strip()
    if h.startswith("[") and h.endswith("]"):
        h = h[1:-1]
    ip = parse_ip(h)
    if ip is not None:
        return str(ip)
    h = h.rstrip(".").lower()
    if not _HOSTNAME.match(h):
        raise ValueError(f"invalid host {host!r}")
    return h


def split_host_port(address: str) -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port`` for IPv6) into a normalized host and a port in 1..65535."""
    if not address or len(address) > MAX_ADDRESS or any(c.isspace() or ord(c) < 0x20 for c in address):
        raise ValueError(f"invalid address {address[:MAX_ADDRESS]!r}")
    if address.startswith("["):
        end = address.find("]")
        if end < 0 or address[end + 1 : end + 2] != ":":
            raise ValueError(f"invalid address {address!r}")
        host, port_s = address[1:end], address[end + 2 :]
        if parse_ip(host) is None or ":" not in host:
            raise ValueError(f"invalid IPv6 address {address!r}")
    else:
        host, sep, port_s = address.rpartition(":")
        if not sep or ":" in host:
            raise ValueError(f"invalid address {address!r} (want host:port)")
    if not port_s.isdigit() or not 0 < int(port_s) < 65536:
        raise ValueError(f"invalid port in {address!r}")
    return normalize_host(host), int(port_s)


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --------------------------------------------------------------------------------------------------
# agent identifiers
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AgentIdentifiers:
    """What an agent says it serves (the ``agentidentifiers`` header, a URL query string)."""

    hosts: tuple[str, ...] = ()
    ipv4: tuple[str, ...] = ()
    ipv6: tuple[str, ...] = ()
    cidrs: tuple[str, ...] = ()
    default_route: bool = False
    _networks: tuple[IPNetwork, ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_networks", tuple(ipaddress.ip_network(c, strict=False) for c in self.cidrs))

    @classmethod
    def parse(cls, text: str) -> AgentIdentifiers:
        """Parse ``host=a&ipv4=1.2.3.4&cidr=10.0.0.0/24&default-route=true``. Unknown keys are ignored (as
        upstream's server does, for version skew); a malformed value of a known key raises ValueError."""
        if len(text) > MAX_IDENTIFIERS:
            raise ValueError("agent identifiers too long")
        hosts: list[str] = []
        v4: list[str] = []
        v6: list[str] = []
        cidrs: list[str] = []
        default_route: bool | None = None
        try:
            pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=bool(text), max_num_fields=256)
        except ValueError as e:
            raise ValueError(f"malformed agent identifiers: {e}") from e
        for key, value in pairs:
            if key == "host":
                hosts.append(normalize_host(value))
            elif key == "ipv4":
                ip = parse_ip(value)
                if not isinstance(ip, ipaddress.IPv4Address):
                    raise ValueError(f"invalid ipv4 identifier {value!r}")
                v4.append(str(ip))
            elif key == "ipv6":
                ip = parse_ip(value)
                if not isinstance(ip, ipaddress.IPv6Address):
                    raise ValueError(f"invalid ipv6 identifier {value!r}")
                v6.append(str(ip))
            elif key == "cidr":
                try:
                    cidrs.append(str(ipaddress.ip_network(value, strict=False)))
                except ValueError as e:
                    raise ValueError(f"invalid cidr identifier {value!r}") from e
            elif key == "default-route" and default_route is None:
                default_route = _parse_bool(value)
        return cls.of(hosts=hosts, ipv4=v4, ipv6=v6, cidrs=cidrs, default_route=bool(default_route))

    @classmethod
    def of(cls, *, hosts: Iterable[str] = (), ipv4: Iterable[str] = (), ipv6: Iterable[str] = (),
           cidrs: Iterable[str] = (), default_route: bool = False) -> AgentIdentifiers:
        c = tuple(dict.fromkeys(str(ipaddress.ip_network(x, strict=False)) for x in cidrs))
        return cls(
            hosts=tuple(dict.fromkeys(normalize_host(h) for h in hosts)),
            ipv4=tuple(dict.fromkeys(ipv4)),
            ipv6=tuple(dict.fromkeys(ipv6)),
            cidrs=c,
            default_route=default_route,
        )

    def format(self) -> str:
        pairs = [("host", h) for h in self.hosts] + [("ipv4", a) for a in self.ipv4]
        pairs += [("ipv6", a) for a in self.ipv6] + [("cidr", c) for c in self.cidrs]
        if self.default_route:
            pairs.append(("default-route", "true"))
        return urlencode(pairs)

    def addresses(self) -> tuple[str, ...]:
        """Every host, IP and CIDR declared (what an authorizer has to vouch for)."""
        return self.hosts + self.ipv4 + self.ipv6 + self.cidrs

    def matches_host(self, host: str) -> bool:
        """The ``destHost`` strategy: ``host`` (normalized) is one of the declared host/ipv4/ipv6 values."""
        return host in self.hosts or host in self.ipv4 or host in self.ipv6

    def matches_cidr(self, host: str) -> bool:
        ip = parse_ip(host)
        return ip is not None and any(ip in n for n in self._networks)

    def covers(self, host: str) -> bool:
        """The agent declared ``host``: exactly, inside one of its CIDRs, or by being a default route."""
        return self.default_route or self.matches_host(host) or self.matches_cidr(host)


def _parse_bool(value: str) -> bool:
    v = value.strip().lower()
    if v in ("1", "t", "true"):
        return True
    if v in ("0", "f", "false", ""):
        return False
    raise ValueError(f"invalid boolean {value!r}")


# --------------------------------------------------------------------------------------------------
# the agent's own policy: which destinations it agrees to dial
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AddressPolicy:
    """Destinations an agent may dial. Entries: ``*`` (anything), an IP, a CIDR, a host name (exact, no DNS
    games: a name is allowed only if listed), each optionally with ``:port`` (``[v6]:port`` for IPv6
    addresses; a CIDR takes no port)."""

    anything: bool = False
    hosts: frozenset[tuple[str, int | None]] = frozenset()
    networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def parse(cls, entries: Iterable[str]) -> AddressPolicy:
        anything = False
        hosts: set[tuple[str, int | None]] = set()
        nets: list[IPNetwork] = []
        for raw in entries:
            e = raw.strip()
            if not e:
                continue
            if e == "*":
                anything = True
            elif "/" in e:
                nets.append(ipaddress.ip_network(e, strict=False))
            elif parse_ip(e.strip("[]")) is not None:
                hosts.add((normalize_host(e), None))
            elif e.count(":") == 1 or e.startswith("["):
                hosts.add(split_host_port(e))
            else:
                hosts.add((normalize_host(e), None))
        return cls(anything=anything, hosts=frozenset(hosts), networks=tuple(nets))

    @classmethod
    def from_identifiers(cls, ids: AgentIdentifiers) -> AddressPolicy:
        """Default policy: exactly what the agent declares (a default route alone allows nothing)."""
        return cls.parse(ids.hosts + ids.ipv4 + ids.ipv6 + ids.cidrs)

    def allows(self, host: str, port: int) -> bool:
        if self.anything:
            return True
        h = normalize_host(host)
        if (h, None) in self.hosts or (h, port) in self.hosts:
            return True
        ip = parse_ip(h)
        return ip is not None and any(ip in n for n in self.networks)
