"""Kubelet streaming endpoints: exec, attach, portForward, run."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from kplane.errors import StatusError


async def dispatch(server: Any, req: web.Request, kind: str, parts: list[str]) -> web.StreamResponse:
    raise StatusError(501, f"{kind} is being implemented")
