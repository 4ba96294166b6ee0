"""Streaming protocols used by exec, attach and port-forward.

* :mod:`kplane.streams.spdy` -- sans-I/O SPDY/3.1 framing as spoken by Kubernetes clients.
* :mod:`kplane.streams.channels` -- sans-I/O k8s WebSocket channel framing and the
  remotecommand protocol table (status payloads, resize messages).
* :mod:`kplane.streams.session` -- thin asyncio adapters: server-side exec/attach and
  port-forward sessions over SPDY, WebSocket and SPDY-in-WebSocket.
"""
