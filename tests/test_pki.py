from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import json
import re
import stat
import time
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kplane import pki
from kplane.pki import InvalidToken, ServiceAccountTokens


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def _ekus(cert: x509.Certificate) -> list[x509.ObjectIdentifier]:
    try:
        return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        return []


@pytest.fixture(scope="module")
def ca() -> pki.KeyPair:
    return pki.new_ca("test-ca")


# ------------------------------------------------------------------------------------------ certs


def test_ca_properties(ca: pki.KeyPair) -> None:
    bc = ca.cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert bc.ca
    assert isinstance(ca.key, ec.EllipticCurvePrivateKey)
    assert ca.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "test-ca"
    assert pki.verify_chain(ca.cert, ca.cert)
    assert b"BEGIN CERTIFICATE" in ca.cert_pem() and b"PRIVATE KEY" in ca.key_pem()


def test_issue_server_and_client(ca: pki.KeyPair) -> None:
    srv = pki.issue(
        ca,
        common_name="kube-apiserver",
        server=True,
        dns_names=["a.example", "localhost"],
        ips=["10.0.0.1", "::1"],
    )
    assert pki.verify_chain(srv.cert, ca.cert)
    assert _ekus(srv.cert) == [ExtendedKeyUsageOID.SERVER_AUTH]
    san = srv.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"a.example", "localhost"}
    assert {str(i) for i in san.get_values_for_type(x509.IPAddress)} == {"10.0.0.1", "::1"}
    assert srv.cert.signature_hash_algorithm is not None
    assert srv.cert.signature_hash_algorithm.name == "sha256"

    cl = pki.issue(ca, common_name="alice", organizations=["dev", "ops"], client=True)
    assert pki.verify_chain(cl.cert, ca.cert)
    assert _ekus(cl.cert) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    orgs = [a.value for a in cl.cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)]
    assert orgs == ["dev", "ops"]
    assert not cl.cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca

    other = pki.new_ca("other")
    assert not pki.verify_chain(cl.cert, other.cert)


def test_issue_for_public_key(ca: pki.KeyPair) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    pair = pki.issue(ca, common_name="x", client=True, public_key=key.public_key())
    assert pair.key is None
    assert pair.cert.public_key() == key.public_key()
    with pytest.raises(ValueError):
        pair.key_pem()


def test_expired_cert(ca: pki.KeyPair) -> None:
    pair = pki.issue(ca, common_name="old", client=True, not_after=_now() - dt.timedelta(hours=1))
    assert pair.cert.not_valid_after_utc < _now()
    assert pair.cert.not_valid_before_utc < pair.cert.not_valid_after_utc
    assert pki.verify_chain(pair.cert, ca.cert)


def test_sign_csr_node(ca: pki.KeyPair) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "system:nodes"),
                    x509.NameAttribute(NameOID.COMMON_NAME, "system:node:n1"),
                ]
            )
        )
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("n1")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    pem = pki.sign_csr(
        ca,
        csr.public_bytes(serialization.Encoding.PEM),
        usages=["digital signature", "key encipherment", "client auth"],
        duration_s=3600,
    )
    cert = x509.load_pem_x509_certificate(pem)
    assert pki.verify_chain(cert, ca.cert)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "system:node:n1"
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "system:nodes"
    assert _ekus(cert) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and ku.key_encipherment and not ku.key_cert_sign
    assert cert.public_key() == key.public_key()
    life = cert.not_valid_after_utc - _now()
    assert dt.timedelta(minutes=59) < life <= dt.timedelta(hours=1)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["n1"]

    with pytest.raises(ValueError):
        pki.sign_csr(ca, csr.public_bytes(serialization.Encoding.PEM), usages=["bogus"], duration_s=60)
    with pytest.raises(ValueError):
        pki.sign_csr(ca, b"garbage", usages=["client auth"], duration_s=60)


def test_save_load_pair(tmp_path: Path, ca: pki.KeyPair) -> None:
    pair = pki.issue(ca, common_name="x", client=True)
    pki.save_pair(pair, tmp_path / "d" / "x.crt", tmp_path / "d" / "x.key")
    assert _mode(tmp_path / "d" / "x.key") == 0o600
    loaded = pki.load_pair(tmp_path / "d" / "x.crt", tmp_path / "d" / "x.key")
    assert loaded.cert == pair.cert
    assert loaded.key_pem() == pair.key_pem()
    other = pki.issue(ca, common_name="y", client=True)
    pki.save_pair(other, tmp_path / "y.crt", tmp_path / "y.key")
    with pytest.raises(ValueError):
        pki.load_pair(tmp_path / "d" / "x.crt", tmp_path / "y.key")
    assert not [p for p in (tmp_path / "d").iterdir() if p.name.endswith(".tmp")]


def test_ca_cert_hash(ca: pki.KeyPair) -> None:
    h = pki.ca_cert_hash(ca.cert)
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", h)
    assert h == pki.ca_cert_hash(ca.cert)
    assert h != pki.ca_cert_hash(pki.new_ca("other").cert)


# ------------------------------------------------------------------------------------------ ensure_pki

_FILES = [
    "ca.crt",
    "ca.key",
    "apiserver.crt",
    "apiserver.key",
    "sa.key",
    "sa.pub",
    "apiserver-kubelet-client.crt",
    "apiserver-kubelet-client.key",
    "admin.crt",
    "admin.key",
    "controller-manager.crt",
    "controller-manager.key",
    "scheduler.crt",
    "scheduler.key",
]


def _snapshot(d: Path) -> dict[str, bytes]:
    return {f: (d / f).read_bytes() for f in _FILES}


def _subject(d: Path, name: str) -> tuple[str, list[str]]:
    cert = x509.load_pem_x509_certificate((d / f"{name}.crt").read_bytes())
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    orgs = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)]
    return str(cn), [str(o) for o in orgs]


def test_ensure_pki(tmp_path: Path) -> None:
    d = tmp_path / "pki"
    pki.ensure_pki(d, sans_dns=["cp.example"], sans_ips=["10.96.0.1"])
    for f in _FILES:
        assert (d / f).exists(), f
        if f.endswith(".key"):
            assert _mode(d / f) == 0o600, f
    ca = pki.load_pair(d / "ca.crt", d / "ca.key")
    assert _subject(d, "ca") == ("kubernetes", [])
    assert _subject(d, "admin") == ("kplane-admin", ["system:masters"])
    assert _subject(d, "apiserver-kubelet-client") == ("kube-apiserver-kubelet-client", [])
    assert _subject(d, "controller-manager") == ("system:kube-controller-manager", [])
    assert _subject(d, "scheduler") == ("system:kube-scheduler", [])
    for name in ("admin", "apiserver-kubelet-client", "controller-manager", "scheduler"):
        cert = pki.load_pair(d / f"{name}.crt", d / f"{name}.key").cert
        assert pki.verify_chain(cert, ca.cert)
        assert _ekus(cert) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    api = x509.load_pem_x509_certificate((d / "apiserver.crt").read_bytes())
    assert _ekus(api) == [ExtendedKeyUsageOID.SERVER_AUTH]
    san = api.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns = set(san.get_values_for_type(x509.DNSName))
    assert dns >= {"localhost", "kubernetes.default.svc.cluster.local", "cp.example"}
    assert "10.96.0.1" in {str(i) for i in san.get_values_for_type(x509.IPAddress)}
    sa_key = pki.load_private_key(d / "sa.key")
    assert pki.load_public_keys(d / "sa.pub")[0] == sa_key.public_key()

    # idempotent
    before = _snapshot(d)
    pki.ensure_pki(d, sans_dns=["cp.example"], sans_ips=["10.96.0.1"])
    assert _snapshot(d) == before

    # SAN change regenerates only apiserver.crt/key
    pki.ensure_pki(d, sans_dns=["cp.example", "new.example"], sans_ips=["10.96.0.1"])
    after = _snapshot(d)
    changed = {f for f in _FILES if before[f] != after[f]}
    assert changed == {"apiserver.crt", "apiserver.key"}
    api = x509.load_pem_x509_certificate((d / "apiserver.crt").read_bytes())
    san = api.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "new.example" in san.get_values_for_type(x509.DNSName)

    # a missing file is recreated, others untouched
    (d / "admin.key").unlink()
    pki.ensure_pki(d, sans_dns=["cp.example", "new.example"], sans_ips=["10.96.0.1"])
    again = _snapshot(d)
    assert {f for f in _FILES if after[f] != again[f]} == {"admin.crt", "admin.key"}


# ------------------------------------------------------------------------------------------ kubeconfig


def test_kubeconfig(tmp_path: Path, ca: pki.KeyPair) -> None:
    kubernetes_config = pytest.importorskip("kubernetes.config")
    client = pki.issue(ca, common_name="kplane-admin", organizations=["system:masters"], client=True)
    path = tmp_path / "admin.conf"
    pki.write_kubeconfig(
        path,
        server="https://127.0.0.1:6443",
        ca_pem=ca.cert_pem(),
        cert_pem=client.cert_pem(),
        key_pem=client.key_pem(),
    )
    assert _mode(path) == 0o600
    doc = yaml.safe_load(path.read_text())
    assert doc["kind"] == "Config" and doc["current-context"] == "kplane-admin@kplane"
    cl = doc["clusters"][0]
    assert cl["name"] == "kplane" and cl["cluster"]["server"] == "https://127.0.0.1:6443"
    assert base64.b64decode(cl["cluster"]["certificate-authority-data"]) == ca.cert_pem()
    user = doc["users"][0]
    assert user["name"] == "kplane-admin"
    assert base64.b64decode(user["user"]["client-key-data"]) == client.key_pem()
    kubernetes_config.load_kube_config(config_file=str(path))

    tok = tmp_path / "tok.conf"
    pki.write_kubeconfig(
        tok, server="https://h:6443", ca_pem=ca.cert_pem(), token='abc"def', user="u", cluster="c"
    )
    doc = yaml.safe_load(tok.read_text())
    assert doc["users"][0]["user"] == {"token": 'abc"def'}
    assert doc["contexts"][0]["context"] == {"cluster": "c", "user": "u"}
    kubernetes_config.load_kube_config(config_file=str(tok))

    bare = tmp_path / "bare.conf"
    pki.write_kubeconfig(bare, server="https://h:6443", ca_pem=ca.cert_pem())
    assert yaml.safe_load(bare.read_text())["users"][0]["user"] == {}


# ------------------------------------------------------------------------------------------ JWT


@pytest.fixture(scope="module")
def sa_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture()
def tokens(sa_key: ec.EllipticCurvePrivateKey) -> ServiceAccountTokens:
    return ServiceAccountTokens(sa_key, [sa_key.public_key()])


def _parts(token: str) -> tuple[dict, dict]:
    def dec(s: str) -> dict:
        return json.loads(base64.urlsafe_b64decode(s + "=" * (-len(s) % 4)))

    h, p, _ = token.split(".")
    return dec(h), dec(p)


def test_bound_token_roundtrip(tokens: ServiceAccountTokens, sa_key: ec.EllipticCurvePrivateKey) -> None:
    tok, exp = tokens.issue_bound(
        "ns1",
        "sa1",
        "uid-1",
        audiences=["api", "vault"],
        expiration_s=3600,
        bound={"name": "p1", "uid": "pod-uid"},
        node=("n1", "node-uid"),
    )
    assert dt.timedelta(minutes=59) < exp - _now() <= dt.timedelta(hours=1)
    header, _ = _parts(tok)
    assert header["alg"] == "ES256"
    assert header["kid"] == pki.key_id(sa_key.public_key())
    claims = tokens.verify(tok, audiences=["api"])
    assert claims["iss"] == pki.DEFAULT_ISSUER
    assert claims["sub"] == "system:serviceaccount:ns1:sa1"
    assert claims["aud"] == ["api", "vault"]
    assert claims["iat"] == claims["nbf"] and claims["exp"] == claims["iat"] + 3600
    assert re.fullmatch(r"[0-9a-f-]{36}", claims["jti"])
    k = claims["kubernetes.io"]
    assert k["namespace"] == "ns1"
    assert k["serviceaccount"] == {"name": "sa1", "uid": "uid-1"}
    assert k["pod"] == {"name": "p1", "uid": "pod-uid"}
    assert k["node"] == {"name": "n1", "uid": "node-uid"}
    # default audiences (None) = API audiences = [issuer]
    tok2, _ = tokens.issue_bound("ns1", "sa1", "u", audiences=[pki.DEFAULT_ISSUER], expiration_s=600)
    assert "pod" not in tokens.verify(tok2, audiences=None)["kubernetes.io"]
    with pytest.raises(InvalidToken):
        tokens.verify(tok, audiences=None)


def test_wrong_audience(tokens: ServiceAccountTokens) -> None:
    tok, _ = tokens.issue_bound("ns", "sa", "u", audiences=["a"], expiration_s=600)
    with pytest.raises(InvalidToken):
        tokens.verify(tok, audiences=["b"])
    with pytest.raises(InvalidToken):
        tokens.verify(tok, audiences=[])


def test_expired(tokens: ServiceAccountTokens) -> None:
    tokens._clock = lambda: time.time() - 7200
    tok, exp = tokens.issue_bound("ns", "sa", "u", audiences=["a"], expiration_s=600)
    assert exp < _now()
    tokens._clock = time.time
    with pytest.raises(InvalidToken, match="expired"):
        tokens.verify(tok, audiences=["a"])
    # not yet valid (issued in the future)
    tokens._clock = lambda: time.time() + 7200
    fut, _ = tokens.issue_bound("ns", "sa", "u", audiences=["a"], expiration_s=600)
    tokens._clock = time.time
    with pytest.raises(InvalidToken):
        tokens.verify(fut, audiences=["a"])


def test_tampered_signature_and_payload(tokens: ServiceAccountTokens) -> None:
    tok, _ = tokens.issue_bound("ns", "sa", "u", audiences=["a"], expiration_s=600)
    h, p, s = tok.split(".")
    sig = bytearray(base64.urlsafe_b64decode(s + "=" * (-len(s) % 4)))
    sig[5] ^= 0x01
    bad = f"{h}.{p}.{base64.urlsafe_b64encode(bytes(sig)).rstrip(b'=').decode()}"
    with pytest.raises(InvalidToken):
        tokens.verify(bad, audiences=["a"])
    _, claims = _parts(tok)
    claims["sub"] = "system:serviceaccount:kube-system:admin"
    p2 = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    with pytest.raises(InvalidToken):
        tokens.verify(f"{h}.{p2}.{s}", audiences=["a"])
    # alg confusion: "none"
    none_h = base64.urlsafe_b64encode(b'{"alg":"none","typ":"JWT"}').rstrip(b"=").decode()
    with pytest.raises(InvalidToken):
        tokens.verify(f"{none_h}.{p}.", audiences=["a"])


@pytest.mark.parametrize(
    "garbage",
    [
        "",
        "abc",
        "a.b.c",
        "....",
        "eyJhbGciOiJFUzI1NiJ9.eyJ9.xx",
        "\x00\xff.\n.é",
        "a" * 5000,
        "W10.W10.W10",
        "bnVsbA.bnVsbA.bnVsbA",
    ],
)
def test_garbage(tokens: ServiceAccountTokens, garbage: str) -> None:
    with pytest.raises(InvalidToken):
        tokens.verify(garbage, audiences=["a"])
    with pytest.raises(InvalidToken):
        tokens.verify(garbage, audiences=None)


def test_non_str_input(tokens: ServiceAccountTokens) -> None:
    with pytest.raises(InvalidToken):
        tokens.verify(None, audiences=None)  # type: ignore[arg-type]
    with pytest.raises(InvalidToken):
        tokens.verify(b"a.b.c", audiences=None)  # type: ignore[arg-type]


def test_token_from_other_key(tokens: ServiceAccountTokens) -> None:
    other = ServiceAccountTokens(ec.generate_private_key(ec.SECP256R1()), [])
    tok, _ = other.issue_bound("ns", "sa", "u", audiences=["a"], expiration_s=600)
    assert other.verify(tok, audiences=["a"])["sub"] == "system:serviceaccount:ns:sa"
    with pytest.raises(InvalidToken):
        tokens.verify(tok, audiences=["a"])
    # kid stripped/forged: still rejected (all keys tried)
    leg = other.issue_legacy("ns", "sa", "u", "s")
    with pytest.raises(InvalidToken):
        tokens.verify(leg, audiences=None)


def test_key_rotation_and_verify_only(sa_key: ec.EllipticCurvePrivateKey) -> None:
    new_key = ec.generate_private_key(ec.SECP256R1())
    old = ServiceAccountTokens(sa_key, [])
    tok, _ = old.issue_bound("ns", "sa", "u", audiences=["a"], expiration_s=600)
    rotated = ServiceAccountTokens(new_key, [sa_key.public_key()])
    assert rotated.verify(tok, audiences=["a"])["sub"] == "system:serviceaccount:ns:sa"
    verifier = ServiceAccountTokens(None, [sa_key.public_key()])
    assert verifier.verify(tok, audiences=["a"])
    with pytest.raises(ValueError):
        verifier.issue_legacy("ns", "sa", "u", "s")


def test_wrong_issuer(sa_key: ec.EllipticCurvePrivateKey, tokens: ServiceAccountTokens) -> None:
    evil = ServiceAccountTokens(sa_key, [], issuer="https://evil.example")
    tok, _ = evil.issue_bound("ns", "sa", "u", audiences=["a"], expiration_s=600)
    with pytest.raises(InvalidToken):
        tokens.verify(tok, audiences=["a"])
    multi = ServiceAccountTokens(sa_key, [], extra_issuers=["https://evil.example"])
    assert multi.verify(tok, audiences=["a"])["iss"] == "https://evil.example"


def test_legacy_token(tokens: ServiceAccountTokens) -> None:
    tok = tokens.issue_legacy("ns", "default", "uid-9", "default-token-abc")
    _, raw = _parts(tok)
    assert "exp" not in raw and "aud" not in raw
    claims = tokens.verify(tok, audiences=["anything"])
    assert claims["iss"] == "kubernetes/serviceaccount"
    assert claims["sub"] == "system:serviceaccount:ns:default"
    assert claims["kubernetes.io/serviceaccount/namespace"] == "ns"
    assert claims["kubernetes.io/serviceaccount/secret.name"] == "default-token-abc"
    assert claims["kubernetes.io/serviceaccount/service-account.name"] == "default"
    assert claims["kubernetes.io/serviceaccount/service-account.uid"] == "uid-9"
    assert tokens.verify(tok, audiences=None)["sub"] == "system:serviceaccount:ns:default"


def test_jwks(sa_key: ec.EllipticCurvePrivateKey, tokens: ServiceAccountTokens) -> None:
    import jwt

    doc = pki.jwks([sa_key.public_key()])
    assert len(doc["keys"]) == 1
    k = doc["keys"][0]
    assert k["kty"] == "EC" and k["crv"] == "P-256" and k["alg"] == "ES256" and k["use"] == "sig"
    assert k["kid"] == pki.key_id(sa_key.public_key())
    # a third party can verify with the JWKS alone
    pub = jwt.PyJWK.from_dict(k).key
    tok, _ = tokens.issue_bound("ns", "sa", "u", audiences=["x"], expiration_s=600)
    claims = jwt.decode(tok, pub, algorithms=["ES256"], audience="x")
    assert claims["sub"] == "system:serviceaccount:ns:sa"


def test_webpki_chain_verification(ca: pki.KeyPair) -> None:
    """Full path validation (RFC 5280 / CA-B profile) with cryptography's verifier."""
    from cryptography.x509.verification import (
        Criticality,
        ExtensionPolicy,
        PolicyBuilder,
        Store,
        VerificationError,
    )

    builder = PolicyBuilder().store(Store([ca.cert])).time(_now())
    srv = pki.issue(
        ca, common_name="kube-apiserver", server=True, dns_names=["kubernetes.default"], ips=["10.96.0.1"]
    )
    chain = builder.build_server_verifier(x509.DNSName("kubernetes.default")).verify(srv.cert, [])
    assert chain[-1] == ca.cert
    builder.build_server_verifier(x509.IPAddress(ipaddress.ip_address("10.96.0.1"))).verify(srv.cert, [])
    # Kubernetes client certs carry no SAN (Go's verifier does not require one); relax only that.
    ee = ExtensionPolicy.webpki_defaults_ee().may_be_present(
        x509.SubjectAlternativeName, Criticality.AGNOSTIC, None
    )
    cbuilder = builder.extension_policies(ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=ee)
    cl = pki.issue(ca, common_name="alice", organizations=["dev"], client=True)
    verified = cbuilder.build_client_verifier().verify(cl.cert, [])
    assert verified.chain[-1] == ca.cert
    # a server-only cert must not pass as a client cert (EKU enforced)
    with pytest.raises(VerificationError):
        cbuilder.build_client_verifier().verify(srv.cert, [])
