"""Bootstrap tokens (``[a-z0-9]{6}.[a-z0-9]{16}``): generation, their kube-system Secret, and the detached JWS
the bootstrapsigner puts into ``kube-public/cluster-info`` (HS256 keyed with the full token, as kubeadm's).

Pure helpers: no I/O.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import secrets
from datetime import UTC, datetime, timedelta
from typing import Any

TOKEN_RE = re.compile(r"\A([a-z0-9]{6})\.([a-z0-9]{16})\Z")
ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"
SECRET_TYPE = "bootstrap.kubernetes.io/token"
SECRET_PREFIX = "bootstrap-token-"
NAMESPACE = "kube-system"
DEFAULT_GROUP = "system:bootstrappers:kplane:default-node-token"


def generate() -> str:
    """A fresh random bootstrap token ``<id>.<secret>``."""
    tid = "".join(secrets.choice(ALPHABET) for _ in range(6))
    sec = "".join(secrets.choice(ALPHABET) for _ in range(16))
    return f"{tid}.{sec}"


def parse(token: str) -> tuple[str, str]:
    """Split a token into (token-id, token-secret); ValueError if malformed."""
    m = TOKEN_RE.match(token)
    if m is None:
        raise ValueError("malformed bootstrap token")
    return m.group(1), m.group(2)


def _rfc3339(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def secret_for(token: str, *, ttl_s: int, description: str = "kplane bootstrap token",
               groups: list[str] | None = None) -> dict[str, Any]:
    """The ``kube-system/bootstrap-token-<id>`` Secret for ``token`` (``ttl_s <= 0``: never expires)."""
    tid, sec = parse(token)
    data = {
        "token-id": tid,
        "token-secret": sec,
        "usage-bootstrap-authentication": "true",
        "usage-bootstrap-signing": "true",
        "auth-extra-groups": ",".join(groups if groups else [DEFAULT_GROUP]),
    }
    if description:
        data["description"] = description
    if ttl_s > 0:
        data["expiration"] = _rfc3339(datetime.now(UTC) + timedelta(seconds=ttl_s))
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": SECRET_PREFIX + tid, "namespace": NAMESPACE},
        "type": SECRET_TYPE,
        "stringData": data,
    }


def _b64u(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode("ascii")


def _b64u_dec(s: str) -> bytes:
    if not re.fullmatch(r"[A-Za-z0-9_-]*", s):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def _header(token_id: str) -> str:
    return _b64u(json.dumps({"alg": "HS256", "kid": token_id}, separators=(",", ":")).encode())


def _mac(header_b64: str, payload: bytes, token: str) -> bytes:
    signing_input = f"{header_b64}.{_b64u(payload)}".encode("ascii")
    return hmac.new(token.encode(), signing_input, hashlib.sha256).digest()


def jws_detached(payload: bytes, token: str) -> str:
    """Detached compact JWS ``<header>..<signature>`` over ``payload``, HS256 keyed with the full token."""
    tid, _ = parse(token)
    h = _header(tid)
    return f"{h}..{_b64u(_mac(h, payload, token))}"


def verify_jws_detached(sig: str, payload: bytes, token: str) -> bool:
    """True only for a detached HS256 JWS over ``payload`` made with ``token`` (any other alg is refused)."""
    try:
        tid, _ = parse(token)
        parts = sig.split(".")
        if len(parts) != 3 or parts[1] != "":
            return False
        header = json.loads(_b64u_dec(parts[0]))
        if not isinstance(header, dict) or header.get("alg") != "HS256":
            return False
        if set(header) - {"alg", "kid", "typ"}:
            return False  # crit, jwk, jku, b64, ...: nothing we understand
        if "kid" in header and header["kid"] != tid:
            return False
        got = _b64u_dec(parts[2])
    except (ValueError, binascii.Error, UnicodeDecodeError):
        return False
    return hmac.compare_digest(got, _mac(parts[0], payload, token))
