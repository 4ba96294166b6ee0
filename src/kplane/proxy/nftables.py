"""Render service ports as one nft script that replaces the proxy's table in a single transaction (sans-I/O).

Theory of operation (the facts follow upstream kube-proxy's nftables mode; the layout is ours):

* ``nft -f`` runs a whole file as one netlink batch: it commits completely or not at all, and packets see either
  the old ruleset or the new one. When the table already exists (``existing``: the chains it holds), the script
  flushes its rules and its set's and map's elements, deletes the chains of services that went away, and fills it
  again, as upstream does: the base chains, and so their netfilter hooks, stay in place. (Deleting and defining
  the whole table again in one batch replaced the NAT hooks as well; a test opening connections while the table
  was replaced 40 times saw one refused in about one run in fifteen, and none in 30 runs since.) Without
  ``existing`` (the first sync) the script makes sure the table exists, deletes it and defines it from scratch.
* DNAT happens in ``nat`` chains at priority -100 (dstnat) on ``prerouting`` (traffic from pods, bridges and other
  hosts) and ``output`` (host processes and hostNetwork pods). Both jump to ``services``, which looks the packet
  up in the verdict map ``service-ips`` keyed by ``ip daddr . meta l4proto . th dport`` and jumps to the service
  port's chain. That chain picks an endpoint chain with ``numgen inc mod N``: session-free round robin, each new
  connection goes to the next endpoint. (NAT chains only see the first packet of a connection; conntrack does
  the rest, both ways.)
* A service port without ready endpoints has no entry in ``service-ips``, so its packets are not DNATed. Filter
  chains on ``forward`` (-110) and ``output`` (-90, after DNAT) reject every new connection still addressed to one
  of our ClusterIPs (``cluster-ips``): a service port without endpoints, or a port no service defines. TCP gets a
  reset, anything else ICMP port unreachable, so clients fail at once instead of hanging.
* Masquerade, only where replies would otherwise not come back through this node's conntrack: when the chosen
  endpoint is reached through the very interface the connection came in on (``fib daddr . iif oif exists``
  after DNAT). That covers the hairpin case (a pod reaching itself through its service: the reply would come
  from its own address) and two pods on one bridge (the reply would be bridged straight back, skipping the
  un-DNAT). Traffic that crosses interfaces keeps its client address. The decision is made on the first packet
  (``ct state new``) of connections DNATed to one of our ClusterIPs, marked with a bit, and carried out in
  ``postrouting`` (priority 100, srcnat), which clears the bit again.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence

from kplane.proxy.model import RuleError, ServicePort, sorted_endpoints, validate

DEFAULT_MASQUERADE_MARK = 0x4000
_TABLE_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")


def check_table(table: str) -> str:
    if not (isinstance(table, str) and 1 <= len(table) <= 64 and table[0].isalpha() and set(table) <= _TABLE_CHARS):
        raise RuleError(f"table name {table!r} must be a letter then letters, digits, '-' or '_' (at most 64)")
    return table


def check_mark(mark: int) -> int:
    if isinstance(mark, bool) or not isinstance(mark, int) or mark <= 0 or mark >= 1 << 32 or mark & (mark - 1):
        raise RuleError(f"masquerade mark {mark!r} must be a single bit of a 32-bit mark")
    return mark


def service_chain(sp: ServicePort) -> str:
    return f"svc-{sp.namespace}/{sp.service}/{sp.protocol.lower()}/{sp.port}"


def endpoint_chain(sp: ServicePort, ip: str, port: int) -> str:
    return f"{service_chain(sp)}/{ip}/{port}"


def _key(sp: ServicePort) -> str:
    return f"{sp.cluster_ip} . {sp.protocol.lower()} . {sp.port}"


def _elements(items: Sequence[str]) -> list[str]:
    if not items:
        return []
    return ["\t\telements = { " + ",\n\t\t\t     ".join(items) + " }"]


_OUR_CHAIN = re.compile(r"svc-[a-z0-9.:/-]+")  # what service_chain/endpoint_chain make of validated ports
_CLUSTER_IPS_TYPE = "type ipv4_addr"
_SERVICE_IPS_TYPE = "type ipv4_addr . inet_proto . inet_service : verdict"


def chains_in_json(text: str) -> list[str]:
    """Chain names in the output of ``nft -j list table ip T``."""
    try:
        items = json.loads(text)["nftables"]
        return [i["chain"]["name"] for i in items if isinstance(i, dict) and "chain" in i]
    except (ValueError, KeyError, TypeError) as e:
        raise RuleError(f"unexpected output of nft -j list table: {e}") from None


def render(table: str, ports: Sequence[ServicePort], *, existing: Iterable[str] | None = None,
           mark: int = DEFAULT_MASQUERADE_MARK) -> str:
    """The whole ``nft -f`` script for this set of service ports, given the chains the table holds now (None: the
    table is new, or to be defined from scratch). Raises ``RuleError`` on any unsafe value."""
    check_table(table)
    check_mark(mark)
    ordered = validate(ports)
    with_eps = [sp for sp in ordered if sp.endpoints]
    vips = sorted({sp.cluster_ip for sp in ordered}, key=lambda ip: tuple(int(x) for x in ip.split(".")))
    m = f"0x{mark:x}"
    if existing is None:
        out = [f"table ip {table}", f"delete table ip {table}"]
    else:
        wanted = {service_chain(sp) for sp in with_eps} | {
            endpoint_chain(sp, ep.ip, ep.port) for sp in with_eps for ep in sp.endpoints}
        out = [
            f"table ip {table} {{",  # both exist after any earlier sync; declared in case they do not
            f"\tset cluster-ips {{ {_CLUSTER_IPS_TYPE}; }}",
            f"\tmap service-ips {{ {_SERVICE_IPS_TYPE}; }}",
            "}",
            f"flush table ip {table}",
            f"flush set ip {table} cluster-ips",
            f"flush map ip {table} service-ips",
            # only chains named as ours: a name read back from the kernel never reaches the script otherwise
            *(f"delete chain ip {table} {c}" for c in sorted(set(existing))
              if _OUR_CHAIN.fullmatch(c) and c not in wanted),
        ]
    out += [
        f"table ip {table} {{",
        '\tcomment "kplane kube-proxy: ClusterIP services"',
        "\tset cluster-ips {",
        f"\t\t{_CLUSTER_IPS_TYPE}",
        *_elements(vips),
        "\t}",
        "\tmap service-ips {",
        f"\t\t{_SERVICE_IPS_TYPE}",
        *_elements([f"{_key(sp)} : goto {service_chain(sp)}" for sp in with_eps]),
        "\t}",
        "\tchain nat-prerouting {",
        "\t\ttype nat hook prerouting priority -100; policy accept;",
        "\t\tjump services",
        "\t}",
        "\tchain nat-output {",
        "\t\ttype nat hook output priority -100; policy accept;",
        "\t\tjump services",
        "\t}",
        "\tchain nat-postrouting {",
        "\t\ttype nat hook postrouting priority 100; policy accept;",
        "\t\tjump masquerading",
        "\t}",
        "\tchain filter-forward {",
        "\t\ttype filter hook forward priority -110; policy accept;",
        "\t\tct state new ip daddr @cluster-ips jump reject-chain",
        "\t}",
        "\tchain filter-output {",
        "\t\ttype filter hook output priority -90; policy accept;",
        "\t\tct state new ip daddr @cluster-ips jump reject-chain",
        "\t}",
        "\tchain hairpin-check {",
        "\t\ttype filter hook prerouting priority -90; policy accept;",
        "\t\tct state new ct status dnat ct original ip daddr @cluster-ips fib daddr . iif oif exists "
        "jump mark-for-masquerade",
        "\t}",
        "\tchain services {",
        "\t\tip daddr . meta l4proto . th dport vmap @service-ips",
        "\t}",
        "\tchain reject-chain {",
        "\t\tmeta l4proto tcp reject with tcp reset",
        "\t\treject",
        "\t}",
        "\tchain mark-for-masquerade {",
        f"\t\tmeta mark set meta mark or {m}",
        "\t}",
        "\tchain masquerading {",
        f"\t\tmeta mark & {m} == 0 return",
        f"\t\tmeta mark set meta mark xor {m}",
        "\t\tmasquerade fully-random",
        "\t}",
    ]
    for sp in with_eps:
        eps = sorted_endpoints(sp)
        picks = ", ".join(f"{i} : goto {endpoint_chain(sp, ep.ip, ep.port)}" for i, ep in enumerate(eps))
        out += [f"\tchain {service_chain(sp)} {{", f"\t\tnumgen inc mod {len(eps)} vmap {{ {picks} }}", "\t}"]
        for ep in eps:
            out += [f"\tchain {endpoint_chain(sp, ep.ip, ep.port)} {{",
                    f"\t\tmeta l4proto {sp.protocol.lower()} dnat to {ep.ip}:{ep.port}", "\t}"]
    out.append("}")
    return "\n".join(out) + "\n"


def render_delete(table: str) -> str:
    """Remove the table if it exists (one transaction; no error when it is already gone)."""
    check_table(table)
    return f"table ip {table}\ndelete table ip {table}\n"
