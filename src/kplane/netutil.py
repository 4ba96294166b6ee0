"""Small network helpers shared by the control plane and the node agent."""

from __future__ import annotations

import asyncio
import ipaddress
import socket


def default_ipv4(fallback: str = "127.0.0.1") -> str:
    """The IPv4 address of the interface that holds the default route (what upstream's apiserver advertises and
    the kubelet reports when no address is given), or ``fallback`` when there is no default route.

    A UDP socket is connected to a documentation address (TEST-NET-3); connecting a datagram socket only asks the
    kernel for a route, no packet is sent."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("203.0.113.1", 9))
            ip = str(s.getsockname()[0])
        except OSError:
            return fallback
    try:
        addr = ipaddress.IPv4Address(ip)
    except ValueError:
        return fallback
    if addr.is_unspecified or addr.is_loopback:
        return fallback
    return ip


def parse_cidr(text: str, what: str) -> ipaddress.IPv4Network:
    try:
        net = ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}") from None
    if not isinstance(net, ipaddress.IPv4Network):
        raise ValueError(f"{what}: only IPv4 ranges are supported")
    return net


async def wait_readable(sock: socket.socket) -> None:
    """Wait until a non-blocking socket has data (or EOF) to read, without reading it."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    loop.add_reader(fd, ready)
    try:
        await fut
    finally:
        loop.remove_reader(fd)
