"""Request authentication: a union chain of x509 client certs, bearer tokens (static file, bootstrap tokens,
service-account JWTs) and, last, anonymous.

Semantics (apiserver ``union`` + ``anonymous`` with fail-on-error): the first authenticator that recognises a
credential wins; a credential that is presented but fails (expired cert, unknown bearer token) is a 401 even
when anonymous is enabled; only a request with no credential at all becomes ``system:anonymous``.
"""

from __future__ import annotations

import base64
import csv
import hmac
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kplane.api import meta
from kplane.errors import StatusError

if TYPE_CHECKING:
    from kplane.pki import ServiceAccountTokens
    from kplane.storage.base import Store

BOOTSTRAP_TOKEN = re.compile(r"\A([a-z0-9]{6})\.([a-z0-9]{16})\Z")
BOOTSTRAP_GROUP = re.compile(r"\Asystem:bootstrappers:[a-z0-9:-]{0,255}[a-z0-9]\Z")
WS_TOKEN_PREFIX = "base64url.bearer.authorization.k8s.io."


@dataclass(frozen=True)
class UserInfo:
    name: str
    uid: str = ""
    groups: tuple[str, ...] = ()
    extra: dict[str, list[str]] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"username": self.name, "groups": list(self.groups)}
        if self.uid:
            out["uid"] = self.uid
        if self.extra:
            out["extra"] = self.extra
        return out

    @property
    def node_name(self) -> str | None:
        """The node this identity is (``system:node:<name>`` in group ``system:nodes``), or None."""
        if self.name.startswith("system:node:") and "system:nodes" in self.groups:
            return self.name[len("system:node:") :]
        return None


ANONYMOUS = UserInfo("system:anonymous", groups=("system:unauthenticated",))


def unauthorized(message: str = "Unauthorized") -> StatusError:
    return StatusError(401, message)


def _with_authenticated(user: UserInfo) -> UserInfo:
    if "system:authenticated" in user.groups or "system:unauthenticated" in user.groups:
        return user
    return UserInfo(user.name, user.uid, (*user.groups, "system:authenticated"), user.extra)


class Authenticator:
    def __init__(
        self,
        *,
        store: Store,
        sa_tokens: ServiceAccountTokens,
        api_audiences: list[str],
        token_file: Path | None = None,
        anonymous: bool = True,
    ) -> None:
        self.store = store
        self.sa_tokens = sa_tokens
        self.api_audiences = api_audiences
        self.anonymous = anonymous
        self.static: dict[str, UserInfo] = {}
        if token_file is not None and token_file.exists():
            self.static = load_token_file(token_file)

    async def authenticate(self, *, peer_cert_der: bytes | None, authorization: str | None,
                           ws_protocols: str | None = None) -> UserInfo:
        if peer_cert_der:
            return _with_authenticated(authenticate_cert(peer_cert_der))
        token = bearer_token(authorization)
        if token is None and ws_protocols:
            token = websocket_token(ws_protocols)
        if token is not None:
            user = await self.authenticate_token(token, audiences=None)
            if user is None:
                raise unauthorized()
            return _with_authenticated(user)
        if authorization is not None and authorization.strip():
            raise unauthorized()
        if self.anonymous:
            return ANONYMOUS
        raise unauthorized()

    async def authenticate_token(self, token: str, *, audiences: list[str] | None) -> UserInfo | None:
        """Token authenticators in union. None when no authenticator recognises the token."""
        static = self.static.get(token)
        if static is not None:
            return static
        m = BOOTSTRAP_TOKEN.match(token)
        if m:
            return await self._bootstrap(m.group(1), m.group(2))
        if token.count(".") == 2:
            return await self._service_account(token, audiences)
        return None

    async def _bootstrap(self, token_id: str, secret: str) -> UserInfo | None:
        from kplane.storage.base import KeyNotFound

        try:
            obj = await self.store.get(f"/registry/core/secrets/kube-system/bootstrap-token-{token_id}")
        except KeyNotFound:
            return None
        if obj.get("metadata", {}).get("deletionTimestamp") or obj.get("type") != "bootstrap.kubernetes.io/token":
            return None
        data = {k: _b64(v) for k, v in (obj.get("data") or {}).items()}
        if not hmac.compare_digest(data.get("token-secret", "").encode(), secret.encode()):
            return None
        if data.get("token-id") != token_id:
            return None
        exp = data.get("expiration")
        if exp:
            when = meta.parse_time(exp)
            if when is None or when <= datetime.now(UTC):
                return None
        if data.get("usage-bootstrap-authentication") != "true":
            return None
        groups = ["system:bootstrappers"]
        for g in (data.get("auth-extra-groups") or "").split(","):
            g = g.strip()
            if not g:
                continue
            if not BOOTSTRAP_GROUP.match(g):
                return None
            groups.append(g)
        return UserInfo(f"system:bootstrap:{token_id}", groups=tuple(groups))

    async def _service_account(self, token: str, audiences: list[str] | None) -> UserInfo | None:
        from kplane.pki import InvalidToken
        from kplane.storage.base import KeyNotFound

        try:
            claims = self.sa_tokens.verify(token, audiences=audiences or self.api_audiences)
        except InvalidToken:
            return None
        if claims.get("iss") == "kubernetes/serviceaccount":
            ns = claims.get("kubernetes.io/serviceaccount/namespace", "")
            name = claims.get("kubernetes.io/serviceaccount/service-account.name", "")
            uid = claims.get("kubernetes.io/serviceaccount/service-account.uid", "")
            secret = claims.get("kubernetes.io/serviceaccount/secret.name", "")
            try:
                sec = await self.store.get(f"/registry/core/secrets/{ns}/{secret}")
            except KeyNotFound:
                return None
            if _b64((sec.get("data") or {}).get("token", "")) != token:
                return None
            extra: dict[str, list[str]] = {}
        else:
            k8s = claims.get("kubernetes.io") or {}
            ns = k8s.get("namespace", "")
            name = (k8s.get("serviceaccount") or {}).get("name", "")
            uid = (k8s.get("serviceaccount") or {}).get("uid", "")
            extra = {}
            pod = k8s.get("pod")
            if pod:
                try:
                    p = await self.store.get(f"/registry/core/pods/{ns}/{pod.get('name')}")
                except KeyNotFound:
                    return None
                if p.get("metadata", {}).get("uid") != pod.get("uid") or p["metadata"].get("deletionTimestamp"):
                    return None
                extra["authentication.kubernetes.io/pod-name"] = [str(pod.get("name"))]
                extra["authentication.kubernetes.io/pod-uid"] = [str(pod.get("uid"))]
            node = k8s.get("node")
            if node:
                extra["authentication.kubernetes.io/node-name"] = [str(node.get("name"))]
                extra["authentication.kubernetes.io/node-uid"] = [str(node.get("uid"))]
            if claims.get("jti"):
                extra["authentication.kubernetes.io/credential-id"] = [f"JTI={claims['jti']}"]
        try:
            sa = await self.store.get(f"/registry/core/serviceaccounts/{ns}/{name}")
        except KeyNotFound:
            return None
        if sa.get("metadata", {}).get("uid") != uid or sa["metadata"].get("deletionTimestamp"):
            return None
        return UserInfo(
            f"system:serviceaccount:{ns}:{name}",
            uid=uid,
            groups=("system:serviceaccounts", f"system:serviceaccounts:{ns}"),
            extra=extra,
        )


def _b64(v: Any) -> str:
    try:
        return base64.b64decode(v).decode()
    except (ValueError, TypeError, UnicodeDecodeError):
        return ""


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    parts = authorization.strip().split(" ")
    if len(parts) < 2 or parts[0].lower() != "bearer":
        return None
    token = parts[-1] if len(parts) == 2 else ""
    return token or None


def websocket_token(protocols: str) -> str | None:
    entries = [p.strip() for p in protocols.split(",") if p.strip()]
    tokens = [p for p in entries if p.startswith(WS_TOKEN_PREFIX)]
    if not tokens:
        return None
    if len(tokens) > 1 or len(entries) < 2:
        raise unauthorized("invalid bearer token subprotocol")
    raw = tokens[0][len(WS_TOKEN_PREFIX) :]
    try:
        return base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).decode()
    except (ValueError, UnicodeDecodeError) as exc:
        raise unauthorized("invalid bearer token subprotocol") from exc


def authenticate_cert(der: bytes) -> UserInfo:
    """The TLS layer verified the chain against the client CA (time checks are deferred here, so an expired
    certificate gets a clear 401 rather than a TLS alert)."""
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError as exc:
        raise unauthorized("x509: malformed certificate") from exc
    now = datetime.now(UTC)
    if cert.not_valid_after_utc < now:
        raise unauthorized(
            f"x509: certificate has expired or is not yet valid: current time {now:%Y-%m-%dT%H:%M:%SZ} is after "
            f"{cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}"
        )
    if cert.not_valid_before_utc > now:
        raise unauthorized("x509: certificate is not yet valid")
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        if ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
            raise unauthorized("x509: certificate specifies an incompatible key usage")
    except x509.ExtensionNotFound:
        pass
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not cns or not str(cns[0].value):
        raise unauthorized("x509: certificate has no common name")
    orgs = tuple(str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME))
    return UserInfo(str(cns[0].value), groups=orgs)


def load_token_file(path: Path) -> dict[str, UserInfo]:
    """``--token-auth-file``: CSV ``token,user,uid,"group1,group2"``."""
    out: dict[str, UserInfo] = {}
    with path.open(newline="") as fh:
        for row in csv.reader(fh):
            if len(row) < 3 or row[0].startswith("#"):
                continue
            groups = tuple(g.strip() for g in row[3].split(",") if g.strip()) if len(row) > 3 else ()
            out[row[0]] = UserInfo(row[1], uid=row[2], groups=groups)
    return out
