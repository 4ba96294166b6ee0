"""Start a real kplane control plane as a subprocess on an ephemeral port, and drive it with real kubectl."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

KUBECTL = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or "kubectl"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Cluster:
    data_dir: Path
    port: int = field(default_factory=free_port)
    extra_args: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def kubeconfig(self) -> Path:
        return self.data_dir / "admin.kubeconfig"

    @property
    def pki(self) -> Path:
        return self.data_dir / "pki"

    def start(self, timeout: float = 30.0) -> None:
        log = (self.data_dir.parent / f"{self.data_dir.name}.log").open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kplane.cli", "up", "--data-dir", str(self.data_dir),
             "--apiserver-port", str(self.port), "--bind-address", "127.0.0.1", *self.extra_args],
            stdout=log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kplane exited with {self.proc.returncode}")
            try:
                with urllib.request.urlopen(f"{self.url}/readyz", context=ctx, timeout=1) as r:
                    if r.status == 200 and self.kubeconfig.exists():
                        return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("kplane did not become ready")

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise

    def kubectl(self, *args: str, input: str | None = None, check: bool = True, kubeconfig: Path | None = None,
                env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        e = dict(os.environ, KUBECONFIG=str(kubeconfig or self.kubeconfig), HOME=str(self.data_dir.parent))
        e.update(env or {})
        p = subprocess.run([KUBECTL, *args], input=input, capture_output=True, text=True, env=e, timeout=timeout)
        if check and p.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
        return p

    def token_kubeconfig(self, path: Path, token: str) -> Path:
        from kplane.pki import write_kubeconfig

        write_kubeconfig(path, server=self.url, ca_pem=(self.pki / "ca.crt").read_bytes(), token=token, user="tok")
        return path
