"""Pure unit tests of kplane.bootstraptoken: tokens, their Secret and the cluster-info detached JWS."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from datetime import UTC, datetime

import jwt
import pytest

from kplane import bootstraptoken as bt

TOKEN = "abcdef.0123456789abcdef"
PAYLOAD = b"apiVersion: v1\nclusters: []\nkind: Config\n"


def _b64u(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def _hs256(header: dict[str, object], payload: bytes, key: str) -> str:
    h = _b64u(json.dumps(header, separators=(",", ":")).encode())
    sig = hmac.new(key.encode(), f"{h}.{_b64u(payload)}".encode(), hashlib.sha256).digest()
    return f"{h}..{_b64u(sig)}"


def test_generate_format_and_randomness() -> None:
    toks = {bt.generate() for _ in range(50)}
    assert len(toks) == 50
    for t in toks:
        assert bt.TOKEN_RE.match(t)


def test_parse_rejects_malformed() -> None:
    for bad in ("", "abcdef", "ABCDEF.0123456789abcdef", "abcdef.0123456789abcde", "abcdef.0123456789abcdef\n",
                "abcde.0123456789abcdefg"):
        with pytest.raises(ValueError):
            bt.parse(bad)


def test_secret_for() -> None:
    s = bt.secret_for(TOKEN, ttl_s=3600, description="join", groups=["system:bootstrappers:x"])
    assert s["metadata"] == {"name": "bootstrap-token-abcdef", "namespace": "kube-system"}
    assert s["type"] == "bootstrap.kubernetes.io/token"
    d = s["stringData"]
    assert d["token-id"] == "abcdef" and d["token-secret"] == "0123456789abcdef"
    assert d["usage-bootstrap-authentication"] == "true" and d["usage-bootstrap-signing"] == "true"
    assert d["auth-extra-groups"] == "system:bootstrappers:x"
    assert d["description"] == "join"
    exp = datetime.strptime(d["expiration"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    assert 3500 < (exp - datetime.now(UTC)).total_seconds() <= 3600
    d2 = bt.secret_for(TOKEN, ttl_s=60, description="", groups=[])["stringData"]
    assert d2["auth-extra-groups"] == "system:bootstrappers:kplane:default-node-token"
    with pytest.raises(ValueError):
        bt.secret_for("nope", ttl_s=1, description="", groups=[])


def test_jws_roundtrip_and_shape() -> None:
    sig = bt.jws_detached(PAYLOAD, TOKEN)
    h, mid, s = sig.split(".")
    assert mid == ""
    assert json.loads(base64.urlsafe_b64decode(h + "==")) == {"alg": "HS256", "kid": "abcdef"}
    assert bt.verify_jws_detached(sig, PAYLOAD, TOKEN)
    assert _hs256({"alg": "HS256", "kid": "abcdef"}, PAYLOAD, TOKEN).split(".")[2] == s


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")
def test_jws_interop_with_pyjwt() -> None:
    # ours verifies under a generic JWS library once the payload is re-attached, and vice versa
    h, _, s = bt.jws_detached(PAYLOAD, TOKEN).split(".")
    assert jwt.api_jws.PyJWS().decode(f"{h}.{_b64u(PAYLOAD)}.{s}", TOKEN, algorithms=["HS256"]) == PAYLOAD
    theirs = jwt.api_jws.PyJWS().encode(PAYLOAD, TOKEN, algorithm="HS256", headers={"kid": "abcdef"})
    th, _, ts = theirs.split(".")
    assert bt.verify_jws_detached(f"{th}..{ts}", PAYLOAD, TOKEN)


def test_jws_wrong_token() -> None:
    sig = bt.jws_detached(PAYLOAD, TOKEN)
    assert not bt.verify_jws_detached(sig, PAYLOAD, "abcdef.0123456789abcdee")
    assert not bt.verify_jws_detached(sig, PAYLOAD, "abcdeg.0123456789abcdef")
    assert not bt.verify_jws_detached(sig, PAYLOAD, "not-a-token")


def test_jws_tampered_payload_or_signature() -> None:
    sig = bt.jws_detached(PAYLOAD, TOKEN)
    assert not bt.verify_jws_detached(sig, PAYLOAD + b" ", TOKEN)
    assert not bt.verify_jws_detached(sig, b"", TOKEN)
    h, _, s = sig.split(".")
    flipped = s[:-2] + ("A" if s[-2] != "A" else "B") + s[-1]
    assert not bt.verify_jws_detached(f"{h}..{flipped}", PAYLOAD, TOKEN)
    assert not bt.verify_jws_detached(f"{h}..", PAYLOAD, TOKEN)


def test_jws_alg_none_and_others_refused() -> None:
    tid = "abcdef"
    none_h = _b64u(json.dumps({"alg": "none", "kid": tid}).encode())
    assert not bt.verify_jws_detached(f"{none_h}..", PAYLOAD, TOKEN)
    # a correct HMAC does not help when the header does not say HS256
    for alg in ("none", "None", "HS512", "hs256", "RS256", None):
        forged = _hs256({"alg": alg, "kid": tid}, PAYLOAD, TOKEN)
        assert not bt.verify_jws_detached(forged, PAYLOAD, TOKEN), alg
    assert not bt.verify_jws_detached(_hs256({"kid": tid}, PAYLOAD, TOKEN), PAYLOAD, TOKEN)
    # a kid for another token, or unknown critical header parameters, are refused too
    assert not bt.verify_jws_detached(_hs256({"alg": "HS256", "kid": "zzzzzz"}, PAYLOAD, TOKEN), PAYLOAD, TOKEN)
    assert not bt.verify_jws_detached(_hs256({"alg": "HS256", "kid": tid, "crit": ["b64"], "b64": False},
                                             PAYLOAD, TOKEN), PAYLOAD, TOKEN)


def test_jws_malformed_inputs() -> None:
    sig = bt.jws_detached(PAYLOAD, TOKEN)
    h, _, s = sig.split(".")
    for bad in ("", "..", "a.b.c", f"{h}.{_b64u(PAYLOAD)}.{s}", f"{h}..{s}.", "!!!..???", f"{h}..{s}=",
                _b64u(b"[1]") + ".." + s, _b64u(b"not json") + ".." + s):
        assert not bt.verify_jws_detached(bad, PAYLOAD, TOKEN), bad
