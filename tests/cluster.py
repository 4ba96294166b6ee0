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
from typing import Any

KUBECTL = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or "kubectl"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


NET_CLAIMS = Path("/tmp/kplane-test-nets")


def claim_net_index() -> int:
    """A network index no other live test process holds: clusters share the host's network namespace, so each
    gets its own pod CIDR (10.<100+i>.0.0/16) and service CIDR (a /20 in 172.16.0.0/12)."""
    NET_CLAIMS.mkdir(exist_ok=True)
    for i in range(150):
        f = NET_CLAIMS / str(i)
        try:
            fd = os.open(f, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                pid = int(f.read_text() or "0")
                os.kill(pid, 0)
                continue
            except (ValueError, ProcessLookupError):
                f.unlink(missing_ok=True)  # its owner is gone
                try:
                    fd = os.open(f, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                except FileExistsError:
                    continue
            except (PermissionError, FileNotFoundError):
                continue
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        return i
    raise RuntimeError("no free test network index")


@dataclass
class Cluster:
    data_dir: Path
    port: int = field(default_factory=free_port)
    extra_args: list[str] = field(default_factory=list)
    node: bool = True
    proc: subprocess.Popen[bytes] | None = None
    kubelet_port: int = field(default_factory=free_port)
    proxy_healthz_port: int = field(default_factory=free_port)
    net_index: int = -1

    @property
    def advertised_url(self) -> str:
        """The apiserver URL the cluster hands out (kubeconfigs, cluster-info): its advertise address."""
        import re

        m = re.search(r"server:\s*\"?([^\s\"]+)", self.kubeconfig.read_text())
        assert m, self.kubeconfig
        return m.group(1)

    @property
    def node_ip(self) -> str:
        """The address `kplane up` gives its node (and its kubelet serving certificate)."""
        from kplane.netutil import default_ipv4

        return default_ipv4()

    @property
    def cluster_cidr(self) -> str:
        return f"10.{100 + self.net_index}.0.0/16"

    @property
    def service_cidr(self) -> str:
        return f"172.{16 + self.net_index // 16}.{(self.net_index % 16) * 16}.0/20"

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def kubeconfig(self) -> Path:
        return self.data_dir / "admin.kubeconfig"

    @property
    def pki(self) -> Path:
        return self.data_dir / "pki"

    @property
    def log_path(self) -> Path:
        return self.data_dir.parent / f"{self.data_dir.name}.log"

    def start(self, timeout: float = 30.0) -> None:
        if self.net_index < 0:
            self.net_index = claim_net_index()
        log = self.log_path.open("ab")
        node_args = ["--kubelet-port", str(self.kubelet_port), "--pod-restart-backoff", "1",
                     "--proxy-healthz-port", str(self.proxy_healthz_port)] if self.node else \
            ["--no-node"]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kplane.cli", "up", "--data-dir", str(self.data_dir),
             "--apiserver-port", str(self.port), "--cluster-cidr", self.cluster_cidr,
             "--service-cluster-ip-range", self.service_cidr, *node_args, *self.extra_args],
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
                    if r.status == 200 and self.kubeconfig.exists() and (
                            not self.node or "Ready\n" in self.log_path.read_text(errors="replace")):
                        return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("kplane did not become ready")

    def stop(self, *, keep_pods: bool = False) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGINT)
        try:
            rc = self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        if not keep_pods:
            stop_containers(self.data_dir)
        return rc

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


def stop_containers(data_dir: Path) -> None:
    """Pods outlive the agent by design; tests must not leave their processes or networks behind."""
    import asyncio

    from kplane.kubelet.runtime import ProcessRuntime

    for root in data_dir.glob("node/*/containers"):
        rt = ProcessRuntime(root)

        async def stop_all(rt: ProcessRuntime = rt) -> None:
            for cid in rt.list():
                try:
                    await rt.stop(cid, 0)
                except Exception:
                    rt.kill(cid)

        asyncio.run(stop_all())
    from kplane.kubelet import podnet

    for node_dir in data_dir.glob("node/*"):  # the pods' namespaces, veths, bridge, routes and nft table
        podnet.cleanup_node(node_dir)


async def update_retrying(client: Any, path: str, mutate: Any, attempts: int = 20) -> Any:
    """GET ``path``, apply ``mutate(obj)``, PUT it back; on a 409 (a controller wrote in between, e.g. node IPAM
    setting a podCIDR) start again from a fresh read."""
    from kplane.errors import StatusError

    for _ in range(attempts):
        cur = await client.get(path)
        mutate(cur)
        try:
            return await client.update(path, cur)
        except StatusError as err:
            if err.code != 409:
                raise
    raise AssertionError(f"{path}: still conflicting after {attempts} attempts")
