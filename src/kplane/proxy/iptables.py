"""The fallback when ``nft`` is missing: the same service ports as ``iptables-restore --noflush`` input (sans-I/O).

Theory of operation (same semantics as ``nftables.render`` where iptables can express them):

* All our chains carry the node's prefix (``KP-<8 hex>-``), so several nodes and clusters share one host. With
  ``--noflush``, declaring a chain (``:NAME - [0:0]``) creates or empties it, so one ``iptables-restore`` run
  replaces all our chains per table atomically and leaves everybody else's rules alone. Chains we made earlier
  and no longer need are declared (emptied) and then deleted (``-X``) in the same run.
* The built-in chains jump into ours once (``JUMPS``); iptables-restore cannot "ensure" a rule, so the caller
  checks each with ``iptables -C`` and inserts it with ``-I`` when missing.
* nat: ``PREROUTING`` and ``OUTPUT`` jump to ``SERVICES`` (match ClusterIP, protocol and port), which jumps to
  the service port's ``SVC-`` chain. Round robin without sessions: rule i of N matches every (N-i)-th packet
  reaching it (``statistic --mode nth``), the last rule takes the rest; only a connection's first packet
  traverses nat. Each ``SEP-`` chain DNATs to its endpoint.
* filter: new connections still addressed to a ClusterIP after DNAT (no endpoints, or an undefined port) are
  rejected from ``FORWARD`` and ``OUTPUT``: TCP reset, ICMP port unreachable otherwise.
* Masquerade: iptables has no ``fib daddr . iif`` match, so only the hairpin case is detected (source ==
  endpoint, as upstream's iptables mode does); two pods on one bridge rely on ``bridge-nf-call-iptables``.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable, Mapping, Sequence

from kplane.proxy.model import RuleError, ServicePort, sorted_endpoints, validate
from kplane.proxy.nftables import DEFAULT_MASQUERADE_MARK, check_mark

# (table, built-in chain, rule spec after the chain name): the jumps from the built-in chains into ours
JUMP_SPECS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("nat", "PREROUTING", ("-j", "{p}SERVICES")),
    ("nat", "OUTPUT", ("-j", "{p}SERVICES")),
    ("nat", "POSTROUTING", ("-j", "{p}POSTROUTING")),
    ("filter", "FORWARD", ("-m", "conntrack", "--ctstate", "NEW", "-j", "{p}CHECK")),
    ("filter", "OUTPUT", ("-m", "conntrack", "--ctstate", "NEW", "-j", "{p}CHECK")),
)


def prefix_for(table: str) -> str:
    """``kplane-proxy-0123abcd`` -> ``KP-0123abcd-`` (iptables chain names are at most 28 characters)."""
    tail = table.rsplit("-", 1)[-1]
    if len(tail) != 8 or any(c not in "0123456789abcdef" for c in tail):
        raise RuleError(f"table name {table!r} does not end in 8 hex digits")
    return f"KP-{tail}-"


def jumps(prefix: str) -> list[tuple[str, str, list[str]]]:
    return [(t, chain, [a.format(p=prefix) for a in spec]) for t, chain, spec in JUMP_SPECS]


def _hash(text: str) -> str:
    return base64.b32encode(hashlib.sha256(text.encode()).digest()).decode()[:10]


def service_chain(prefix: str, sp: ServicePort) -> str:
    return f"{prefix}SVC-{_hash(f'{sp.namespace}/{sp.service}/{sp.protocol}/{sp.port}')}"


def endpoint_chain(prefix: str, sp: ServicePort, ip: str, port: int) -> str:
    return f"{prefix}SEP-{_hash(f'{sp.namespace}/{sp.service}/{sp.protocol}/{sp.port}/{ip}/{port}')}"


def _check_prefix(prefix: str) -> str:
    if not (prefix.startswith("KP-") and len(prefix) == 12 and prefix.endswith("-")
            and all(c in "0123456789abcdef" for c in prefix[3:11])):
        raise RuleError(f"chain prefix {prefix!r} is not KP-<8 hex>-")
    return prefix


def render(prefix: str, ports: Sequence[ServicePort], *, existing: Mapping[str, Iterable[str]] | None = None,
           mark: int = DEFAULT_MASQUERADE_MARK) -> str:
    """``iptables-restore --noflush`` input. ``existing`` maps "nat"/"filter" to the chain names there now
    (from ``iptables-save``); ours that are no longer needed are deleted."""
    _check_prefix(prefix)
    check_mark(mark)
    ordered = validate(ports)
    m = f"0x{mark:x}"
    nat_chains = [f"{prefix}SERVICES", f"{prefix}MARK-MASQ", f"{prefix}POSTROUTING"]
    nat_rules = [
        f"-A {prefix}MARK-MASQ -j MARK --or-mark {m}",
        f"-A {prefix}POSTROUTING -m mark ! --mark {m}/{m} -j RETURN",
        f"-A {prefix}POSTROUTING -j MARK --xor-mark {m}",
        f"-A {prefix}POSTROUTING -j MASQUERADE --random-fully",
    ]
    svc_rules: list[str] = []
    for sp in ordered:
        if not sp.endpoints:
            continue
        proto = sp.protocol.lower()
        svc = service_chain(prefix, sp)
        nat_chains.append(svc)
        nat_rules.append(f"-A {prefix}SERVICES -d {sp.cluster_ip}/32 -p {proto} -m {proto} --dport {sp.port} "
                         f'-m comment --comment "{sp.display}" -j {svc}')
        eps = sorted_endpoints(sp)
        for i, ep in enumerate(eps):
            sep = endpoint_chain(prefix, sp, ep.ip, ep.port)
            nat_chains.append(sep)
            left = len(eps) - i
            pick = f"-m statistic --mode nth --every {left} --packet 0 " if left > 1 else ""
            svc_rules.append(f"-A {svc} {pick}-j {sep}")
            svc_rules.append(f"-A {sep} -s {ep.ip}/32 -j {prefix}MARK-MASQ")
            svc_rules.append(f"-A {sep} -p {proto} -m {proto} -j DNAT --to-destination {ep.ip}:{ep.port}")
    filter_chains = [f"{prefix}CHECK"]
    filter_rules: list[str] = []
    for vip in sorted({sp.cluster_ip for sp in ordered}, key=lambda ip: tuple(int(x) for x in ip.split("."))):
        filter_rules.append(f"-A {prefix}CHECK -d {vip}/32 -p tcp -j REJECT --reject-with tcp-reset")
        filter_rules.append(f"-A {prefix}CHECK -d {vip}/32 -j REJECT --reject-with icmp-port-unreachable")
    existing = existing or {}
    out: list[str] = []
    for table, chains, rules in (("nat", nat_chains, nat_rules + svc_rules), ("filter", filter_chains, filter_rules)):
        stale = sorted(c for c in existing.get(table, ()) if c.startswith(prefix) and c not in set(chains))
        out.append(f"*{table}")
        out += [f":{c} - [0:0]" for c in chains + stale]
        out += rules
        out += [f"-X {c}" for c in stale]
        out.append("COMMIT")
    return "\n".join(out) + "\n"


def render_cleanup(prefix: str, existing: Mapping[str, Iterable[str]]) -> str:
    """Empty and delete all our chains (after the jumps into them are gone)."""
    _check_prefix(prefix)
    out: list[str] = []
    for table in ("nat", "filter"):
        ours = sorted(c for c in existing.get(table, ()) if c.startswith(prefix))
        out.append(f"*{table}")
        out += [f":{c} - [0:0]" for c in ours]
        out += [f"-X {c}" for c in ours]
        out.append("COMMIT")
    return "\n".join(out) + "\n"


def chains_in_save(text: str) -> list[str]:
    """Chain names declared in ``iptables-save`` output for one table."""
    return [line[1:].split(" ", 1)[0] for line in text.splitlines() if line.startswith(":")]
