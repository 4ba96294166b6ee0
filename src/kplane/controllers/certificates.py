"""CertificateSigningRequest controllers (kube-controller-manager's ``csrapproving`` and ``csrsigning``):

* CSRApprover auto-approves kubelet client certificates (``kubernetes.io/kube-apiserver-client-kubelet``) after a
  SubjectAccessReview on ``certificatesigningrequests/selfnodeclient`` (renewal by the node itself) or
  ``certificatesigningrequests/nodeclient`` (bootstrap), and kubelet serving certificates
  (``kubernetes.io/kubelet-serving``) when the requesting node asks for its own name and only for SANs that are
  its own addresses (a node asking for someone else's SANs is denied). Unauthorized client requests stay pending.
* CSRSigner signs approved CSRs for the built-in kubelet client, kubelet serving and kube-apiserver-client signers
  with the cluster CA, after the signer-specific subject/usage checks (failures get a ``Failed`` condition).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import logging
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID

from kplane import pki
from kplane.aio import cancel_and_wait
from kplane.api import meta
from kplane.client import APIClient, informer
from kplane.errors import StatusError

log = logging.getLogger(__name__)

Obj = dict[str, Any]

CSR_PATH = "/apis/certificates.k8s.io/v1/certificatesigningrequests"
SAR_PATH = "/apis/authorization.k8s.io/v1/subjectaccessreviews"

KUBELET_CLIENT = "kubernetes.io/kube-apiserver-client-kubelet"
KUBELET_SERVING = "kubernetes.io/kubelet-serving"
APISERVER_CLIENT = "kubernetes.io/kube-apiserver-client"
SIGNERS = (KUBELET_CLIENT, KUBELET_SERVING, APISERVER_CLIENT)

NODE_PREFIX = "system:node:"
NODES_GROUP = "system:nodes"
NODE_ADDRESS_TYPES = {"Hostname", "InternalIP", "ExternalIP", "InternalDNS", "ExternalDNS"}

CLIENT_USAGES = {"digital signature", "key encipherment", "client auth"}
SERVING_USAGES = {"digital signature", "key encipherment", "server auth"}

MSG_SELF = "Auto approving self kubelet client certificate after SubjectAccessReview."
MSG_NODE = "Auto approving kubelet client certificate after SubjectAccessReview."
MSG_SERVING = "Auto approving kubelet serving certificate: the node requested only its own addresses."

ONE_YEAR_S = 365 * 24 * 3600
MIN_DURATION_S = 600


@dataclass
class CSRInfo:
    """What the controllers need from a parsed PKCS#10 request."""

    common_names: list[str]
    organizations: list[str]
    dns: list[str] = field(default_factory=list)
    ips: list[str] = field(default_factory=list)
    emails: list[str] = field(default_factory=list)
    uris: list[str] = field(default_factory=list)
    other_sans: int = 0

    @property
    def cn(self) -> str:
        return self.common_names[0] if len(self.common_names) == 1 else ""

    @property
    def has_sans(self) -> bool:
        return bool(self.dns or self.ips or self.emails or self.uris or self.other_sans)


def parse_request(csr: Obj) -> CSRInfo:
    """Parse ``spec.request`` (base64 of a PEM CERTIFICATE REQUEST); ValueError if it is not a valid one."""
    raw = (csr.get("spec") or {}).get("request") or ""
    try:
        pem = base64.b64decode(raw, validate=True)
        req = x509.load_pem_x509_csr(pem)
    except (binascii.Error, ValueError, TypeError) as e:
        raise ValueError(f"unable to parse certificate request: {e}") from e
    if not req.is_signature_valid:
        raise ValueError("certificate request signature is invalid")
    info = CSRInfo(
        common_names=[str(a.value) for a in req.subject.get_attributes_for_oid(NameOID.COMMON_NAME)],
        organizations=[str(a.value) for a in req.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)],
    )
    try:
        san = req.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return info
    for gn in san:
        if isinstance(gn, x509.DNSName):
            info.dns.append(gn.value)
        elif isinstance(gn, x509.IPAddress):
            info.ips.append(str(gn.value))
        elif isinstance(gn, x509.RFC822Name):
            info.emails.append(gn.value)
        elif isinstance(gn, x509.UniformResourceIdentifier):
            info.uris.append(gn.value)
        else:
            info.other_sans += 1
    return info


def _usages(csr: Obj) -> list[str]:
    return [str(u) for u in (csr.get("spec") or {}).get("usages") or []]


def kubelet_client_problem(info: CSRInfo, usages: list[str]) -> str | None:
    """Why ``info``/``usages`` is not a valid kubelet client certificate request (None: it is)."""
    if info.organizations != [NODES_GROUP]:
        return f"subject organization must be exactly [{NODES_GROUP!r}], got {info.organizations!r}"
    if not info.cn.startswith(NODE_PREFIX) or len(info.cn) == len(NODE_PREFIX):
        return f"subject common name must be {NODE_PREFIX}<nodeName>, got {info.common_names!r}"
    if info.has_sans:
        return "DNS, IP, email and URI subjectAltNames are not allowed"
    us = set(usages)
    if len(us) != len(usages) or not us <= CLIENT_USAGES or "client auth" not in us:
        return f"usages must be a subset of {sorted(CLIENT_USAGES)} including 'client auth', got {usages!r}"
    return None


def kubelet_serving_problem(info: CSRInfo, usages: list[str]) -> str | None:
    """Why ``info``/``usages`` is not a valid kubelet serving certificate request (None: it is)."""
    if info.organizations != [NODES_GROUP]:
        return f"subject organization must be exactly [{NODES_GROUP!r}], got {info.organizations!r}"
    if not info.cn.startswith(NODE_PREFIX) or len(info.cn) == len(NODE_PREFIX):
        return f"subject common name must be {NODE_PREFIX}<nodeName>, got {info.common_names!r}"
    if info.emails or info.uris or info.other_sans:
        return "email, URI and other subjectAltNames are not allowed"
    if not info.dns and not info.ips:
        return "at least one DNS or IP subjectAltName is required"
    us = set(usages)
    if len(us) != len(usages) or not us <= SERVING_USAGES or "server auth" not in us \
            or "digital signature" not in us:
        return ("usages must be 'digital signature', 'server auth' and optionally 'key encipherment', "
                f"got {usages!r}")
    return None


def apiserver_client_problem(info: CSRInfo, usages: list[str]) -> str | None:
    if "system:masters" in info.organizations:
        return "subject organization system:masters is not allowed for signer " + APISERVER_CLIENT
    us = set(usages)
    if not us <= CLIENT_USAGES or "client auth" not in us:
        return f"usages must be a subset of {sorted(CLIENT_USAGES)} including 'client auth', got {usages!r}"
    return None


def _conditions(csr: Obj) -> dict[str, Obj]:
    return {str(c.get("type")): c for c in (csr.get("status") or {}).get("conditions") or []
            if c.get("status", "True") == "True"}


def _condition(ctype: str, reason: str, message: str) -> Obj:
    now = meta.now_rfc3339()
    return {"type": ctype, "status": "True", "reason": reason, "message": message,
            "lastUpdateTime": now, "lastTransitionTime": now}


class _CSRController:
    def __init__(self, client: APIClient) -> None:
        self.client = client
        self.stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        self.stop.set()
        await cancel_and_wait([self._task])
        self._task = None

    async def _run(self) -> None:
        async for ev, csr in informer(self.client, CSR_PATH, self.stop):
            if ev == "DELETED":
                continue
            name = (csr.get("metadata") or {}).get("name", "")
            try:
                await self.handle(csr)
            except StatusError as err:
                log.warning("%s: csr %s: %s", type(self).__name__, name, err.message)
            except (OSError, TimeoutError) as err:
                log.warning("%s: csr %s: %s", type(self).__name__, name, err)
            except Exception:
                log.exception("%s: csr %s", type(self).__name__, name)

    async def handle(self, csr: Obj) -> None:
        raise NotImplementedError

    async def _append_condition(self, csr: Obj, cond: Obj, sub: str) -> Obj:
        name = csr["metadata"]["name"]
        for _ in range(3):
            body = dict(csr)
            st = dict(body.get("status") or {})
            st["conditions"] = [*(st.get("conditions") or []), cond]
            body["status"] = st
            try:
                return await self.client.update(f"{CSR_PATH}/{name}/{sub}", body)
            except StatusError as err:
                if err.code != 409:
                    raise
                csr = await self.client.get(f"{CSR_PATH}/{name}")
                if cond["type"] in _conditions(csr):
                    return csr
        raise StatusError(409, f"could not update certificatesigningrequest {name}: conflicts")


class CSRApprover(_CSRController):
    """Auto-approves kubelet client CSRs (after SubjectAccessReview) and own-address kubelet serving CSRs."""

    async def handle(self, csr: Obj) -> None:
        spec, st = csr.get("spec") or {}, csr.get("status") or {}
        conds = _conditions(csr)
        if st.get("certificate") or "Approved" in conds or "Denied" in conds or "Failed" in conds:
            return
        signer = spec.get("signerName")
        if signer == KUBELET_CLIENT:
            await self._client(csr)
        elif signer == KUBELET_SERVING:
            await self._serving(csr)

    async def _client(self, csr: Obj) -> None:
        spec = csr.get("spec") or {}
        try:
            info = parse_request(csr)
        except ValueError as e:
            log.info("csrapprover: %s: %s", csr["metadata"]["name"], e)
            return
        if kubelet_client_problem(info, _usages(csr)) is not None:
            return  # not a kubelet client request: leave it to a human
        self_renewal = spec.get("username") == info.cn
        sub = "selfnodeclient" if self_renewal else "nodeclient"
        if not await self.access_allowed(spec, sub):
            return
        await self._append_condition(csr, _condition("Approved", "AutoApproved",
                                                     MSG_SELF if self_renewal else MSG_NODE), "approval")
        log.info("csrapprover: approved %s for %s (%s)", csr["metadata"]["name"], info.cn, sub)

    async def access_allowed(self, spec: Obj, subresource: str) -> bool:
        sar: Obj = {
            "apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
            "spec": {"user": spec.get("username", ""), "groups": list(spec.get("groups") or []),
                     "resourceAttributes": {"group": "certificates.k8s.io", "resource": "certificatesigningrequests",
                                            "subresource": subresource, "verb": "create"}},
        }
        if spec.get("uid"):
            sar["spec"]["uid"] = spec["uid"]
        if spec.get("extra"):
            sar["spec"]["extra"] = spec["extra"]
        out = await self.client.create(SAR_PATH, sar)
        return bool((out.get("status") or {}).get("allowed"))

    async def _serving(self, csr: Obj) -> None:
        spec = csr.get("spec") or {}
        user = str(spec.get("username") or "")
        node = user[len(NODE_PREFIX):] if user.startswith(NODE_PREFIX) else ""
        if not node or NODES_GROUP not in (spec.get("groups") or []):
            return  # not requested by a node: a human decides
        try:
            info = parse_request(csr)
        except ValueError as e:
            await self._deny(csr, "InvalidRequest", str(e))
            return
        if info.cn != user:
            await self._deny(csr, "CommonNameMismatch",
                             f"node {node!r} may only request a serving certificate for {user!r}, "
                             f"not {info.common_names!r}")
            return
        problem = kubelet_serving_problem(info, _usages(csr))
        if problem is not None:
            await self._deny(csr, "InvalidServingRequest", problem)
            return
        try:
            node_obj = await self.client.get(f"/api/v1/nodes/{node}")
        except StatusError as err:
            if err.code == 404:
                await self._deny(csr, "NodeNotFound", f"node {node!r} does not exist")
                return
            raise
        own_dns, own_ips = set(), set()
        for a in (node_obj.get("status") or {}).get("addresses") or []:
            if a.get("type") not in NODE_ADDRESS_TYPES or not a.get("address"):
                continue
            addr = str(a["address"])
            try:
                own_ips.add(str(ipaddress.ip_address(addr)))
            except ValueError:
                own_dns.add(addr.lower())
        for d in info.dns:
            if d.lower() not in own_dns:
                await self._deny(csr, "SANNotOwnedByNode",
                                 f"DNS subjectAltName {d!r} is not one of node {node!r}'s addresses")
                return
        for ip in info.ips:
            if str(ipaddress.ip_address(ip)) not in own_ips:
                await self._deny(csr, "SANNotOwnedByNode",
                                 f"IP subjectAltName {ip!r} is not one of node {node!r}'s addresses")
                return
        await self._append_condition(csr, _condition("Approved", "AutoApproved", MSG_SERVING), "approval")
        log.info("csrapprover: approved serving certificate %s for node %s", csr["metadata"]["name"], node)

    async def _deny(self, csr: Obj, reason: str, message: str) -> None:
        log.info("csrapprover: denying %s: %s", csr["metadata"]["name"], message)
        await self._append_condition(csr, _condition("Denied", reason, message), "approval")


class CSRSigner(_CSRController):
    """Signs approved CSRs of the built-in kubelet/apiserver-client signers with the cluster CA."""

    def __init__(self, client: APIClient, ca: pki.KeyPair, *, max_duration_s: int = ONE_YEAR_S) -> None:
        super().__init__(client)
        if ca.key is None:
            raise ValueError("CSRSigner needs the CA private key")
        self.ca = ca
        self.max_duration_s = max(MIN_DURATION_S, int(max_duration_s))
        self._failed: set[str] = set()

    def duration_for(self, csr: Obj) -> int:
        es = (csr.get("spec") or {}).get("expirationSeconds")
        if not isinstance(es, int) or isinstance(es, bool):
            return self.max_duration_s
        return min(self.max_duration_s, max(MIN_DURATION_S, es))

    async def handle(self, csr: Obj) -> None:
        spec, st = csr.get("spec") or {}, csr.get("status") or {}
        signer = spec.get("signerName")
        if signer not in SIGNERS or st.get("certificate"):
            return
        conds = _conditions(csr)
        uid = str(csr["metadata"].get("uid") or csr["metadata"]["name"])
        if "Approved" not in conds or "Denied" in conds or "Failed" in conds or uid in self._failed:
            return
        usages = _usages(csr)
        try:
            info = parse_request(csr)
            check = {KUBELET_CLIENT: kubelet_client_problem, KUBELET_SERVING: kubelet_serving_problem,
                     APISERVER_CLIENT: apiserver_client_problem}[str(signer)]
            problem = check(info, usages)
        except ValueError as e:
            problem = str(e)
        if problem is None:
            try:
                pem = pki.sign_csr(self.ca, base64.b64decode(spec["request"]), usages=usages,
                                   duration_s=self.duration_for(csr))
            except ValueError as e:
                problem = str(e)
        if problem is not None:
            await self._fail(csr, uid, problem)
            return
        await self._write_certificate(csr, base64.b64encode(pem).decode())
        log.info("csrsigner: issued %s (%s) for %s", csr["metadata"]["name"], signer, info.cn)

    async def _write_certificate(self, csr: Obj, cert_b64: str) -> None:
        name = csr["metadata"]["name"]
        for _ in range(3):
            body = dict(csr)
            body["status"] = dict(body.get("status") or {}, certificate=cert_b64)
            try:
                await self.client.update(f"{CSR_PATH}/{name}/status", body)
                return
            except StatusError as err:
                if err.code != 409:
                    raise
                csr = await self.client.get(f"{CSR_PATH}/{name}")
                if (csr.get("status") or {}).get("certificate"):
                    return

    async def _fail(self, csr: Obj, uid: str, message: str) -> None:
        log.info("csrsigner: refusing %s: %s", csr["metadata"]["name"], message)
        self._failed.add(uid)
        cond = _condition("Failed", "SignerValidationFailure", message)
        out = await self._append_condition(csr, cond, "status")
        if "Failed" not in _conditions(out):
            # an apiserver whose status subresource keeps conditions read-only: record it through /approval
            await self._append_condition(out, cond, "approval")
