"""Who may connect as a Konnectivity agent, and what it may claim.

An agent proves an identity (an x509 client certificate signed by the cluster CA: CN is the user, O the groups;
or a service-account token checked with a TokenReview for the audience ``system:konnectivity-server``) and then
*claims* an ``agentid`` and a set of identifiers (the addresses it serves). Routing trusts those claims, so they
are checked against the identity:

- ``system:node:NAME`` (group ``system:nodes``) may only be agent ``NAME``, and may only declare addresses the
  node owns: its name, and whatever ``node_addresses(NAME)`` returns (the Node's addresses and pod CIDRs, looked
  up by the caller). Without ``node_addresses`` only the name itself can be declared.
- a service account from ``service_accounts`` (upstream's model: one ``kube-system/konnectivity-agent`` for all
  agents): if its token is bound to a node (the TokenReview's ``authentication.kubernetes.io/node-name`` extra),
  the same rules as for that node; otherwise it may not declare any address, because nothing ties it to one.
- ``default-route=true`` (an agent that dials anything) only when ``allow_default_route`` is set.
- anyone else is refused.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kplane.tunnel.packets import AgentIdentifiers, normalize_host, parse_ip

NODE_PREFIX = "system:node:"
NODES_GROUP = "system:nodes"
SA_PREFIX = "system:serviceaccount:"
NODE_NAME_EXTRA = "authentication.kubernetes.io/node-name"

# TokenReview: (token, audiences) -> the TokenReview's status (authenticated, user{username,groups,extra},
# audiences, error), e.g. what POST /apis/authentication.k8s.io/v1/tokenreviews returns under "status".
TokenReviewer = Callable[[str, Sequence[str]], Awaitable[Mapping[str, Any]]]
NodeAddresses = Callable[[str], Awaitable[Iterable[str]]]


class AgentRejected(Exception):
    """The agent is not allowed in (bad credential, or a claim its identity does not support)."""

    def __init__(self, message: str, *, unauthenticated: bool = False) -> None:
        super().__init__(message)
        self.unauthenticated = unauthenticated


@dataclass(frozen=True)
class Identity:
    user: str
    groups: tuple[str, ...] = ()
    extra: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    method: str = "x509"


@dataclass(frozen=True)
class AgentClaim:
    identity: Identity
    agent_id: str
    identifiers: AgentIdentifiers


Authorizer = Callable[[AgentClaim], Awaitable[None]]


def identity_from_certificate(pem: bytes) -> Identity:
    """The identity in a verified client certificate: CN is the user, O the groups. A certificate whose
    extended key usage excludes client authentication is refused."""
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError as e:
        raise AgentRejected(f"unreadable client certificate: {e}", unauthenticated=True) from e
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        if ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
            raise AgentRejected("client certificate is not valid for client authentication",
                                unauthenticated=True)
    except x509.ExtensionNotFound:
        pass
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    user = str(cns[0].value) if cns else ""
    if not user:
        raise AgentRejected("client certificate has no common name", unauthenticated=True)
    groups = tuple(str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME))
    return Identity(user=user, groups=groups, method="x509")


async def identity_from_token(reviewer: TokenReviewer, token: str, audience: str) -> Identity:
    """Check a bearer token with a TokenReview for ``audience``."""
    if not token or len(token) > 16384:
        raise AgentRejected("missing or oversized bearer token", unauthenticated=True)
    try:
        status = await reviewer(token, [audience])
    except Exception as e:
        raise AgentRejected(f"token review failed: {e}", unauthenticated=True) from e
    if status.get("error"):
        raise AgentRejected(f"token review: {status['error']}", unauthenticated=True)
    if status.get("authenticated") is not True:
        raise AgentRejected("token is not authenticated", unauthenticated=True)
    auds = status.get("audiences")
    if auds is not None and audience not in auds:
        raise AgentRejected(f"token is not valid for audience {audience}", unauthenticated=True)
    user = status.get("user") or {}
    username = str(user.get("username") or "")
    if not username:
        raise AgentRejected("token review returned no user", unauthenticated=True)
    extra = {str(k): tuple(str(x) for x in (v or ())) for k, v in (user.get("extra") or {}).items()}
    return Identity(user=username, groups=tuple(str(g) for g in user.get("groups") or ()), extra=extra,
                    method="token")


class NodeAgentAuthorizer:
    def __init__(
        self,
        *,
        node_addresses: NodeAddresses | None = None,
        service_accounts: Iterable[tuple[str, str]] = (("kube-system", "konnectivity-agent"),),
        allow_default_route: bool = False,
    ) -> None:
        self.node_addresses = node_addresses
        self.service_accounts = {f"{SA_PREFIX}{ns}:{name}" for ns, name in service_accounts}
        self.allow_default_route = allow_default_route

    def node_of(self, ident: Identity) -> str | None:
        """The node an identity speaks for (None: a node-agnostic service account); raises if not allowed."""
        if ident.user.startswith(NODE_PREFIX) and NODES_GROUP in ident.groups:
            name = ident.user[len(NODE_PREFIX):]
            if name:
                return name
        if ident.user in self.service_accounts:
            bound = ident.extra.get(NODE_NAME_EXTRA) or ()
            return bound[0] if bound else None
        raise AgentRejected(f"user {ident.user!r} may not connect as a konnectivity agent")

    async def __call__(self, claim: AgentClaim) -> None:
        node = self.node_of(claim.identity)
        ids = claim.identifiers
        if ids.default_route and not self.allow_default_route:
            raise AgentRejected("default-route agents are not allowed")
        if node is None:
            if ids.addresses():
                raise AgentRejected(
                    f"{claim.identity.user} is not bound to a node and may not declare addresses")
            return
        if claim.agent_id != node:
            raise AgentRejected(f"agentid {claim.agent_id!r} does not match the authenticated node {node!r}")
        owned_hosts = {normalize_host(node)}
        owned_nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        if self.node_addresses is not None and ids.addresses():
            for a in await self.node_addresses(node):
                if "/" in a:
                    owned_nets.append(ipaddress.ip_network(a, strict=False))
                else:
                    owned_hosts.add(normalize_host(a))
        for h in ids.hosts + ids.ipv4 + ids.ipv6:
            ip = parse_ip(h)
            if h in owned_hosts or (ip is not None and any(ip in n for n in owned_nets)):
                continue
            raise AgentRejected(f"node {node!r} does not own address {h!r}")
        for c in ids.cidrs:
            net = ipaddress.ip_network(c)
            if not any(net.version == n.version and net.subnet_of(n) for n in owned_nets):  # type: ignore[arg-type]
                raise AgentRejected(f"node {node!r} does not own network {c!r}")
