"""A small HTTP(S) server run as a pod's process (or on the host) by the proxy tests.

Usage: proxy_backend.py PORT [CERT_KEY_PEM] [BIND]. Every answer is JSON describing the request it got, so the tests
can see exactly what the apiserver forwarded."""

from __future__ import annotations

import json
import ssl
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if self.headers.get("Upgrade"):
            self.send_response(302)
            self.send_header("Location", "http://127.0.0.1:1/elsewhere")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.path.startswith("/redirect-self"):
            host = self.headers.get("Host", "")
            self.send_response(302)
            self.send_header("Location", f"http://{host}/landed?x=1")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.path.startswith("/redirect-away"):
            self.send_response(307)
            self.send_header("Location", "http://169.254.169.254/latest/meta-data/")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.path.startswith("/big"):
            data = b"x" * (4 * 1024 * 1024)
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        out = json.dumps({"method": self.command, "path": self.path, "headers": dict(self.headers.items()),
                          "body": body.decode(errors="replace"), "port": self.server.server_address[1],
                          "tag": sys.argv[4] if len(sys.argv) > 4 else ""}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(out)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _answer

    def log_message(self, format: str, *args: object) -> None:
        pass


def main() -> None:
    port = int(sys.argv[1])
    pem = sys.argv[2] if len(sys.argv) > 2 and sys.argv[2] != "-" else None
    bind = sys.argv[3] if len(sys.argv) > 3 else "0.0.0.0"
    srv = ThreadingHTTPServer((bind, port), Handler)
    if pem:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(pem)
        srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    print(f"serving on {bind}:{port}", flush=True)
    srv.serve_forever()


if __name__ == "__main__":
    main()
