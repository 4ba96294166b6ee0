"""Kubelet streaming endpoints: ``/exec``, ``/attach``, ``/portForward`` and ``/run``.

Each endpoint accepts a WebSocket (remotecommand v1-v5 channels; port-forward v4 channels or SPDY tunnelled in
WebSocket messages) or a SPDY/3.1 upgrade, and bridges the session to the runtime: an exec'd process, the main
process's attach socket, or a TCP connection to the pod's port.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

from aiohttp import web

from kplane.errors import StatusError
from kplane.httpupgrade import UPGRADE_RESPONSE
from kplane.kubelet import podnet
from kplane.streams import channels, session

if TYPE_CHECKING:
    from kplane.kubelet.server import KubeletServer

log = logging.getLogger(__name__)

_TRUE = ("1", "true", "True")


def _flag(req: web.Request, *names: str) -> bool:
    return any(req.query.get(n) in _TRUE for n in names)


def _is_websocket(req: web.Request) -> bool:
    return req.headers.get("Upgrade", "").lower() == "websocket"


def _is_spdy(req: web.Request) -> bool:
    return "spdy/3.1" in req.headers.get("Upgrade", "").lower()


async def dispatch(server: KubeletServer, req: web.Request, kind: str, parts: list[str]) -> web.StreamResponse:
    if kind == "portForward":
        if len(parts) not in (2, 3):
            raise StatusError(404, "expected /portForward/{namespace}/{pod}[/{uid}]")
        return await port_forward(server, req, parts[0], parts[1], parts[2] if len(parts) == 3 else None)
    if len(parts) not in (3, 4):
        raise StatusError(404, f"expected /{kind}/{{namespace}}/{{pod}}[/{{uid}}]/{{container}}")
    ns, pod, container = parts[0], parts[1], parts[-1]
    uid = parts[2] if len(parts) == 4 else None
    w = server.find_pod(ns, pod, uid)
    cid = server.container_id(w, container)
    runtime = server.agent.pods.runtime
    if runtime.status(cid).state != "running":
        raise StatusError(400, f"container {container} is not running (pod {pod})")
    if kind == "run":
        if req.method != "POST":
            raise StatusError(405, "run needs POST")
        cmd = [c for c in req.query.get("cmd", "").split(" ") if c]
        if not cmd:
            raise StatusError(400, "missing cmd")
        return await run_once(runtime, cid, cmd)
    commands = req.query.getall("command", [])
    if kind == "exec" and not commands:
        raise StatusError(400, "you must specify at least 1 command")
    expect = {n for n, keys in (("stdin", ("input", "stdin")), ("stdout", ("output", "stdout")),
                                ("stderr", ("error", "stderr")), ("tty", ("tty",))) if _flag(req, *keys)}
    if not expect & {"stdin", "stdout", "stderr"}:
        raise StatusError(400, "you must specify at least one of stdin, stdout, stderr")
    if _is_websocket(req):
        ws = web.WebSocketResponse(protocols=channels.REMOTECOMMAND_WS_PROTOCOLS, max_msg_size=0)
        if not ws.can_prepare(req).ok:
            raise StatusError(400, "unable to upgrade: the WebSocket handshake is invalid or no subprotocol matches "
                                   f"(offer one of {', '.join(channels.REMOTECOMMAND_WS_PROTOCOLS)})")
        await ws.prepare(req)
        sess: session.RemoteCommandSession = await session.websocket_remotecommand(ws, ws.ws_protocol,
                                                                                    expect=expect)
        response: web.StreamResponse = ws
    elif _is_spdy(req):
        proto, err = session.negotiate_spdy(req.headers)
        if err is not None:
            return err
        assert proto is not None
        reader, writer = await session.accept_spdy_upgrade(req, proto)
        try:
            sess = await session.spdy_remotecommand(reader, writer, proto, expect=expect)
        except TimeoutError:
            writer.close()
            return req[UPGRADE_RESPONSE]
        response = req[UPGRADE_RESPONSE]
    else:
        raise StatusError(400, "Upgrade request required")
    try:
        if kind == "exec":
            await bridge_exec(runtime, cid, commands, sess, tty="tty" in expect)
        else:
            await bridge_attach(runtime, cid, sess, tty="tty" in expect)
    except Exception as exc:
        log.exception("kubelet: %s in %s/%s failed", kind, ns, pod)
        with contextlib.suppress(Exception):
            await sess.finish(None, f"{kind} failed: {exc}")
    return response


async def run_once(runtime: Any, cid: str, cmd: list[str]) -> web.Response:
    proc = await runtime.exec(cid, cmd, tty=False, stdin=False)
    out, err = await asyncio.gather(_read_all(proc.read_stdout), _read_all(proc.read_stderr))
    await proc.wait()
    return web.Response(body=out + err, content_type="text/plain")


async def _read_all(read: Any) -> bytes:
    chunks: list[bytes] = []
    while True:
        b = await read()
        if not b:
            return b"".join(chunks)
        chunks.append(b)


async def _pump_stdin(sess: Any, write: Any, close: Any) -> None:
    try:
        while True:
            data = await sess.stdin.read(65536)
            if not data:
                break
            await write(data)
    except (ConnectionError, OSError, asyncio.IncompleteReadError):
        pass
    finally:
        with contextlib.suppress(Exception):
            await close()


async def _pump_out(read: Any, write: Any) -> None:
    while True:
        data = await read()
        if not data:
            return
        try:
            await write(data)
        except (ConnectionError, OSError):
            return


async def _pump_resize(sess: Any, proc: Any) -> None:
    while True:
        w, h = await sess.resize.get()
        with contextlib.suppress(OSError):
            proc.resize(w, h)


async def bridge_exec(runtime: Any, cid: str, argv: list[str], sess: Any, *, tty: bool) -> None:
    proc = await runtime.exec(cid, argv, tty=tty, stdin=sess.stdin is not None)
    aux: list[asyncio.Task[Any]] = []
    if sess.stdin is not None:
        aux.append(asyncio.create_task(_pump_stdin(sess, proc.write_stdin, proc.close_stdin)))
    if sess.resize is not None and tty:
        aux.append(asyncio.create_task(_pump_resize(sess, proc)))
    outs = [asyncio.create_task(_pump_out(proc.read_stdout, sess.write_stdout))]
    if not tty:
        outs.append(asyncio.create_task(_pump_out(proc.read_stderr, sess.write_stderr)))
    gone = asyncio.create_task(sess.disconnected.wait())
    waiter = asyncio.create_task(proc.wait())
    try:
        done, _ = await asyncio.wait({waiter, gone}, return_when=asyncio.FIRST_COMPLETED)
        if waiter not in done:
            # the client went away: the command must not outlive its session
            proc.kill()
            await waiter
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*outs), 10)
        code = waiter.result()
        await sess.finish(code)
    finally:
        for t in (*aux, *outs, gone, waiter):
            t.cancel()
        with contextlib.suppress(Exception):
            proc.close()


async def bridge_attach(runtime: Any, cid: str, sess: Any, *, tty: bool) -> None:
    att = await runtime.attach(cid, stdin=sess.stdin is not None)
    aux: list[asyncio.Task[Any]] = []
    if sess.stdin is not None:
        aux.append(asyncio.create_task(_pump_stdin(sess, att.write_stdin, att.close_stdin)))
    if sess.resize is not None and tty:
        aux.append(asyncio.create_task(_pump_resize(sess, att)))
    outs = [asyncio.create_task(_pump_out(att.read_stdout, sess.write_stdout))]
    if not tty:
        outs.append(asyncio.create_task(_pump_out(att.read_stderr, sess.write_stderr)))
    gone = asyncio.create_task(sess.disconnected.wait())
    all_out: asyncio.Future[Any] = asyncio.gather(*outs, return_exceptions=True)
    try:
        await asyncio.wait({all_out, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not gone.done():
            st = runtime.status(cid)
            code = st.exit.exit_code if st.exit is not None else 0
            await sess.finish(code)
    finally:
        for t in (*aux, *outs, gone):
            t.cancel()
        all_out.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await all_out
        with contextlib.suppress(Exception):
            await att.close()


async def port_forward(server: KubeletServer, req: web.Request, ns: str, pod: str, uid: str | None,
                       ) -> web.StreamResponse:
    w = server.find_pod(ns, pod, uid)
    netns = server.agent.pods.netns_path(w)  # None: the pod uses the host's network

    async def dial(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """localhost:port inside the pod's network namespace, as upstream (a server bound only to 127.0.0.1 in
        the pod is reachable)."""
        if not 0 < port < 65536:
            raise ValueError(f"invalid port {port}")
        try:
            if netns is not None:
                return await asyncio.wait_for(podnet.open_connection_in_netns(netns, port, connect_timeout_s=10), 15)
            return await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
        except (OSError, TimeoutError) as exc:
            raise ConnectionError(f"failed to connect to localhost:{port} inside namespace of pod {pod}: "
                                  f"{exc}") from exc

    if _is_websocket(req):
        protos = [channels.SPDY_TUNNEL_PORTFORWARD, *channels.PORTFORWARD_WS_PROTOCOLS]
        ws = web.WebSocketResponse(protocols=protos, max_msg_size=0)
        if not ws.can_prepare(req).ok:
            raise StatusError(400, f"unable to upgrade: offer one of {', '.join(protos)}")
        await ws.prepare(req)
        if ws.ws_protocol == channels.SPDY_TUNNEL_PORTFORWARD:
            reader, writer = session.tunnel_spdy_over_websocket(ws)
            await session.spdy_portforward(reader, writer, dial)
        else:
            ports = []
            for v in req.query.getall("port", []):
                for p in v.split(","):
                    try:
                        ports.append(int(p))
                    except ValueError:
                        await ws.close(message=f"invalid port {p!r}".encode())
                        return ws
            if not ports:
                await ws.close(message=b"at least one port is required")
                return ws
            await session.websocket_portforward(ws, ports, dial)
        return ws
    if _is_spdy(req):
        proto, err = session.negotiate_spdy(req.headers, channels.PORTFORWARD_SPDY_PROTOCOLS)
        if err is not None:
            return err
        reader2, writer2 = await session.accept_spdy_upgrade(req, proto or "portforward.k8s.io")
        await session.spdy_portforward(reader2, writer2, dial)
        return req[UPGRADE_RESPONSE]
    raise StatusError(400, "Upgrade request required")
