"""Stale UDP conntrack entries after a rules change (what to delete is pure; deleting uses netlink).

NAT is decided on a connection's first packet only; conntrack remembers it. For TCP that is what we want (live
connections keep their endpoint). UDP "connections" are just entries that live as long as datagrams keep coming,
so after a change two kinds of entries would keep traffic on the wrong path for good, as upstream notes:

* an entry DNATed to an endpoint that is gone (a client reusing its socket keeps talking to it);
* an entry to a ClusterIP port made while it had no endpoints (or before our rules existed): it was never
  DNATed, and never will be.

``stale_udp_flows`` lists them from the service ports before and after a sync; ``clear`` deletes matching
entries with pyroute2's conntrack netlink socket.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Sequence
from dataclasses import dataclass

from kplane.proxy.model import Endpoint, ServicePort

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, order=True)
class StaleFlow:
    vip: str
    port: int
    endpoint: Endpoint | None  # None: entries to vip:port that were not DNATed


def stale_udp_flows(old: Sequence[ServicePort] | None, new: Sequence[ServicePort]) -> list[StaleFlow]:
    """UDP entries to delete after going from ``old`` (None: nothing known, e.g. at start) to ``new``."""
    before = {(sp.cluster_ip, sp.port): set(sp.endpoints) for sp in old or () if sp.protocol == "UDP"}
    after = {(sp.cluster_ip, sp.port): set(sp.endpoints) for sp in new if sp.protocol == "UDP"}
    out: set[StaleFlow] = set()
    for key, eps in after.items():
        if eps and not before.get(key):
            out.add(StaleFlow(key[0], key[1], None))
        out.update(StaleFlow(key[0], key[1], ep) for ep in before.get(key, set()) - eps)
    for key, eps in before.items():
        if key not in after:
            out.update(StaleFlow(key[0], key[1], ep) for ep in eps)
    return sorted(out, key=lambda f: (f.vip, f.port, f.endpoint or Endpoint("", 0)))


def clear(flows: Sequence[StaleFlow]) -> int:
    """Delete the conntrack entries of ``flows`` in this network namespace; returns how many. Blocking (run it
    in a thread)."""
    if not flows:
        return 0
    from pyroute2 import Conntrack
    from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

    deleted = 0
    with Conntrack() as ct:
        for f in flows:
            orig = NFCTAttrTuple(family=socket.AF_INET, daddr=f.vip, proto=socket.IPPROTO_UDP, dport=f.port)
            doomed = []
            for entry in ct.dump_entries(tuple_orig=orig):
                o, r = entry.tuple_orig, entry.tuple_reply
                if o.daddr != f.vip or o.dport != f.port or o.proto != socket.IPPROTO_UDP:
                    continue
                if f.endpoint is None:
                    hit = r.saddr == f.vip
                else:
                    hit = r.saddr == f.endpoint.ip and r.sport == f.endpoint.port
                if hit:
                    doomed.append(entry)
            for entry in doomed:
                try:
                    ct.delete(entry)
                    deleted += 1
                except OSError as exc:  # gone meanwhile
                    log.debug("conntrack delete %s: %s", entry, exc)
    return deleted
