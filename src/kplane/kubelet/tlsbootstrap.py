"""Kubelet TLS bootstrapping, as kubeadm join and the kubelet do it.

1. Discovery: fetch ConfigMap ``kube-public/cluster-info`` without trusting the server yet; accept it only if its
   ``jws-kubeconfig-<token-id>`` signature verifies with the bootstrap token (HS256) and the CA inside hashes to
   ``--discovery-token-ca-cert-hash``. From then on the CA is pinned.
2. Client certificate: a CSR (CN ``system:node:<name>``, O ``system:nodes``, signer
   ``kubernetes.io/kube-apiserver-client-kubelet``) created with the bootstrap token; wait for it to be approved
   and issued; keep the key on disk only next to the issued certificate.
3. Rotation: a new CSR with the current client certificate when 70-90 % of the lifetime has passed.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import random
import re
import ssl
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from kplane import pki
from kplane.bootstraptoken import verify_jws_detached
from kplane.client import APIClient
from kplane.errors import StatusError

CLIENT_SIGNER = "kubernetes.io/kube-apiserver-client-kubelet"
SERVING_SIGNER = "kubernetes.io/kubelet-serving"
_TOKEN = re.compile(r"\A([a-z0-9]{6})\.([a-z0-9]{16})\Z")


class BootstrapError(Exception):
    """Discovery or bootstrap refused: the message says why."""


class _NotYet(Exception):
    pass


async def discover_ca(server: str, token: str, ca_hash: str, *, timeout_s: float = 300.0) -> bytes:
    """Retry while cluster-info is missing or not yet signed for this token (a fresh cluster or token); fail at
    once on a bad signature or a CA that does not match the pinned hash."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    delay = 0.05  # a new token is usually signed into cluster-info within a few tens of milliseconds
    while True:
        try:
            return await _discover_once(server, token, ca_hash)
        except _NotYet as exc:
            if loop.time() >= deadline:
                raise BootstrapError(f"discovery timed out after {timeout_s:.0f}s: {exc}") from None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)


async def _discover_once(server: str, token: str, ca_hash: str) -> bytes:
    m = _TOKEN.match(token)
    if not m:
        raise BootstrapError("the bootstrap token must look like [a-z0-9]{6}.[a-z0-9]{16}")
    if not re.fullmatch(r"sha256:[0-9a-f]{64}", ca_hash):
        raise BootstrapError("--discovery-token-ca-cert-hash must be sha256:<64 hex digits>")
    insecure = ssl.create_default_context()
    insecure.check_hostname = False
    insecure.verify_mode = ssl.CERT_NONE  # trust comes from the JWS signature and the pinned CA hash
    url = f"{server.rstrip('/')}/api/v1/namespaces/kube-public/configmaps/cluster-info"
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=insecure)) as s, \
                s.get(url, timeout=aiohttp.ClientTimeout(total=15)) as r:
            if r.status in (404, 503) or r.status >= 500:
                raise _NotYet(f"cannot read cluster-info from {server}: HTTP {r.status}")
            if r.status != 200:
                raise BootstrapError(f"cannot read cluster-info from {server}: HTTP {r.status}")
            cm = await r.json(content_type=None)
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise _NotYet(f"cannot reach {server}: {exc}") from exc
    data = cm.get("data") or {}
    kubeconfig = data.get("kubeconfig")
    sig = data.get(f"jws-kubeconfig-{m.group(1)}")
    if not kubeconfig or not sig:
        raise _NotYet(f"cluster-info has no signature for token id {m.group(1)} (expired or unknown token)")
    if not verify_jws_detached(sig, kubeconfig.encode(), token):
        raise BootstrapError("cluster-info signature does not verify with this token")
    ca_pem = _ca_from_kubeconfig(kubeconfig)
    cert = x509.load_pem_x509_certificate(ca_pem)
    if pki.ca_cert_hash(cert) != ca_hash:
        raise BootstrapError(f"the cluster CA's public key hash {pki.ca_cert_hash(cert)} does not match "
                             f"--discovery-token-ca-cert-hash {ca_hash}")
    return ca_pem


def _ca_from_kubeconfig(text: str) -> bytes:
    try:
        doc = orjson.loads(text)
        data = doc["clusters"][0]["cluster"]["certificate-authority-data"]
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
        m = re.search(r"certificate-authority-data:\s*\"?([A-Za-z0-9+/=]+)", text)
        if not m:
            raise BootstrapError("cluster-info kubeconfig has no certificate-authority-data") from None
        data = m.group(1)
    return base64.b64decode(data)


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())


def build_csr(key: ec.EllipticCurvePrivateKey, node: str, *, dns: list[str] = (),  # type: ignore[assignment]
              ips: list[str] = ()) -> bytes:  # type: ignore[assignment]
    import ipaddress

    b = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "system:nodes"),
        x509.NameAttribute(NameOID.COMMON_NAME, f"system:node:{node}"),
    ]))
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return b.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def csr_name(prefix: str, key: ec.EllipticCurvePrivateKey, node: str, usages: list[str]) -> str:
    """Deterministic, like the kubelet's: a restart with the same key reuses the same CSR."""
    pub = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    h = hashlib.sha512()
    for part in [base64.urlsafe_b64encode(pub).decode().rstrip("="), f"system:node:{node}", "system:nodes", *usages]:
        h.update(part.encode() + b"|")
    return f"{prefix}-" + base64.urlsafe_b64encode(h.digest()[:32]).decode().rstrip("=")


async def request_certificate(client: APIClient, key: ec.EllipticCurvePrivateKey, node: str, *, signer: str,
                              usages: list[str], dns: list[str] | None = None, ips: list[str] | None = None,
                              expiration_s: int | None = None, timeout_s: float = 900) -> bytes:
    """Create (or reuse) the CSR and wait until it carries a certificate; raise on Denied/Failed."""
    prefix = "node-csr" if signer == CLIENT_SIGNER else "csr"
    name = csr_name(prefix, key, node, usages) if signer == CLIENT_SIGNER else \
        f"{prefix}-{node}-{random.getrandbits(40):010x}"
    body: dict[str, Any] = {
        "apiVersion": "certificates.k8s.io/v1", "kind": "CertificateSigningRequest", "metadata": {"name": name},
        "spec": {"request": base64.b64encode(build_csr(key, node, dns=dns or [], ips=ips or [])).decode(),
                 "signerName": signer, "usages": usages},
    }
    if expiration_s:
        body["spec"]["expirationSeconds"] = expiration_s
    path = f"/apis/certificates.k8s.io/v1/certificatesigningrequests/{name}"
    try:
        await client.create("/apis/certificates.k8s.io/v1/certificatesigningrequests", body)
    except StatusError as err:
        if err.code != 409:
            raise
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    delay = 0.1
    while loop.time() < deadline:
        csr = await client.get(path)
        st = csr.get("status") or {}
        for c in st.get("conditions") or []:
            if c.get("type") in ("Denied", "Failed") and c.get("status", "True") == "True":
                raise BootstrapError(f"certificate signing request {name} was {c['type'].lower()}: "
                                     f"{c.get('reason', '')} {c.get('message', '')}".strip())
        if st.get("certificate"):
            cert_pem = base64.b64decode(st["certificate"])
            cert = x509.load_pem_x509_certificate(cert_pem)
            if cert.public_key().public_bytes(serialization.Encoding.DER,
                                              serialization.PublicFormat.SubjectPublicKeyInfo) != \
                    key.public_key().public_bytes(serialization.Encoding.DER,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo):
                raise BootstrapError(f"the certificate issued for {name} is not for our key")
            return cert_pem
        await asyncio.sleep(delay)
        delay = min(delay * 1.5, 2.0)
    raise BootstrapError(f"timed out waiting for certificate signing request {name} to be approved and issued")


def cert_valid(path: Path) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return False
    now = datetime.now(UTC)
    return cert.not_valid_before_utc <= now < cert.not_valid_after_utc


def rotation_deadline(cert: x509.Certificate, *, rng: random.Random | None = None) -> datetime:
    """NotBefore + 70..90 % of the lifetime (upstream: 80 % +/- 10 % jitter)."""
    life = cert.not_valid_after_utc - cert.not_valid_before_utc
    frac = (rng or random).uniform(0.7, 0.9)
    return cert.not_valid_before_utc + life * frac
