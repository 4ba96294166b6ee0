"""kube-proxy without I/O: the model built from API objects, the nft and iptables-restore text rendered from it
(byte for byte), what is refused, and the health state."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kplane.proxy import iptables, nftables
from kplane.proxy.conntrack import StaleFlow, stale_udp_flows
from kplane.proxy.health import Health
from kplane.proxy.model import (
    MAX_ENDPOINTS_PER_PORT,
    Endpoint,
    RuleError,
    ServicePort,
    from_api,
    table_name,
    validate,
)

T = "kplane-proxy-0123abcd"

HEAD = f"""table ip {T}
delete table ip {T}
table ip {T} {{
\tcomment "kplane kube-proxy: ClusterIP services"
"""

FIXED = """\tchain nat-prerouting {
\t\ttype nat hook prerouting priority -100; policy accept;
\t\tjump services
\t}
\tchain nat-output {
\t\ttype nat hook output priority -100; policy accept;
\t\tjump services
\t}
\tchain nat-postrouting {
\t\ttype nat hook postrouting priority 100; policy accept;
\t\tjump masquerading
\t}
\tchain filter-forward {
\t\ttype filter hook forward priority -110; policy accept;
\t\tct state new ip daddr @cluster-ips jump reject-chain
\t}
\tchain filter-output {
\t\ttype filter hook output priority -90; policy accept;
\t\tct state new ip daddr @cluster-ips jump reject-chain
\t}
\tchain hairpin-check {
\t\ttype filter hook prerouting priority -90; policy accept;
\t\tct state new ct status dnat ct original ip daddr @cluster-ips fib daddr . iif oif exists jump mark-for-masquerade
\t}
\tchain services {
\t\tip daddr . meta l4proto . th dport vmap @service-ips
\t}
\tchain reject-chain {
\t\tmeta l4proto tcp reject with tcp reset
\t\treject
\t}
\tchain mark-for-masquerade {
\t\tmeta mark set meta mark or 0x4000
\t}
\tchain masquerading {
\t\tmeta mark & 0x4000 == 0 return
\t\tmeta mark set meta mark xor 0x4000
\t\tmasquerade fully-random
\t}
"""

EXAMPLE = [
    ServicePort("kube-system", "idle", "", "TCP", "172.31.0.9", 443, ()),
    ServicePort("default", "web", "dns", "UDP", "172.31.0.10", 53, (Endpoint("10.1.0.9", 5353),)),
    ServicePort("default", "web", "http", "TCP", "172.31.0.10", 80,
                (Endpoint("10.1.0.10", 8080), Endpoint("10.1.0.9", 8080))),
]


def test_table_name_is_per_node_and_cluster() -> None:
    a = table_name("node-1", "sha256:aa")
    assert re.fullmatch(r"kplane-proxy-[0-9a-f]{8}", a)
    assert a == table_name("node-1", "sha256:aa")
    assert len({a, table_name("node-2", "sha256:aa"), table_name("node-1", "sha256:bb")}) == 3


def test_render_empty_golden() -> None:
    expected = HEAD + """\tset cluster-ips {
\t\ttype ipv4_addr
\t}
\tmap service-ips {
\t\ttype ipv4_addr . inet_proto . inet_service : verdict
\t}
""" + FIXED + "}\n"
    assert nftables.render(T, []) == expected


def test_render_golden() -> None:
    expected = HEAD + """\tset cluster-ips {
\t\ttype ipv4_addr
\t\telements = { 172.31.0.9,
\t\t\t     172.31.0.10 }
\t}
\tmap service-ips {
\t\ttype ipv4_addr . inet_proto . inet_service : verdict
\t\telements = { 172.31.0.10 . tcp . 80 : goto svc-default/web/tcp/80,
\t\t\t     172.31.0.10 . udp . 53 : goto svc-default/web/udp/53 }
\t}
""" + FIXED + """\tchain svc-default/web/tcp/80 {
\t\tnumgen inc mod 2 vmap { 0 : goto svc-default/web/tcp/80/10.1.0.9/8080, 1 : goto svc-default/web/tcp/80/10.1.0.10/8080 }
\t}
\tchain svc-default/web/tcp/80/10.1.0.9/8080 {
\t\tmeta l4proto tcp dnat to 10.1.0.9:8080
\t}
\tchain svc-default/web/tcp/80/10.1.0.10/8080 {
\t\tmeta l4proto tcp dnat to 10.1.0.10:8080
\t}
\tchain svc-default/web/udp/53 {
\t\tnumgen inc mod 1 vmap { 0 : goto svc-default/web/udp/53/10.1.0.9/5353 }
\t}
\tchain svc-default/web/udp/53/10.1.0.9/5353 {
\t\tmeta l4proto udp dnat to 10.1.0.9:5353
\t}
}
"""
    assert nftables.render(T, EXAMPLE) == expected
    # the order of the input does not matter
    assert nftables.render(T, list(reversed(EXAMPLE))) == expected


def test_render_over_an_existing_table_golden() -> None:
    """Over a table that exists: flush its rules and elements, delete the chains of what went away (never the fixed
    ones), then the same definition as from scratch; the table itself is not deleted."""
    existing = ["nat-prerouting", "services", "svc-default/web/tcp/80", "svc-default/web/tcp/80/10.1.0.9/8080",
                "svc-default/gone/tcp/81", "svc-default/gone/tcp/81/10.1.0.7/81",
                "svc-x\ndelete table ip other", "svc-x; flush ruleset", "svc-X/Y"]  # not ours: never written out
    out = nftables.render(T, EXAMPLE, existing=existing)
    head = f"""table ip {T} {{
\tset cluster-ips {{ type ipv4_addr; }}
\tmap service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict; }}
}}
flush table ip {T}
flush set ip {T} cluster-ips
flush map ip {T} service-ips
delete chain ip {T} svc-default/gone/tcp/81
delete chain ip {T} svc-default/gone/tcp/81/10.1.0.7/81
"""
    fresh = nftables.render(T, EXAMPLE)
    assert out == head + fresh.removeprefix(f"table ip {T}\ndelete table ip {T}\n")
    assert f"delete table ip {T}" not in out


def test_chains_in_json() -> None:
    text = json.dumps({"nftables": [
        {"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
        {"table": {"family": "ip", "name": T, "handle": 1}},
        {"chain": {"family": "ip", "table": T, "name": "nat-output", "handle": 2, "type": "nat", "hook": "output"}},
        {"set": {"family": "ip", "name": "cluster-ips", "table": T, "type": "ipv4_addr", "handle": 3}},
        {"chain": {"family": "ip", "table": T, "name": "svc-default/web/tcp/80", "handle": 4}},
        {"rule": {"family": "ip", "table": T, "chain": "nat-output", "handle": 5, "expr": []}},
    ]})
    assert nftables.chains_in_json(text) == ["nat-output", "svc-default/web/tcp/80"]
    for bad in ("", "not json", "[]", '{"nftables": 3}', '{"nftables": [{"chain": {}}]}', '{"x": []}'):
        with pytest.raises(RuleError):
            nftables.chains_in_json(bad)


def test_render_other_mark() -> None:
    out = nftables.render(T, [], mark=0x80000)
    assert "meta mark set meta mark or 0x80000\n" in out and "meta mark & 0x80000 == 0 return\n" in out
    assert "0x4000" not in out


def test_render_delete_golden() -> None:
    assert nftables.render_delete(T) == f"table ip {T}\ndelete table ip {T}\n"


def test_many_endpoints() -> None:
    eps = tuple(Endpoint(f"10.{i // 256}.{i % 256}.1", 80) for i in range(MAX_ENDPOINTS_PER_PORT))
    out = nftables.render(T, [ServicePort("a", "b", "", "TCP", "172.31.0.1", 80, eps)])
    assert f"numgen inc mod {MAX_ENDPOINTS_PER_PORT} vmap" in out
    assert out.count("dnat to") == MAX_ENDPOINTS_PER_PORT
    with pytest.raises(RuleError, match="more than the limit"):
        nftables.render(T, [ServicePort("a", "b", "", "TCP", "172.31.0.1", 80, (*eps, Endpoint("10.99.0.1", 80)))])


BAD_IPS = ["", "1.2.3", "1.2.3.256", "01.2.3.4", "1.2.3.4 ", " 1.2.3.4", "1.2.3.4\n", "::1", "fd00::1", "127.0.0.1",
           "0.0.0.0", "224.0.0.1", "169.254.1.1", "255.255.255.255", "240.0.0.1", "1.2.3.4/32", "1.2.3.4;",
           '1.2.3.4"', "a.b.c.d"]
BAD_PORTS: list[Any] = [0, 65536, -1, 1 << 40, True, "80", 80.0, None]
BAD_NAMES = ["", "Web", "web ", "a_b", "a.b", "-web", "web-", "a" * 64, 'we"b', "we}b", "we{b", "web\n", "we;b",
             "we/b", "we\tb", "wé", "web\x00", "svc } table ip x { chain y {"]


@pytest.mark.parametrize("ip", BAD_IPS)
def test_bad_cluster_ip_refused(ip: str) -> None:
    with pytest.raises(RuleError):
        nftables.render(T, [ServicePort("a", "b", "", "TCP", ip, 80, ())])


@pytest.mark.parametrize("ip", BAD_IPS)
def test_bad_endpoint_ip_refused(ip: str) -> None:
    with pytest.raises(RuleError):
        nftables.render(T, [ServicePort("a", "b", "", "TCP", "172.31.0.1", 80, (Endpoint(ip, 80),))])
    with pytest.raises(RuleError):
        iptables.render("KP-0123abcd-", [ServicePort("a", "b", "", "TCP", "172.31.0.1", 80, (Endpoint(ip, 80),))])


@pytest.mark.parametrize("port", BAD_PORTS)
def test_bad_ports_refused(port: Any) -> None:
    with pytest.raises(RuleError):
        nftables.render(T, [ServicePort("a", "b", "", "TCP", "172.31.0.1", port, ())])
    with pytest.raises(RuleError):
        nftables.render(T, [ServicePort("a", "b", "", "TCP", "172.31.0.1", 80, (Endpoint("10.0.0.1", port),))])


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names_refused(name: str) -> None:
    for sp in (ServicePort(name, "b", "", "TCP", "172.31.0.1", 80, ()),
               ServicePort("a", name, "", "TCP", "172.31.0.1", 80, ())):
        with pytest.raises(RuleError):
            nftables.render(T, [sp])
        with pytest.raises(RuleError):
            iptables.render("KP-0123abcd-", [sp])
    if name:
        with pytest.raises(RuleError):
            nftables.render(T, [ServicePort("a", "b", name, "TCP", "172.31.0.1", 80, ())])


@pytest.mark.parametrize("proto", ["SCTP", "tcp", "TCP ", "", "TCP;", None])
def test_bad_protocol_refused(proto: Any) -> None:
    with pytest.raises(RuleError):
        nftables.render(T, [ServicePort("a", "b", "", proto, "172.31.0.1", 80, ())])


def test_duplicates_refused() -> None:
    ep = Endpoint("10.0.0.1", 80)
    with pytest.raises(RuleError, match="listed twice"):
        validate([ServicePort("a", "b", "", "TCP", "172.31.0.1", 80, (ep, ep))])
    with pytest.raises(RuleError, match="already used by a/b:"):
        validate([ServicePort("a", "b", "", "TCP", "172.31.0.1", 80, ()),
                  ServicePort("a", "c", "", "TCP", "172.31.0.1", 80, ())])
    with pytest.raises(RuleError, match="defined twice"):
        validate([ServicePort("a", "b", "x", "TCP", "172.31.0.1", 80, ()),
                  ServicePort("a", "b", "y", "TCP", "172.31.0.2", 80, ())])
    # the same port number with another protocol, or on another address, is fine
    validate([ServicePort("a", "b", "x", "TCP", "172.31.0.1", 53, ()),
              ServicePort("a", "b", "y", "UDP", "172.31.0.1", 53, ()),
              ServicePort("a", "c", "", "TCP", "172.31.0.2", 53, ())])


def test_wrong_types_refused() -> None:
    with pytest.raises(RuleError):
        validate([("a", "b")])  # type: ignore[list-item]
    with pytest.raises(RuleError):
        validate([ServicePort("a", "b", "", "TCP", "172.31.0.1", 80, [Endpoint("10.0.0.1", 80)])])  # type: ignore[arg-type]
    with pytest.raises(RuleError):
        validate([ServicePort("a", "b", "", "TCP", "172.31.0.1", 80, (("10.0.0.1", 80),))])  # type: ignore[arg-type]


@pytest.mark.parametrize("table", ["", "1abc", "a b", "a;b", 'a"', "a{", "a\n", "x" * 65, "kplane/proxy"])
def test_bad_table_names_refused(table: str) -> None:
    with pytest.raises(RuleError):
        nftables.render(table, [])
    with pytest.raises(RuleError):
        nftables.render_delete(table)


@pytest.mark.parametrize("mark", [0, 3, 0x6000, 1 << 32, -1, True])
def test_bad_marks_refused(mark: int) -> None:
    with pytest.raises(RuleError):
        nftables.render(T, [], mark=mark)


_ALLOWED = re.compile(r'[A-Za-z0-9 \t\n./:{}@;,=&_"\-]*')


@settings(max_examples=300)
@given(ns=st.text(max_size=70), name=st.text(max_size=70), pname=st.text(max_size=20),
       ip=st.one_of(st.text(max_size=20), st.ip_addresses(v=4).map(str)), port=st.integers(-5, 70000),
       ep_ip=st.one_of(st.text(max_size=20), st.ip_addresses(v=4).map(str)), ep_port=st.integers(-5, 70000))
def test_anything_is_refused_or_safe(ns: str, name: str, pname: str, ip: str, port: int, ep_ip: str,
                                     ep_port: int) -> None:
    """Whatever an API user puts in a Service or EndpointSlice: RuleError, or text that cannot leave its place."""
    sp = ServicePort(ns, name, pname, "TCP", ip, port, (Endpoint(ep_ip, ep_port),))
    try:
        out = nftables.render(T, [sp])
    except RuleError:
        return
    label = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
    assert label.fullmatch(ns) and label.fullmatch(name) and (pname == "" or label.fullmatch(pname))
    assert 1 <= port <= 65535 and 1 <= ep_port <= 65535
    assert _ALLOWED.fullmatch(out)
    assert out.count("{") == out.count("}")
    assert out.count('"') == 2  # only the table comment


# --- iptables-restore --------------------------------------------------------------------------------------


def test_iptables_prefix() -> None:
    assert iptables.prefix_for(T) == "KP-0123abcd-"
    for bad in ("kplane-proxy-0123abcX", "kplane-proxy-123", "x"):
        with pytest.raises(RuleError):
            iptables.prefix_for(bad)
    with pytest.raises(RuleError):
        iptables.render("KP-0123abcd", [])
    with pytest.raises(RuleError):
        iptables.render("KP-0123abcd-;", [])


def test_iptables_golden() -> None:
    p = "KP-0123abcd-"
    existing = {"nat": ["PREROUTING", f"{p}SERVICES", f"{p}SVC-GONE", "KP-ffffffff-SVC-OTHER"],
                "filter": [f"{p}CHECK", "FORWARD"]}
    expected = f"""*nat
:{p}SERVICES - [0:0]
:{p}MARK-MASQ - [0:0]
:{p}POSTROUTING - [0:0]
:{p}SVC-6BANVRSQEH - [0:0]
:{p}SEP-CNHKDQ4N24 - [0:0]
:{p}SEP-BQBPZU6CBW - [0:0]
:{p}SVC-WS7VZ2CGRK - [0:0]
:{p}SEP-CHU63MVFXI - [0:0]
:{p}SVC-GONE - [0:0]
-A {p}MARK-MASQ -j MARK --or-mark 0x4000
-A {p}POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A {p}POSTROUTING -j MARK --xor-mark 0x4000
-A {p}POSTROUTING -j MASQUERADE --random-fully
-A {p}SERVICES -d 172.31.0.10/32 -p tcp -m tcp --dport 80 -m comment --comment "default/web:http" -j {p}SVC-6BANVRSQEH
-A {p}SERVICES -d 172.31.0.10/32 -p udp -m udp --dport 53 -m comment --comment "default/web:dns" -j {p}SVC-WS7VZ2CGRK
-A {p}SVC-6BANVRSQEH -m statistic --mode nth --every 2 --packet 0 -j {p}SEP-CNHKDQ4N24
-A {p}SEP-CNHKDQ4N24 -s 10.1.0.9/32 -j {p}MARK-MASQ
-A {p}SEP-CNHKDQ4N24 -p tcp -m tcp -j DNAT --to-destination 10.1.0.9:8080
-A {p}SVC-6BANVRSQEH -j {p}SEP-BQBPZU6CBW
-A {p}SEP-BQBPZU6CBW -s 10.1.0.10/32 -j {p}MARK-MASQ
-A {p}SEP-BQBPZU6CBW -p tcp -m tcp -j DNAT --to-destination 10.1.0.10:8080
-A {p}SVC-WS7VZ2CGRK -j {p}SEP-CHU63MVFXI
-A {p}SEP-CHU63MVFXI -s 10.1.0.9/32 -j {p}MARK-MASQ
-A {p}SEP-CHU63MVFXI -p udp -m udp -j DNAT --to-destination 10.1.0.9:5353
-X {p}SVC-GONE
COMMIT
*filter
:{p}CHECK - [0:0]
-A {p}CHECK -d 172.31.0.9/32 -p tcp -j REJECT --reject-with tcp-reset
-A {p}CHECK -d 172.31.0.9/32 -j REJECT --reject-with icmp-port-unreachable
-A {p}CHECK -d 172.31.0.10/32 -p tcp -j REJECT --reject-with tcp-reset
-A {p}CHECK -d 172.31.0.10/32 -j REJECT --reject-with icmp-port-unreachable
COMMIT
"""
    assert iptables.render(p, EXAMPLE, existing=existing) == expected
    assert iptables.service_chain(p, EXAMPLE[2]) == f"{p}SVC-6BANVRSQEH"
    assert all(len(c) <= 28 for c in re.findall(r"KP-\S+", expected))


def test_iptables_round_robin_of_three() -> None:
    eps = (Endpoint("10.0.0.1", 80), Endpoint("10.0.0.2", 80), Endpoint("10.0.0.3", 80))
    sp = ServicePort("a", "b", "", "TCP", "172.31.0.1", 80, eps)
    out = iptables.render("KP-0123abcd-", [sp])
    svc = iptables.service_chain("KP-0123abcd-", sp)
    picks = [line for line in out.splitlines() if line.startswith(f"-A {svc} ")]
    seps = [iptables.endpoint_chain("KP-0123abcd-", sp, e.ip, e.port) for e in eps]
    assert picks == [f"-A {svc} -m statistic --mode nth --every 3 --packet 0 -j {seps[0]}",
                     f"-A {svc} -m statistic --mode nth --every 2 --packet 0 -j {seps[1]}",
                     f"-A {svc} -j {seps[2]}"]


def test_iptables_cleanup_and_jumps() -> None:
    p = "KP-0123abcd-"
    save = f"# Generated\n*nat\n:PREROUTING ACCEPT [0:0]\n:{p}SERVICES - [0:0]\n:{p}SVC-X - [0:0]\n-A X\nCOMMIT\n"
    assert iptables.chains_in_save(save) == ["PREROUTING", f"{p}SERVICES", f"{p}SVC-X"]
    text = iptables.render_cleanup(p, {"nat": iptables.chains_in_save(save), "filter": [f"{p}CHECK", "INPUT"]})
    assert text == (f"*nat\n:{p}SERVICES - [0:0]\n:{p}SVC-X - [0:0]\n-X {p}SERVICES\n-X {p}SVC-X\nCOMMIT\n"
                    f"*filter\n:{p}CHECK - [0:0]\n-X {p}CHECK\nCOMMIT\n")
    assert iptables.jumps(p) == [
        ("nat", "PREROUTING", ["-j", f"{p}SERVICES"]),
        ("nat", "OUTPUT", ["-j", f"{p}SERVICES"]),
        ("nat", "POSTROUTING", ["-j", f"{p}POSTROUTING"]),
        ("filter", "FORWARD", ["-m", "conntrack", "--ctstate", "NEW", "-j", f"{p}CHECK"]),
        ("filter", "OUTPUT", ["-m", "conntrack", "--ctstate", "NEW", "-j", f"{p}CHECK"]),
    ]


# --- from API objects ---------------------------------------------------------------------------------------


def svc(ns: str, name: str, ip: Any, *ports: dict[str, Any], **spec: Any) -> dict[str, Any]:
    return {"metadata": {"namespace": ns, "name": name},
            "spec": {"clusterIP": ip, "clusterIPs": [ip] if ip else None, "ports": list(ports), **spec}}


def eps(ns: str, name: str, service: str, ports: list[dict[str, Any]], endpoints: list[dict[str, Any]],
        address_type: str = "IPv4") -> dict[str, Any]:
    return {"metadata": {"namespace": ns, "name": name, "labels": {"kubernetes.io/service-name": service}},
            "addressType": address_type, "ports": ports, "endpoints": endpoints}


def test_from_api() -> None:
    services = [
        svc("default", "web", "172.31.0.10", {"name": "http", "port": 80}, {"name": "dns", "port": 53,
                                                                             "protocol": "UDP"}),
        svc("default", "headless", "None", {"port": 80}),
        svc("default", "pending", None, {"port": 80}),
        svc("default", "v6", "fd00::10", {"port": 80}),
        svc("default", "ext", None, {"port": 80}, type="ExternalName", externalName="example.com"),
        svc("default", "sctp", "172.31.0.11", {"name": "s", "port": 9, "protocol": "SCTP"}, {"name": "t", "port": 9}),
        svc("other", "lonely", "172.31.0.12", {"port": 443}),
    ]
    slices = [
        eps("default", "web-1", "web", [{"name": "http", "port": 8080, "protocol": "TCP"}], [
            {"addresses": ["10.1.0.10"], "conditions": {"ready": True}},
            {"addresses": ["10.1.0.9"]},  # ready not set: ready
            {"addresses": ["10.1.0.8"], "conditions": {"ready": False}},
            {"addresses": ["127.0.0.1"]},
        ]),
        eps("default", "web-2", "web", [{"name": "http", "port": 8080}, {"name": "dns", "port": 5353,
                                                                         "protocol": "UDP"}],
            [{"addresses": ["10.1.0.9"]}, {"addresses": ["10.1.0.7", "10.1.0.6"]}]),
        eps("default", "web-v6", "web", [{"name": "http", "port": 8080}], [{"addresses": ["fd00::1"]}], "IPv6"),
        {"metadata": {"namespace": "default", "name": "nolabel"}, "addressType": "IPv4",
         "ports": [{"name": "http", "port": 1}], "endpoints": [{"addresses": ["10.9.9.9"]}]},
        eps("default", "sctp-1", "sctp", [{"name": "t", "port": 99999}], [{"addresses": ["10.1.0.5"]}]),
    ]
    ports, problems = from_api(services, slices)
    assert ports == [
        ServicePort("default", "sctp", "t", "TCP", "172.31.0.11", 9, ()),
        ServicePort("default", "web", "http", "TCP", "172.31.0.10", 80,
                    (Endpoint("10.1.0.7", 8080), Endpoint("10.1.0.9", 8080), Endpoint("10.1.0.10", 8080))),
        ServicePort("default", "web", "dns", "UDP", "172.31.0.10", 53,
                    (Endpoint("10.1.0.7", 5353), Endpoint("10.1.0.9", 5353))),
        ServicePort("other", "lonely", "", "TCP", "172.31.0.12", 443, ()),
    ]
    assert any("127.0.0.1 is not a usable unicast address" in p for p in problems)
    assert any("'SCTP' is not supported" in p for p in problems)
    assert any("99999 is out of range" in p for p in problems)
    nftables.render(T, ports)


def test_from_api_conflicts_and_garbage() -> None:
    services: list[dict[str, Any]] = [
        svc("a", "first", "172.31.0.1", {"port": 80}),
        svc("b", "second", "172.31.0.1", {"port": 80}, {"name": "x", "port": 81}),
        svc("c", "twice", "172.31.0.2", {"name": "a", "port": 80}, {"name": "b", "port": 80}),
        svc("c", "Bad_Name", "172.31.0.3", {"port": 80}),
        svc("c", "badip", "172.31.0.300", {"port": 80}),
        svc("c", "badport", "172.31.0.4", {"port": 0}, {"name": 'x"y', "port": 5}, {"name": "ok", "port": 6}),
        {"metadata": {}, "spec": {}},
        {},
        svc("c", "ports-garbage", "172.31.0.5", "not-a-port"),  # type: ignore[arg-type]
        svc("a", "first", "172.31.0.9", {"port": 80}),  # the same name again (a cache could never hold this)
    ]
    slices: list[dict[str, Any]] = [{}, {"metadata": {"namespace": "a", "labels": {
        "kubernetes.io/service-name": "first"}}, "addressType": "IPv4", "ports": ["x", {"port": 80}],
        "endpoints": ["x", {"addresses": "10.0.0.1"}, {"addresses": []}, {"addresses": ["10.0.0.1"]}]}]
    ports, problems = from_api(services, slices)
    assert [(p.namespace, p.service, p.port_name, p.port) for p in ports] == [
        ("a", "first", "", 80), ("b", "second", "x", 81), ("c", "badport", "ok", 6), ("c", "twice", "a", 80)]
    assert ports[0].endpoints == (Endpoint("10.0.0.1", 80),)
    assert "b/second:: 172.31.0.1 TCP/80 is already used by a/first:" in problems
    assert "c/twice:b: TCP port 80 is defined twice" in problems
    assert "service a/first is listed twice; the first is used" in problems
    assert len(problems) == 7, problems
    nftables.render(T, ports)


def test_from_api_caps_endpoints() -> None:
    n = MAX_ENDPOINTS_PER_PORT + 10
    sl = eps("a", "s", "b", [{"port": 80}], [{"addresses": [f"10.{i // 256}.{i % 256}.1"]} for i in range(n)])
    ports, problems = from_api([svc("a", "b", "172.31.0.1", {"port": 80})], [sl])
    assert len(ports[0].endpoints) == MAX_ENDPOINTS_PER_PORT
    assert problems == [f"a/b:: {n} ready endpoints, only the first {MAX_ENDPOINTS_PER_PORT} used"]


_json = st.recursive(st.none() | st.booleans() | st.integers(-2, 70000) | st.text(max_size=8),
                     lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                     max_leaves=12)


_name = st.sampled_from(["a", "b", "web", "a", "b", "web", "Bad_Name", "", "x" * 64, 7])
_ipish = st.sampled_from(["172.31.0.1", "172.31.0.2", "10.0.0.1", "10.0.0.2", "172.31.0.1", "10.0.0.1", "None", "",
                          "fd00::1", "127.0.0.1", "1.2.3.256", "10.0.0.01", None, 3])
_port = st.sampled_from([53, 80, 8080, 53, 80, 0, 65536, -1, "80", None, True])
_proto = st.sampled_from(["TCP", "UDP", None, "TCP", "UDP", "SCTP", "tcp", 6])
_port_entry = st.fixed_dictionaries({"name": st.sampled_from(["", "", "dns", "http", "Bad!", None]), "port": _port,
                                     "protocol": _proto})
_ports = st.lists(_port_entry | _json, max_size=3)
_svc_ok = st.fixed_dictionaries({
    "metadata": st.fixed_dictionaries({"namespace": _name, "name": _name}),
    "spec": st.fixed_dictionaries({"clusterIP": _ipish, "ports": _ports,
                                   "type": st.sampled_from(["ClusterIP", "ClusterIP", "ExternalName", None])})})
_slice_ok = st.fixed_dictionaries({
    "metadata": st.fixed_dictionaries({"namespace": _name, "name": _name,
                                       "labels": st.fixed_dictionaries({"kubernetes.io/service-name": _name})}),
    "addressType": st.sampled_from(["IPv4", "IPv4", "IPv6", None]),
    "ports": _ports,
    "endpoints": st.lists(st.fixed_dictionaries({
        "addresses": st.lists(_ipish, max_size=2) | _json,
        "conditions": st.fixed_dictionaries({"ready": st.sampled_from([True, None, True, False, "no"])})}) | _json,
        max_size=3)})
# well-formed objects with odd values in them, and now and then anything at all
_svc = st.one_of(_svc_ok, _svc_ok, _svc_ok, _json)
_slice = st.one_of(_slice_ok, _slice_ok, _slice_ok, _json)


@settings(max_examples=300)
@given(services=st.lists(_svc, max_size=5), slices=st.lists(_slice, max_size=5))
def test_from_api_takes_any_objects(services: list[Any], slices: list[Any]) -> None:
    """Whatever the API hands over: no exception, and what comes out always renders."""
    ports, problems = from_api(services, slices)
    assert all(isinstance(p, str) for p in problems)
    nftables.render(T, ports)
    iptables.render("KP-0123abcd-", ports)


_v_port = st.fixed_dictionaries({"name": st.sampled_from(["", "dns", "http"]), "port": st.sampled_from([53, 80]),
                                 "protocol": st.sampled_from(["TCP", "UDP"])})
_v_svc = st.fixed_dictionaries({
    "metadata": st.fixed_dictionaries({"namespace": st.sampled_from(["a", "b"]),
                                       "name": st.sampled_from(["web", "dns", "api"])}),
    "spec": st.fixed_dictionaries({"clusterIP": st.sampled_from(["172.31.0.1", "172.31.0.2", "172.31.0.3"]),
                                   "ports": st.lists(_v_port, min_size=1, max_size=3)})})
_v_slice = st.fixed_dictionaries({
    "metadata": st.fixed_dictionaries({"namespace": st.sampled_from(["a", "b"]), "name": st.text("xyz", max_size=3),
                                       "labels": st.fixed_dictionaries({"kubernetes.io/service-name":
                                                                        st.sampled_from(["web", "dns", "api"])})}),
    "addressType": st.just("IPv4"),
    "ports": st.lists(st.fixed_dictionaries({"name": st.sampled_from(["", "dns", "http"]),
                                             "port": st.sampled_from([53, 8053, 8080]),
                                             "protocol": st.sampled_from(["TCP", "UDP"])}), max_size=3),
    "endpoints": st.lists(st.fixed_dictionaries({
        "addresses": st.lists(st.sampled_from(["10.0.0.1", "10.0.0.2", "10.0.0.3"]), min_size=1, max_size=2),
        "conditions": st.fixed_dictionaries({"ready": st.sampled_from([True, False, None])})}), max_size=4)})


@settings(max_examples=300)
@given(services=st.lists(_v_svc, max_size=6), slices=st.lists(_v_slice, max_size=6))
def test_from_api_conflicts_always_resolved(services: list[Any], slices: list[Any]) -> None:
    """Well-formed objects that collide (same VIP and port, same port twice, several slices): the result always
    renders, and every endpoint is a ready address of a slice of that service with that port name/protocol."""
    ports, _ = from_api(services, slices)
    nftables.render(T, ports)
    for sp in ports:
        for ep in sp.endpoints:
            assert any(
                sl["metadata"]["namespace"] == sp.namespace
                and sl["metadata"]["labels"]["kubernetes.io/service-name"] == sp.service
                and any(p["name"] == sp.port_name and p["protocol"] == sp.protocol and p["port"] == ep.port
                        for p in sl["ports"])
                and any(e["addresses"][0] == ep.ip and e["conditions"]["ready"] is not False for e in sl["endpoints"])
                for sl in slices), (sp, ep)


# --- health -------------------------------------------------------------------------------------------------


def test_health_states() -> None:
    h = Health(stale_after=60)
    code, body = h.response(0.0, 1_700_000_000.0)
    assert code == 503 and json.loads(body)["reason"] == "rules not synced yet"
    h.queued(1.0)
    h.synced(2.0, 1_700_000_002.0, queued_before=1.5)
    code, body = h.response(3.0, 1_700_000_003.0)
    doc = json.loads(body)
    assert code == 200 and doc["healthy"] is True and doc["lastUpdated"] == "2023-11-14T22:13:22.000000Z"
    h.queued(10.0)
    assert h.response(61.0, 0)[0] == 200
    assert h.problem(71.0) == "a change has waited 61s for a sync"
    h.synced(72.0, 0, queued_before=71.0)
    assert h.problem(72.5) is None
    assert h.problem(140.0) == "last successful sync was 68s ago"
    h.failed("nft: permission denied")
    code, body = h.response(73.0, 0)
    assert code == 503 and json.loads(body)["reason"] == "last sync failed: nft: permission denied"
    h.synced(74.0, 0, queued_before=74.0)
    assert h.response(74.0, 0)[0] == 200


def test_health_change_during_sync_stays_queued() -> None:
    h = Health(stale_after=60)
    h.synced(0.0, 0, queued_before=0.0)
    h.queued(5.0)  # arrived while a sync that started at 4.0 was running
    h.synced(6.0, 0, queued_before=4.0)
    assert h.queued_at == 5.0


# --- stale UDP conntrack entries ----------------------------------------------------------------------------


def test_stale_udp_flows() -> None:
    e1, e2, e3 = Endpoint("10.0.0.1", 53), Endpoint("10.0.0.2", 53), Endpoint("10.0.0.3", 53)

    def dns(*eps: Endpoint, vip: str = "172.31.0.10", name: str = "dns") -> ServicePort:
        return ServicePort("kube-system", name, "dns", "UDP", vip, 53, tuple(eps))

    tcp = ServicePort("kube-system", "dns", "tcp", "TCP", "172.31.0.10", 53, (e1,))
    # at start: any VIP port with endpoints may have entries made before the rules (never DNATed)
    assert stale_udp_flows(None, [dns(e1), tcp, dns(vip="172.31.0.11", name="x")]) == [
        StaleFlow("172.31.0.10", 53, None)]
    assert stale_udp_flows([dns(e1, e2)], [dns(e1, e2)]) == []
    assert stale_udp_flows([dns(e1, e2)], [dns(e2, e3)]) == [StaleFlow("172.31.0.10", 53, e1)]
    assert stale_udp_flows([dns()], [dns(e3)]) == [StaleFlow("172.31.0.10", 53, None)]
    assert stale_udp_flows([dns(e1, e2)], []) == [StaleFlow("172.31.0.10", 53, e1), StaleFlow("172.31.0.10", 53, e2)]
    assert stale_udp_flows([dns(e1), tcp], [dns(e1)]) == []  # TCP entries are never touched
