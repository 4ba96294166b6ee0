"""One error type that carries a Kubernetes ``Status``.

Every HTTP error the apiserver (and later the kubelet) returns is the JSON of :meth:`StatusError.status`.
"""

from __future__ import annotations

from typing import Any

_REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    406: "NotAcceptable",
    409: "Conflict",
    410: "Expired",
    413: "RequestEntityTooLarge",
    415: "UnsupportedMediaType",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}


class StatusError(Exception):
    """An API error: HTTP code, machine reason, human message, optional details."""

    def __init__(
        self,
        code: int,
        message: str,
        *,
        reason: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason or _REASONS.get(code, "Unknown")
        self.details = details

    def status(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details:
            body["details"] = self.details
        return body


def not_found(resource: str, name: str, group: str = "") -> StatusError:
    what = f"{resource}.{group}" if group else resource
    return StatusError(
        404,
        f'{what} "{name}" not found',
        details={"name": name, "group": group, "kind": resource},
    )


def already_exists(resource: str, name: str, group: str = "") -> StatusError:
    what = f"{resource}.{group}" if group else resource
    return StatusError(
        409,
        f'{what} "{name}" already exists',
        reason="AlreadyExists",
        details={"name": name, "group": group, "kind": resource},
    )


def conflict(resource: str, name: str, group: str = "") -> StatusError:
    what = f"{resource}.{group}" if group else resource
    return StatusError(
        409,
        f'Operation cannot be fulfilled on {what} "{name}": the object has been modified; '
        "please apply your changes to the latest version and try again",
        reason="Conflict",
        details={"name": name, "group": group, "kind": resource},
    )


def invalid(kind: str, name: str, causes: list[tuple[str, str, str]], group: str = "") -> StatusError:
    """causes: (field, reason-type, message), e.g. ("metadata.name", "FieldValueInvalid", "...")."""
    text = "; ".join(f"{f}: {m}" for f, _, m in causes)
    return StatusError(
        422,
        f'{kind} "{name}" is invalid: {text}',
        details={
            "name": name,
            "group": group,
            "kind": kind,
            "causes": [{"reason": r, "message": m, "field": f} for f, r, m in causes],
        },
    )
