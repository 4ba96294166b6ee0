"""PKI helpers: CA/leaf certificates, kubeadm-style PKI layout, kubeconfigs, service-account JWTs.

All generated keys are ECDSA P-256, signatures are SHA-256 (ES256 for JWTs).
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import ipaddress
import json
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey

# Clock skew allowance: certificates are back-dated by this much (like upstream signers).
BACKDATE = timedelta(minutes=5)

LEGACY_ISSUER = "kubernetes/serviceaccount"
DEFAULT_ISSUER = "https://kubernetes.default.svc.cluster.local"

APISERVER_DEFAULT_DNS = (
    "localhost",
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
)
APISERVER_DEFAULT_IPS = ("127.0.0.1",)


def _utcnow() -> datetime:
    return datetime.now(_dt.UTC)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pub_der(pub: Any) -> bytes:
    return pub.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _key_to_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


@dataclass
class KeyPair:
    cert: x509.Certificate
    key: PrivateKey | None = None

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        if self.key is None:
            raise ValueError("key pair has no private key")
        return _key_to_pem(self.key)


# --------------------------------------------------------------------------------------------------
# certificates
# --------------------------------------------------------------------------------------------------


def _name(common_name: str, organizations: Sequence[str] = ()) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in organizations]
    if common_name:
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attrs)


def _sign_key(ca: KeyPair) -> PrivateKey:
    if ca.key is None:
        raise ValueError("CA private key not available")
    return ca.key


def new_ca(common_name: str, *, days: int = 3650) -> KeyPair:
    key = _new_key()
    now = _utcnow()
    name = _name(common_name)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=True,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return KeyPair(cert, key)


def _key_usage(**kw: bool) -> x509.KeyUsage:
    args = {
        "digital_signature": False,
        "content_commitment": False,
        "key_encipherment": False,
        "data_encipherment": False,
        "key_agreement": False,
        "key_cert_sign": False,
        "crl_sign": False,
        "encipher_only": False,
        "decipher_only": False,
    }
    args.update(kw)
    return x509.KeyUsage(**args)


def _build_leaf(
    ca: KeyPair,
    subject: x509.Name,
    public_key: Any,
    *,
    key_usage: x509.KeyUsage,
    ekus: Sequence[x509.ObjectIdentifier],
    sans: Sequence[x509.GeneralName],
    not_before: datetime,
    not_after: datetime,
) -> x509.Certificate:
    signer = _sign_key(ca)
    if not_after <= not_before:
        not_before = not_after - timedelta(days=1)
    b = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(key_usage, critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
    )
    if ekus:
        b = b.add_extension(x509.ExtendedKeyUsage(list(ekus)), critical=False)
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return b.sign(signer, hashes.SHA256())


def issue(
    ca: KeyPair,
    *,
    common_name: str,
    organizations: Sequence[str] = (),
    client: bool = False,
    server: bool = False,
    dns_names: Sequence[str] = (),
    ips: Sequence[str] = (),
    days: int = 365,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
    public_key: PublicKey | None = None,
) -> KeyPair:
    """Issue a leaf certificate signed by ``ca``. If ``public_key`` is given, that key is certified and
    the returned pair has ``key=None``; otherwise a fresh P-256 key is generated."""
    key: PrivateKey | None = None
    if public_key is None:
        key = _new_key()
        public_key = key.public_key()
    now = _utcnow()
    nb = not_before if not_before is not None else now - BACKDATE
    na = not_after if not_after is not None else now + timedelta(days=days)
    ekus: list[x509.ObjectIdentifier] = []
    if server:
        ekus.append(ExtendedKeyUsageOID.SERVER_AUTH)
    if client:
        ekus.append(ExtendedKeyUsageOID.CLIENT_AUTH)
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns_names]
    sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    cert = _build_leaf(
        ca,
        _name(common_name, organizations),
        public_key,
        key_usage=_key_usage(digital_signature=True, key_encipherment=True),
        ekus=ekus,
        sans=sans,
        not_before=nb,
        not_after=na,
    )
    return KeyPair(cert, key)


_KU_NAMES = {
    "digital signature": "digital_signature",
    "content commitment": "content_commitment",
    "key encipherment": "key_encipherment",
    "key agreement": "key_agreement",
    "data encipherment": "data_encipherment",
    "cert sign": "key_cert_sign",
    "crl sign": "crl_sign",
}
_EKU_NAMES = {
    "server auth": ExtendedKeyUsageOID.SERVER_AUTH,
    "client auth": ExtendedKeyUsageOID.CLIENT_AUTH,
    "code signing": ExtendedKeyUsageOID.CODE_SIGNING,
    "email protection": ExtendedKeyUsageOID.EMAIL_PROTECTION,
    "timestamping": ExtendedKeyUsageOID.TIME_STAMPING,
    "ocsp signing": ExtendedKeyUsageOID.OCSP_SIGNING,
}


def sign_csr(ca: KeyPair, csr_pem: bytes, *, usages: Sequence[str], duration_s: int) -> bytes:
    """Sign a PEM CSR (subject and SANs copied from the request) and return the certificate PEM.

    ``usages`` are Kubernetes CSR usage names; unknown names raise ValueError. The validity is capped at
    the CA's own notAfter (like the upstream csrsigning controller)."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except Exception as e:
        raise ValueError(f"invalid certificate request: {e}") from e
    if not csr.is_signature_valid:
        raise ValueError("certificate request signature is invalid")
    ku: dict[str, bool] = {}
    ekus: list[x509.ObjectIdentifier] = []
    for u in usages:
        lu = u.strip().lower()
        if lu in _KU_NAMES:
            ku[_KU_NAMES[lu]] = True
        elif lu in _EKU_NAMES:
            if _EKU_NAMES[lu] not in ekus:
                ekus.append(_EKU_NAMES[lu])
        elif lu == "signing":
            ku["digital_signature"] = True
        else:
            raise ValueError(f"unsupported usage {u!r}")
    if duration_s <= 0:
        raise ValueError("duration must be positive")
    try:
        san_ext = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        sans: list[x509.GeneralName] = list(san_ext.value)
    except x509.ExtensionNotFound:
        sans = []
    now = _utcnow()
    not_after = min(now + timedelta(seconds=duration_s), ca.cert.not_valid_after_utc)
    cert = _build_leaf(
        ca,
        csr.subject,
        csr.public_key(),
        key_usage=_key_usage(**ku),
        ekus=ekus,
        sans=sans,
        not_before=now - BACKDATE,
        not_after=not_after,
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def verify_chain(cert: x509.Certificate, ca_cert: x509.Certificate) -> bool:
    """True if ``cert`` was directly signed by ``ca_cert`` (signature + issuer name)."""
    try:
        cert.verify_directly_issued_by(ca_cert)
        return True
    except (ValueError, TypeError, InvalidSignature):
        return False


# --------------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------------


def atomic_write(path: Path | str, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` atomically (temp file + fsync + rename) with permissions ``mode``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def load_private_key(path: Path | str) -> PrivateKey:
    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise ValueError(f"{path}: unsupported private key type {type(key).__name__}")
    return key


def load_public_keys(path: Path | str) -> list[PublicKey]:
    """Load every PEM public key (or certificate / private key, whose public key is used) in a file."""
    data = Path(path).read_bytes()
    out: list[PublicKey] = []
    for block in data.split(b"-----BEGIN ")[1:]:
        pem = b"-----BEGIN " + block
        pub: Any
        if pem.startswith(b"-----BEGIN CERTIFICATE-----"):
            pub = x509.load_pem_x509_certificate(pem).public_key()
        elif b"PRIVATE KEY-----" in pem.split(b"\n", 1)[0]:
            pub = serialization.load_pem_private_key(pem, password=None).public_key()
        else:
            pub = serialization.load_pem_public_key(pem)
        if not isinstance(pub, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
            raise ValueError(f"{path}: unsupported public key type {type(pub).__name__}")
        out.append(pub)
    return out


def load_pair(cert_path: Path | str, key_path: Path | str) -> KeyPair:
    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    key = load_private_key(key_path)
    if _pub_der(cert.public_key()) != _pub_der(key.public_key()):
        raise ValueError(f"{key_path} does not match {cert_path}")
    return KeyPair(cert, key)


def save_pair(pair: KeyPair, cert_path: Path | str, key_path: Path | str) -> None:
    if pair.key is not None:
        atomic_write(key_path, pair.key_pem(), 0o600)
    atomic_write(cert_path, pair.cert_pem(), 0o644)


# --------------------------------------------------------------------------------------------------
# kubeadm-style PKI directory
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _LeafSpec:
    name: str
    common_name: str
    organizations: tuple[str, ...] = ()
    client: bool = False
    server: bool = False


_CLIENT_LEAVES = (
    _LeafSpec("apiserver-kubelet-client", "kube-apiserver-kubelet-client", client=True),
    _LeafSpec("admin", "kplane-admin", ("system:masters",), client=True),
    _LeafSpec("controller-manager", "system:kube-controller-manager", client=True),
    _LeafSpec("scheduler", "system:kube-scheduler", client=True),
)

# regenerate leaf certificates that expire within this window
_RENEW_BEFORE = timedelta(days=1)


def _cert_sans(cert: x509.Certificate) -> tuple[set[str], set[str]]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set(), set()
    dns = set(ext.get_values_for_type(x509.DNSName))
    ips = {str(i) for i in ext.get_values_for_type(x509.IPAddress)}
    return dns, ips


def _leaf_ok(ca: KeyPair, d: Path, spec: _LeafSpec) -> KeyPair | None:
    crt, key = d / f"{spec.name}.crt", d / f"{spec.name}.key"
    if not (crt.exists() and key.exists()):
        return None
    try:
        pair = load_pair(crt, key)
    except Exception:
        return None
    if not verify_chain(pair.cert, ca.cert):
        return None
    if pair.cert.not_valid_after_utc - _RENEW_BEFORE < _utcnow():
        return None
    return pair


def ensure_pki(pki_dir: Path, *, sans_dns: Sequence[str], sans_ips: Sequence[str]) -> None:
    """Create the missing parts of a kubeadm-like PKI under ``pki_dir`` (idempotent).

    Leaf certs are regenerated when missing/unreadable, not signed by the current CA, expiring
    within a day, or (apiserver.crt) when the SAN set changed. A CA cert without its key is
    accepted as long as nothing needs issuing."""
    d = Path(pki_dir)
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)

    ca_crt, ca_key = d / "ca.crt", d / "ca.key"
    if ca_crt.exists() and ca_key.exists():
        ca = load_pair(ca_crt, ca_key)
    elif ca_crt.exists():
        ca = KeyPair(x509.load_pem_x509_certificate(ca_crt.read_bytes()), None)
    else:
        ca = new_ca("kubernetes")
        save_pair(ca, ca_crt, ca_key)

    want_dns = list(dict.fromkeys([*APISERVER_DEFAULT_DNS, *sans_dns]))
    want_ips = list(dict.fromkeys(str(ipaddress.ip_address(i)) for i in [*APISERVER_DEFAULT_IPS, *sans_ips]))
    api = _LeafSpec("apiserver", "kube-apiserver", server=True)
    cur = _leaf_ok(ca, d, api)
    if cur is None or _cert_sans(cur.cert) != (set(want_dns), set(want_ips)):
        pair = issue(ca, common_name=api.common_name, server=True, dns_names=want_dns, ips=want_ips)
        save_pair(pair, d / "apiserver.crt", d / "apiserver.key")

    for spec in _CLIENT_LEAVES:
        if _leaf_ok(ca, d, spec) is None:
            pair = issue(
                ca, common_name=spec.common_name, organizations=spec.organizations, client=spec.client
            )
            save_pair(pair, d / f"{spec.name}.crt", d / f"{spec.name}.key")

    sa_key, sa_pub = d / "sa.key", d / "sa.pub"
    sk: PrivateKey
    if sa_key.exists():
        sk = load_private_key(sa_key)
    else:
        sk = _new_key()
        atomic_write(sa_key, _key_to_pem(sk), 0o600)
        if sa_pub.exists():
            sa_pub.unlink()
    if not sa_pub.exists():
        pub_pem = sk.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        atomic_write(sa_pub, pub_pem, 0o644)


# --------------------------------------------------------------------------------------------------
# kubeconfig
# --------------------------------------------------------------------------------------------------


def _q(s: str) -> str:
    # JSON strings are valid YAML double-quoted scalars
    return json.dumps(s)


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode("ascii")


def write_kubeconfig(
    path: Path,
    *,
    server: str,
    ca_pem: bytes,
    cert_pem: bytes | None = None,
    key_pem: bytes | None = None,
    token: str | None = None,
    user: str = "kplane-admin",
    cluster: str = "kplane",
) -> None:
    if (cert_pem is None) != (key_pem is None):
        raise ValueError("cert_pem and key_pem must be given together")
    ctx = f"{user}@{cluster}"
    lines = [
        "apiVersion: v1",
        "kind: Config",
        "clusters:",
        "- cluster:",
        f"    certificate-authority-data: {_b64(ca_pem)}",
        f"    server: {_q(server)}",
        f"  name: {_q(cluster)}",
        "contexts:",
        "- context:",
        f"    cluster: {_q(cluster)}",
        f"    user: {_q(user)}",
        f"  name: {_q(ctx)}",
        f"current-context: {_q(ctx)}",
        "preferences: {}",
        "users:",
        f"- name: {_q(user)}",
    ]
    user_lines: list[str] = []
    if cert_pem is not None and key_pem is not None:
        user_lines.append(f"    client-certificate-data: {_b64(cert_pem)}")
        user_lines.append(f"    client-key-data: {_b64(key_pem)}")
    if token is not None:
        user_lines.append(f"    token: {_q(token)}")
    if user_lines:
        lines.append("  user:")
        lines.extend(user_lines)
    else:
        lines.append("  user: {}")
    atomic_write(path, ("\n".join(lines) + "\n").encode(), 0o600)


def ca_cert_hash(ca_cert: x509.Certificate) -> str:
    """kubeadm discovery hash: ``sha256:<hex>`` over the CA's SubjectPublicKeyInfo DER."""
    return "sha256:" + hashlib.sha256(_pub_der(ca_cert.public_key())).hexdigest()


# --------------------------------------------------------------------------------------------------
# service-account tokens
# --------------------------------------------------------------------------------------------------


class InvalidToken(Exception):
    """The token is not a valid service-account token for this apiserver."""


def key_id(public_key: Any) -> str:
    """Upstream kid: base64url (no padding) of SHA-256 over the PKIX DER public key."""
    return base64.urlsafe_b64encode(hashlib.sha256(_pub_der(public_key)).digest()).rstrip(b"=").decode()


def _alg(key: Any) -> str:
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        return {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}[key.curve.name]
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        return "RS256"
    raise ValueError(f"unsupported key type {type(key).__name__}")


def _b64u_int(n: int, length: int | None = None) -> str:
    length = length or max(1, (n.bit_length() + 7) // 8)
    return base64.urlsafe_b64encode(n.to_bytes(length, "big")).rstrip(b"=").decode()


def jwks(public_keys: Sequence[Any]) -> dict[str, Any]:
    """JSON Web Key Set for ``/openid/v1/jwks``."""
    keys: list[dict[str, Any]] = []
    for pk in public_keys:
        if isinstance(pk, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            pk = pk.public_key()
        if isinstance(pk, ec.EllipticCurvePublicKey):
            nums = pk.public_numbers()
            size = (pk.curve.key_size + 7) // 8
            crv = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}[pk.curve.name]
            keys.append(
                {
                    "use": "sig",
                    "kty": "EC",
                    "kid": key_id(pk),
                    "crv": crv,
                    "alg": _alg(pk),
                    "x": _b64u_int(nums.x, size),
                    "y": _b64u_int(nums.y, size),
                }
            )
        elif isinstance(pk, rsa.RSAPublicKey):
            rn = pk.public_numbers()
            keys.append(
                {
                    "use": "sig",
                    "kty": "RSA",
                    "kid": key_id(pk),
                    "alg": "RS256",
                    "n": _b64u_int(rn.n),
                    "e": _b64u_int(rn.e),
                }
            )
        else:
            raise ValueError(f"unsupported key type {type(pk).__name__}")
    return {"keys": keys}


class ServiceAccountTokens:
    """Issue and verify service-account JWTs (legacy Secret-based and bound/TokenRequest).

    ``private_key`` may be None for a verify-only instance. ``public_keys`` are all keys accepted for
    verification (the signing key's public half is always added). ``issuer`` issues; ``issuer`` plus
    ``extra_issuers`` are accepted. ``api_audiences`` (default ``[issuer]``) is used when ``verify`` is
    called with ``audiences=None``."""

    LEEWAY_S = 60  # go-jose default leeway for exp/nbf/iat

    def __init__(
        self,
        private_key: PrivateKey | None,
        public_keys: Sequence[PublicKey] | None = None,
        issuer: str = DEFAULT_ISSUER,
        *,
        extra_issuers: Sequence[str] = (),
        api_audiences: Sequence[str] | None = None,
    ) -> None:
        self.private_key = private_key
        keys: list[PublicKey] = list(public_keys or [])
        if private_key is not None:
            pub = private_key.public_key()
            if all(_pub_der(k) != _pub_der(pub) for k in keys):
                keys.insert(0, pub)
        self.public_keys = keys
        self._by_kid: dict[str, list[PublicKey]] = {}
        for k in keys:
            self._by_kid.setdefault(key_id(k), []).append(k)
        self.issuer = issuer
        self.issuers = [issuer, *extra_issuers]
        self.api_audiences = list(api_audiences) if api_audiences is not None else [issuer]
        self._clock: Callable[[], float] = time.time  # test hook

    # -- issuing -----------------------------------------------------------------------------------

    def _sign(self, claims: dict[str, Any]) -> str:
        if self.private_key is None:
            raise ValueError("no signing key configured")
        headers = {"kid": key_id(self.private_key.public_key())}
        return jwt.encode(claims, self.private_key, algorithm=_alg(self.private_key), headers=headers)

    def issue_legacy(self, namespace: str, sa_name: str, sa_uid: str, secret_name: str) -> str:
        claims = {
            "iss": LEGACY_ISSUER,
            "sub": f"system:serviceaccount:{namespace}:{sa_name}",
            "kubernetes.io/serviceaccount/namespace": namespace,
            "kubernetes.io/serviceaccount/secret.name": secret_name,
            "kubernetes.io/serviceaccount/service-account.name": sa_name,
            "kubernetes.io/serviceaccount/service-account.uid": sa_uid,
        }
        return self._sign(claims)

    def issue_bound(
        self,
        namespace: str,
        sa_name: str,
        sa_uid: str,
        *,
        audiences: list[str],
        expiration_s: int,
        bound: dict[str, str] | None = None,
        node: tuple[str, str] | None = None,
        warn_after_s: int | None = None,
    ) -> tuple[str, datetime]:
        """Issue a bound token. ``bound`` = ``{"kind": "Pod"|"Secret"|"Node" (default Pod), "name", "uid"}``;
        ``node`` = (name, uid) of the pod's node (or the bound node). Returns (token, expiration)."""
        now = int(self._clock())
        exp = now + int(expiration_s)
        priv: dict[str, Any] = {
            "namespace": namespace,
            "serviceaccount": {"name": sa_name, "uid": sa_uid},
        }
        if bound is not None:
            kind = bound.get("kind", "Pod")
            field = {"Pod": "pod", "Secret": "secret", "Node": "node"}.get(kind)
            if field is None:
                raise ValueError(f"cannot bind token to kind {kind!r}")
            priv[field] = {"name": bound["name"], "uid": bound["uid"]}
        if node is not None:
            priv["node"] = {"name": node[0], "uid": node[1]}
        if warn_after_s is not None:
            priv["warnafter"] = now + int(warn_after_s)
        claims = {
            "iss": self.issuer,
            "sub": f"system:serviceaccount:{namespace}:{sa_name}",
            "aud": list(audiences),
            "exp": exp,
            "iat": now,
            "nbf": now,
            "jti": str(uuid.uuid4()),
            "kubernetes.io": priv,
        }
        return self._sign(claims), datetime.fromtimestamp(exp, _dt.UTC)

    # -- verification ------------------------------------------------------------------------------

    def verify(self, token: str, *, audiences: list[str] | None) -> dict[str, Any]:
        """Verify ``token`` and return its claims. Raises InvalidToken on any problem.

        Bound tokens must carry an issuer in ``self.issuers`` and an ``aud`` intersecting ``audiences``
        (``None`` → the API audiences). Legacy tokens (iss ``kubernetes/serviceaccount``) carry no aud."""
        try:
            return self._verify(token, audiences)
        except InvalidToken:
            raise
        except Exception as e:  # never leak parser errors for garbage input
            raise InvalidToken(f"invalid token: {type(e).__name__}") from None

    def _candidate_keys(self, header: dict[str, Any]) -> list[PublicKey]:
        kid = header.get("kid")
        if isinstance(kid, str) and kid in self._by_kid:
            return self._by_kid[kid]
        return self.public_keys

    def _verify(self, token: str, audiences: list[str] | None) -> dict[str, Any]:
        if not isinstance(token, str) or token.count(".") != 2:
            raise InvalidToken("malformed token")
        header = jwt.get_unverified_header(token)
        unverified = jwt.decode(token, options={"verify_signature": False})
        if not isinstance(unverified, dict):
            raise InvalidToken("malformed token")
        legacy = unverified.get("iss") == LEGACY_ISSUER
        if not legacy and unverified.get("iss") not in self.issuers:
            raise InvalidToken("token issuer not accepted")
        if legacy:
            opts: dict[str, Any] = {"verify_aud": False, "require": ["sub"]}
        else:
            opts = {"require": ["exp", "iat", "nbf", "sub", "aud"]}
        # time claims are checked below against self._clock (pyjwt would use the wall clock)
        opts.update(verify_exp=False, verify_nbf=False, verify_iat=False)
        aud = self.api_audiences if audiences is None else audiences
        claims: dict[str, Any] | None = None
        for key in self._candidate_keys(header):
            try:
                claims = jwt.decode(
                    token,
                    key,
                    algorithms=[_alg(key)],
                    options=opts,  # type: ignore[arg-type]
                    audience=None if legacy else list(aud),
                )
                break
            except jwt.InvalidSignatureError:
                continue
            except jwt.ExpiredSignatureError:
                raise InvalidToken("token has expired") from None
            except jwt.InvalidAudienceError:
                raise InvalidToken("token audiences are invalid") from None
            except jwt.PyJWTError as e:
                raise InvalidToken(f"invalid token: {e}") from None
        if claims is None:
            raise InvalidToken("token signature is invalid")
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub.startswith("system:serviceaccount:"):
            raise InvalidToken("token subject is not a service account")
        if legacy:
            for k in (
                "namespace",
                "secret.name",
                "service-account.name",
                "service-account.uid",
            ):
                if not isinstance(claims.get(f"kubernetes.io/serviceaccount/{k}"), str):
                    raise InvalidToken(f"legacy token missing claim {k}")
        else:
            now = self._clock()
            for k in ("exp", "nbf", "iat"):
                if not isinstance(claims[k], int | float) or isinstance(claims[k], bool):
                    raise InvalidToken(f"token claim {k} is not a number")
            if claims["exp"] + self.LEEWAY_S < now:
                raise InvalidToken("token has expired")
            if claims["nbf"] - self.LEEWAY_S > now or claims["iat"] - self.LEEWAY_S > now:
                raise InvalidToken("token used before issued")
            priv = claims.get("kubernetes.io")
            if not isinstance(priv, dict) or not isinstance(priv.get("namespace"), str):
                raise InvalidToken("token missing kubernetes.io claims")
            sa = priv.get("serviceaccount")
            if not isinstance(sa, dict) or not isinstance(sa.get("name"), str):
                raise InvalidToken("token missing service account claims")
            if sub != f"system:serviceaccount:{priv['namespace']}:{sa['name']}":
                raise InvalidToken("token subject does not match claims")
        return claims
