"""The apiserver's egress selector: EgressSelectorConfiguration files, DirectDialer, and HTTPConnectDialer against a
real HTTP-CONNECT proxy on a Unix socket (and over TLS on TCP), including proxies that refuse or misbehave."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import ssl
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from kplane import pki
from kplane.apiserver import egress
from kplane.apiserver.egress import (
    Connection,
    DirectDialer,
    EgressConfigError,
    EgressOptions,
    HTTPConnectDialer,
    dialer_for,
    load_egress_config,
    parse_connect_head,
    parse_egress_config,
    prepare_egress,
    render_egress_config,
)
from kplane.errors import StatusError

# ---------------------------------------------------------------------------------------------------------------
# Byte fixtures, written from the documented format (konnectivity setup docs, KEP-1281, the v1beta1 types).

KONNECTIVITY_DOC_GRPC = b"""\
apiVersion: apiserver.k8s.io/v1beta1
kind: EgressSelectorConfiguration
egressSelections:
# Since we want to control the egress traffic to the cluster, we use the
# "cluster" as the name. Other supported values are "etcd", and "controlplane".
- name: cluster
  connection:
    # This controls the protocol between the API Server and the Konnectivity
    # server. Supported values are "GRPC" and "HTTPConnect".
    proxyProtocol: GRPC
    transport:
      # This controls what transport the API Server uses to communicate with the
      # Konnectivity server. UDS is recommended if the Konnectivity server
      # locates on the same machine as the API Server.
      uds:
        udsName: /etc/kubernetes/konnectivity-server/konnectivity-server.socket
"""

HTTPCONNECT_UDS = b"""\
apiVersion: apiserver.k8s.io/v1beta1
kind: EgressSelectorConfiguration
egressSelections:
- name: cluster
  connection:
    proxyProtocol: HTTPConnect
    transport:
      uds:
        udsName: /run/konnectivity/konnectivity-server.socket
- name: controlplane
  connection:
    proxyProtocol: Direct
- name: etcd
  connection:
    proxyProtocol: Direct
"""

V1ALPHA1_MASTER_TCP = b"""\
apiVersion: apiserver.k8s.io/v1alpha1
kind: EgressSelectorConfiguration
egressSelections:
- name: master
  connection:
    proxyProtocol: HTTPConnect
    transport:
      tcp:
        url: http://127.0.0.1:8131
- name: Cluster
  connection:
    proxyProtocol: Direct
"""

JSON_DOC = (b'{"apiVersion":"apiserver.k8s.io/v1beta1","kind":"EgressSelectorConfiguration",'
            b'"egressSelections":[{"name":"cluster","connection":{"proxyProtocol":"HTTPConnect",'
            b'"transport":{"uds":{"udsName":"/tmp/k.sock"}}}}]}')


def https_doc(ca: str, cert: str, key: str, server_name: str = "") -> bytes:
    sn = f"\n          tlsServerName: {server_name}" if server_name else ""
    return f"""\
apiVersion: apiserver.k8s.io/v1beta1
kind: EgressSelectorConfiguration
egressSelections:
- name: cluster
  connection:
    proxyProtocol: HTTPConnect
    transport:
      tcp:
        url: https://127.0.0.1:8132
        tlsConfig:
          caBundle: {ca}
          clientCert: {cert}
          clientKey: {key}{sn}
""".encode()


def test_parse_upstream_examples() -> None:
    cfg = parse_egress_config(KONNECTIVITY_DOC_GRPC)
    assert cfg.api_version == "apiserver.k8s.io/v1beta1"
    assert cfg.connection("cluster") == Connection(
        "GRPC", uds="/etc/kubernetes/konnectivity-server/konnectivity-server.socket")
    assert cfg.connection("etcd") is None

    cfg = parse_egress_config(HTTPCONNECT_UDS)
    assert cfg.connection("cluster") == Connection("HTTPConnect", uds="/run/konnectivity/konnectivity-server.socket")
    assert cfg.connection("controlplane") == Connection("Direct")
    assert cfg.connection("etcd") == Connection("Direct")

    cfg = parse_egress_config(V1ALPHA1_MASTER_TCP)  # "master" is the deprecated name of controlplane
    conn = cfg.connection("controlplane")
    assert conn is not None and conn.tcp is not None and conn.tcp.address == ("127.0.0.1", 8131)
    assert cfg.connection("cluster") == Connection("Direct")  # names are case-insensitive

    cfg = parse_egress_config(JSON_DOC)
    assert cfg.connection("cluster") == Connection("HTTPConnect", uds="/tmp/k.sock")


def test_parse_https_transport(tmp_path: Path) -> None:
    files = {}
    for n in ("ca.crt", "client.crt", "client.key"):
        files[n] = tmp_path / n
        files[n].write_text("x")
    doc = https_doc(str(files["ca.crt"]), str(files["client.crt"]), str(files["client.key"]), "konnectivity")
    cfg = parse_egress_config(doc)
    conn = cfg.connection("cluster")
    assert conn is not None and conn.tcp is not None and conn.tcp.tls is not None
    assert conn.tcp.tls.server_name == "konnectivity" and conn.tcp.tls.client_key.endswith("client.key")
    path = tmp_path / "egress.yaml"
    path.write_bytes(doc)
    assert load_egress_config(path) == cfg
    files["client.key"].unlink()
    with pytest.raises(EgressConfigError, match=r"tlsConfig.clientKey .* does not exist"):
        load_egress_config(path)


BAD = [
    (b"apiVersion: apiserver.k8s.io/v1beta1\nkind: AdmissionConfiguration\negressSelections: []\n",
     r"kind: 'AdmissionConfiguration': expected EgressSelectorConfiguration"),
    (b"apiVersion: apiserver.k8s.io/v1\nkind: EgressSelectorConfiguration\negressSelections: []\n",
     r"apiVersion: .*upstream has no v1"),
    (b"apiVersion: apiserver.config.k8s.io/v1\nkind: EgressSelectorConfiguration\negressSelections: []\n",
     r"apiVersion: .*expected one of"),
    (b"kind: EgressSelectorConfiguration\negressSelections: []\n", r"apiVersion: None"),
    (b"apiVersion: apiserver.k8s.io/v1beta1\nkind: EgressSelectorConfiguration\n", r"egressSelections: required"),
    (b"apiVersion: apiserver.k8s.io/v1beta1\nkind: EgressSelectorConfiguration\negressSelections:\n"
     b"- name: nodes\n  connection: {proxyProtocol: Direct}\n",
     r"egressSelections\[0\].name: unsupported value 'nodes'"),
    (b"apiVersion: apiserver.k8s.io/v1beta1\nkind: EgressSelectorConfiguration\negressSelections:\n"
     b"- name: master\n  connection: {proxyProtocol: Direct}\n- name: controlplane\n  connection: {proxyProtocol: Direct}\n",
     r"egressSelections\[1\].name: duplicate selection 'controlplane'"),
    (b"apiVersion: apiserver.k8s.io/v1beta1\nkind: EgressSelectorConfiguration\negressSelections:\n"
     b"- name: cluster\n  connection: {proxyProtocol: HTTPConnect}\n",
     r"egressSelections\[0\].connection.transport: required for HTTPConnect"),
    (b"apiVersion: apiserver.k8s.io/v1beta1\nkind: EgressSelectorConfiguration\negressSelections:\n"
     b"- name: cluster\n  connection:\n    proxyProtocol: HTTPConnect\n    transport:\n"
     b"      uds: {udsName: /x.sock}\n      tcp: {url: 'http://a:1'}\n",
     r"transport: tcp and uds cannot both be set"),
    (b"apiVersion: apiserver.k8s.io/v1beta1\nkind: EgressSelectorConfiguration\negressSelections:\n"
     b"- name: cluster\n  connection:\n    proxyProtocol: HTTPConnect\n    transport: {}\n",
     r"transport: one of tcp or uds must be set"),
    (b"apiVersion: apiserver.k8s.io/v1beta1\nkind: EgressSelectorConfiguration\negressSelections:\n"
     b"- name: cluster\n  connection:\n    proxyProtocol: Direct\n    transport: {uds: {udsName: /x}}\n",
     r"transport: must be absent for Direct"),
    (b"apiVersion: apiserver.k8s.io/v1beta1\nkind: EgressSelectorConfiguration\negressSelections:\n"
     b"- name: cluster\n  connection:\n    proxyProtocol: GRPC\n    transport: {tcp: {url: 'http://a:1'}}\n",
     r"GRPC needs a uds transport"),
    (b"apiVersion: apiserver.k8s.io/v1beta1\nkind: EgressSelectorConfiguration\negressSelections:\n"
     b"- name: cluster\n  connection: {proxyProtocol: SOCKS5}\n",
     r"proxyProtocol: unsupported value 'SOCKS5'"),
    (b"apiVersion: apiserver.k8s.io/v1beta1\nkind: EgressSelectorConfiguration\negressSelections:\n"
     b"- name: cluster\n  connection: {proxyProtocol: Direct, timeout: 5}\n",
     r"unknown field\(s\) 'timeout'"),
    (b"apiVersion: apiserver.k8s.io/v1beta1\nkind: EgressSelectorConfiguration\negressSelections:\n"
     b"- name: cluster\n  connection:\n    proxyProtocol: HTTPConnect\n    transport:\n"
     b"      TCP: {URL: 'https://a:1'}\n",
     r"unknown field\(s\) 'TCP'"),  # strict and case-sensitive, as upstream's decoder
    (b"apiVersion: apiserver.k8s.io/v1beta1\nkind: EgressSelectorConfiguration\negressSelections:\n"
     b"- name: cluster\n  connection:\n    proxyProtocol: HTTPConnect\n    transport: {tcp: {url: 'https://a:1'}}\n",
     r"tlsConfig: required for an https:// url"),
    (b"apiVersion: apiserver.k8s.io/v1beta1\nkind: EgressSelectorConfiguration\negressSelections:\n"
     b"- name: cluster\n  connection:\n    proxyProtocol: HTTPConnect\n    transport:\n"
     b"      tcp: {url: 'http://a:1', tlsConfig: {caBundle: /ca}}\n",
     r"tlsConfig: must be absent for an http:// url"),
    (b"apiVersion: apiserver.k8s.io/v1beta1\nkind: EgressSelectorConfiguration\negressSelections:\n"
     b"- name: cluster\n  connection:\n    proxyProtocol: HTTPConnect\n    transport:\n"
     b"      tcp: {url: 'https://a:1', tlsConfig: {clientCert: /c}}\n",
     r"tlsConfig.clientKey: required"),
    (b"apiVersion: apiserver.k8s.io/v1beta1\nkind: EgressSelectorConfiguration\negressSelections:\n"
     b"- name: cluster\n  connection:\n    proxyProtocol: HTTPConnect\n    transport: {tcp: {url: 'https://a'}}\n",
     r"needs a host and a port"),
    (b"apiVersion: apiserver.k8s.io/v1beta1\nkind: EgressSelectorConfiguration\negressSelections:\n"
     b"- name: cluster\n  connection:\n    proxyProtocol: HTTPConnect\n    transport: {tcp: {url: 'grpc://a:1'}}\n",
     r"supported schemes are http:// and https://"),
    (b"apiVersion: apiserver.k8s.io/v1beta1\nkind: EgressSelectorConfiguration\negressSelections:\n"
     b"- name: cluster\n  connection:\n    proxyProtocol: HTTPConnect\n    transport: {uds: {udsName: 'unix:///x'}}\n",
     r"without unix://"),
    (b"apiVersion: apiserver.k8s.io/v1beta1\nkind: EgressSelectorConfiguration\negressSelections:\n"
     b"- name: cluster\n  connection:\n    proxyProtocol: HTTPConnect\n    transport: {uds: {}}\n",
     r"udsName: required"),
    (b"apiVersion: apiserver.k8s.io/v1beta1\nkind: EgressSelectorConfiguration\negressSelections:\n- name: cluster\n",
     r"connection: required"),
    (b"apiVersion: apiserver.k8s.io/v1beta1\nkind: EgressSelectorConfiguration\negressSelections: {cluster: 1}\n",
     r"egressSelections: required, a list"),
    (b"apiVersion: apiserver.k8s.io/v1beta1\nkind: EgressSelectorConfiguration\negressSelections: [7]\n",
     r"egressSelections\[0\]: must be an object"),
    (b"", r"empty document"),
    (b"- just\n- a list\n", r"must be an object, not list"),
    (b"apiVersion: [unclosed\n", r"cannot parse as YAML or JSON"),
    (b'{"apiVersion": "apiserver.k8s.io/v1beta1",', r"cannot parse as YAML or JSON"),
    (b"\xff\xfe\x00garbage", r"not UTF-8 text"),
    (b"#" * (egress.MAX_CONFIG_BYTES + 1), r"too large"),
]


@pytest.mark.parametrize(("doc", "message"), BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_config(doc: bytes, message: str) -> None:
    with pytest.raises(EgressConfigError, match=message) as e:
        parse_egress_config(doc, source="egress.yaml")
    assert str(e.value).startswith("egress.yaml: ")


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(EgressConfigError, match=r"cannot read the egress selector configuration .*nope.yaml"):
        load_egress_config(tmp_path / "nope.yaml")


def test_render_reads_back() -> None:
    sel = {"cluster": Connection("HTTPConnect", uds="/a b/k.sock"), "etcd": Connection("Direct")}
    text = render_egress_config(sel, comment="line one\n\nline three")
    assert text.startswith("# line one\n#\n# line three\napiVersion: apiserver.k8s.io/v1beta1\n")
    cfg = parse_egress_config(text)
    assert dict(cfg.selections) == sel


def test_dialer_for() -> None:
    assert isinstance(dialer_for(None), DirectDialer)
    cfg = parse_egress_config(HTTPCONNECT_UDS)
    d = dialer_for(cfg, "cluster")
    assert isinstance(d, HTTPConnectDialer) and d.uds_path == "/run/konnectivity/konnectivity-server.socket"
    assert isinstance(dialer_for(cfg, "etcd"), DirectDialer)
    only_cluster = parse_egress_config(JSON_DOC)
    fallback = DirectDialer(name="mine")
    assert dialer_for(only_cluster, "controlplane", default=fallback) is fallback  # missing selection: default
    with pytest.raises(EgressConfigError, match="unknown egress selection 'nodes'"):
        dialer_for(cfg, "nodes")
    grpc = parse_egress_config(KONNECTIVITY_DOC_GRPC)
    assert isinstance(dialer_for(grpc, "cluster"), egress.GRPCDialer)


# ---------------------------------------------------------------------------------------------------------------
# prepare_egress: --egress and friends -> a file in the data directory


def test_prepare_direct_and_konnectivity(tmp_path: Path) -> None:
    plan = prepare_egress(EgressOptions(), tmp_path)
    assert plan.mode == "direct" and plan.config_path == tmp_path / egress.CONFIG_FILENAME
    assert load_egress_config(plan.config_path) == plan.config
    assert {n: c.proxy_protocol for n, c in plan.config.selections.items()} == {
        "cluster": "Direct", "controlplane": "Direct", "etcd": "Direct"}
    assert isinstance(plan.dialer("cluster"), DirectDialer)

    plan = prepare_egress(EgressOptions(mode="konnectivity"), tmp_path)
    text = plan.config_path.read_text()
    assert "proxyProtocol: HTTPConnect" in text and "kind: EgressSelectorConfiguration" in text
    d = plan.dialer("cluster")
    assert isinstance(d, HTTPConnectDialer)
    assert d.uds_path == str(tmp_path / "konnectivity-server" / "konnectivity-server.socket")
    plan = prepare_egress(EgressOptions(mode="konnectivity", konnectivity_uds=Path("/run/k.sock")), tmp_path)
    assert plan.config.connection("cluster") == Connection("HTTPConnect", uds="/run/k.sock")


def test_prepare_ssh(tmp_path: Path) -> None:
    key = tmp_path / "ssh" / "id_apiserver"
    with pytest.raises(EgressConfigError, match="needs --ssh-user"):
        prepare_egress(EgressOptions(mode="ssh", ssh_keyfile=key), tmp_path)
    with pytest.raises(EgressConfigError, match="needs --ssh-keyfile"):
        prepare_egress(EgressOptions(mode="ssh", ssh_user="kube"), tmp_path)
    with pytest.raises(EgressConfigError, match="not a valid user name"):
        prepare_egress(EgressOptions(mode="ssh", ssh_user="a b\n", ssh_keyfile=key), tmp_path)
    with pytest.raises(EgressConfigError, match=r"trusts none by itself: .*known_hosts does not exist"):
        prepare_egress(EgressOptions(mode="ssh", ssh_user="kube", ssh_keyfile=key), tmp_path)
    assert not key.exists()
    (tmp_path / "ssh").mkdir(exist_ok=True)
    (tmp_path / "ssh" / "known_hosts").write_text("")
    plan = prepare_egress(EgressOptions(mode="ssh", ssh_user="kube", ssh_keyfile=key), tmp_path)
    assert plan.ssh is not None and plan.ssh.user == "kube" and plan.ssh.port == 22
    assert plan.ssh.known_hosts == tmp_path / "ssh" / "known_hosts"
    assert key.is_file() and (key.stat().st_mode & 0o777) == 0o600  # generated, private
    assert Path(str(key) + ".pub").read_text().startswith("ssh-ed25519 ")
    assert plan.config.connection("cluster") is None  # cluster traffic: the SSH tunnels, not the file
    assert "kplane server --egress ssh" in plan.config_path.read_text()
    with pytest.raises(EgressConfigError, match="needs the SSH tunneler"):
        plan.dialer("cluster")
    assert isinstance(plan.dialer("etcd"), DirectDialer)
    bad = tmp_path / "not-a-key"
    bad.write_text("hello")
    with pytest.raises(EgressConfigError, match=r"--ssh-keyfile .*not-a-key: "):
        prepare_egress(EgressOptions(mode="ssh", ssh_user="kube", ssh_keyfile=bad), tmp_path)
    before = key.read_bytes()
    prepare_egress(EgressOptions(mode="ssh", ssh_user="kube", ssh_keyfile=key), tmp_path)
    assert key.read_bytes() == before  # an existing key is kept


def test_prepare_conflicts(tmp_path: Path) -> None:
    f = tmp_path / "mine.yaml"
    f.write_bytes(HTTPCONNECT_UDS)
    with pytest.raises(EgressConfigError, match="either --egress or --egress-selector-config-file"):
        prepare_egress(EgressOptions(mode="direct", config_file=f), tmp_path)
    with pytest.raises(EgressConfigError, match="--ssh-user only apply with --egress ssh"):
        prepare_egress(EgressOptions(mode="konnectivity", ssh_user="kube"), tmp_path)
    with pytest.raises(EgressConfigError, match="--ssh-user only apply with --egress ssh"):
        prepare_egress(EgressOptions(config_file=f, ssh_user="kube"), tmp_path)
    with pytest.raises(EgressConfigError, match="only applies with --egress konnectivity"):
        prepare_egress(EgressOptions(mode="direct", konnectivity_uds=Path("/x")), tmp_path)
    with pytest.raises(EgressConfigError, match="--egress 'vpn': expected one of direct, ssh, konnectivity"):
        prepare_egress(EgressOptions(mode="vpn"), tmp_path)
    plan = prepare_egress(EgressOptions(config_file=f), tmp_path)
    assert plan.mode == "file" and plan.config_path == f
    assert not (tmp_path / egress.CONFIG_FILENAME).exists()  # a given file is used as is
    g = tmp_path / "grpc.yaml"
    g.write_bytes(KONNECTIVITY_DOC_GRPC)
    assert isinstance(prepare_egress(EgressOptions(config_file=g), tmp_path).dialer(), egress.GRPCDialer)


# ---------------------------------------------------------------------------------------------------------------
# Dialers against real servers


@pytest.fixture
def sockdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="kpeg", dir="/tmp"))  # short: Unix socket paths are limited to 107 bytes
    yield d
    shutil.rmtree(d, ignore_errors=True)


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
    except OSError:
        pass
    finally:
        writer.close()


@pytest.fixture
async def echo_server() -> AsyncIterator[int]:
    server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()


async def roundtrip(sock: socket.socket, payload: bytes, *, half_close: bool = True) -> bytes:
    """Send ``payload`` while reading the echo. With ``half_close`` the write side is shut and the echo read to
    EOF (the EOF crossed every hop); without it exactly ``len(payload)`` bytes are read."""
    reader, writer = await asyncio.open_connection(sock=sock)

    async def send() -> None:
        writer.write(payload)
        await writer.drain()
        if half_close:
            writer.write_eof()

    sender = asyncio.ensure_future(send())
    try:
        read = reader.read() if half_close else reader.readexactly(len(payload))
        data = await asyncio.wait_for(read, 30)
        await sender
    finally:
        sender.cancel()
        writer.close()
    return data


async def test_direct_dialer(echo_server: int) -> None:
    d = DirectDialer(timeout_s=5)
    s = await d.dial("127.0.0.1", echo_server)
    assert not s.getblocking()
    assert await roundtrip(s, b"hello direct") == b"hello direct"
    s = await d.dial("localhost", echo_server)  # names resolve
    assert await roundtrip(s, b"x") == b"x"
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    with pytest.raises(StatusError) as e:
        await d.dial("127.0.0.1", port)
    assert e.value.code == 502 and f'egress "cluster" (Direct): error dialing 127.0.0.1:{port}' in e.value.message
    for host, port in (("10.0.0.1\r\nX: y", 80), ("a b", 80), ("127.0.0.1", 0), ("127.0.0.1", 70000)):
        with pytest.raises(StatusError, match="invalid dial target") as e:
            await d.dial(host, port)
        assert e.value.code == 502


class ConnectProxy:
    """A tiny real HTTP-CONNECT proxy on a Unix socket (or TCP with TLS). ``mode`` picks its behaviour."""

    def __init__(self, mode: str = "ok") -> None:
        self.mode = mode
        self.requests: list[bytes] = []
        self.server: asyncio.AbstractServer | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.writers: set[asyncio.StreamWriter] = set()
        self.stopping = asyncio.Event()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        self.writers.add(writer)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            self.requests.append(head)
            target = head.split(b" ")[1].decode()
            if self.mode == "403":
                writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 9\r\n\r\nforbidden")
            elif self.mode == "502":
                writer.write(b"HTTP/1.1 502 Bad Gateway\r\n\r\nno agent serves 10.1.2.3")
            elif self.mode == "garbage":
                writer.write(b"SSH-2.0-OpenSSH_9.2\r\n\x00\x01\x02\r\n\r\n")
            elif self.mode == "oversized":
                writer.write(b"HTTP/1.1 200 OK\r\n" + b"X-Filler: " + b"a" * 100_000 + b"\r\n")
                await writer.drain()
                await self.stopping.wait()
            elif self.mode == "silent":
                await self.stopping.wait()
            elif self.mode == "close":
                pass
            elif self.mode == "trickle":  # the head one byte at a time, then the target's first bytes
                for b in b"HTTP/1.1 200 OK\r\nX-A: b\r\n\r\nEARLY":
                    writer.write(bytes([b]))
                    await writer.drain()
                    await asyncio.sleep(0.002)
                await self.stopping.wait()
            elif self.mode in ("ok", "early"):
                host, port = target.rsplit(":", 1)
                up_r, up_w = await asyncio.open_connection(host.strip("[]"), int(port))
                reply = b"HTTP/1.1 200 Connection established\r\nX-Proxy: test\r\n\r\n"
                if self.mode == "early":  # the target's first bytes in the same segment as the head
                    reply += b"EARLY-BYTES"
                writer.write(reply)
                await writer.drain()
                try:
                    await asyncio.gather(_pipe(reader, up_w), _pipe(up_r, writer))
                finally:
                    up_w.close()
                return
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            self.tasks.discard(task)
            self.writers.discard(writer)
            writer.close()

    async def stop(self) -> None:
        self.stopping.set()
        for w in list(self.writers):
            w.close()
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=10)
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


async def _pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    try:
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
        if w.can_write_eof():
            w.write_eof()
    except OSError:
        pass


@contextlib.asynccontextmanager
async def uds_proxy(path: Path, mode: str = "ok") -> AsyncIterator[ConnectProxy]:
    p = ConnectProxy(mode)
    p.server = await asyncio.start_unix_server(p.handle, str(path))
    try:
        yield p
    finally:
        await p.stop()


async def test_http_connect_uds(sockdir: Path, echo_server: int) -> None:
    path = sockdir / "k.sock"
    async with uds_proxy(path) as proxy:
        d = HTTPConnectDialer(path, timeout_s=5)
        s = await d.dial("127.0.0.1", echo_server)
        assert s.family == socket.AF_UNIX and not s.getblocking()
        assert await roundtrip(s, b"through the proxy") == b"through the proxy"
        assert proxy.requests[0].startswith(
            f"CONNECT 127.0.0.1:{echo_server} HTTP/1.1\r\nHost: 127.0.0.1:{echo_server}\r\n".encode())
        # many at once, a large transfer on each
        payloads = [bytes([i]) * (256 * 1024 + i) for i in range(20)]
        socks = await asyncio.gather(*(d.dial("127.0.0.1", echo_server) for _ in payloads))
        results = await asyncio.gather(*(roundtrip(s, p) for s, p in zip(socks, payloads, strict=True)))
        assert results == payloads


def test_check_target() -> None:
    assert egress.check_target("10.0.0.1", 10250) == "10.0.0.1:10250"
    assert egress.check_target("fd00::0001", 10250) == "[fd00::1]:10250"
    assert egress.check_target("node-1.example", 80) == "node-1.example:80"


async def test_http_connect_keeps_bytes_after_the_head(sockdir: Path, echo_server: int) -> None:
    path = sockdir / "k.sock"
    async with uds_proxy(path, "early"):
        s = await HTTPConnectDialer(path).dial("127.0.0.1", echo_server)
        reader, writer = await asyncio.open_connection(sock=s)
        assert await asyncio.wait_for(reader.readexactly(11), 5) == b"EARLY-BYTES"
        writer.write(b"ping")
        assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
        writer.close()


async def test_http_connect_head_byte_by_byte(sockdir: Path) -> None:
    path = sockdir / "k.sock"
    async with uds_proxy(path, "trickle"):
        s = await HTTPConnectDialer(path).dial("10.1.2.3", 10250)
        reader, writer = await asyncio.open_connection(sock=s)
        assert await asyncio.wait_for(reader.readexactly(5), 5) == b"EARLY"
        writer.close()


@pytest.mark.parametrize(("mode", "code", "message"), [
    ("403", 502, r"the proxy refused: 403 Forbidden: forbidden"),
    ("502", 502, r"the proxy refused: 502 Bad Gateway: no agent serves 10.1.2.3"),
    ("garbage", 502, r"not an HTTP response: 'SSH-2.0-OpenSSH_9.2'"),
    ("oversized", 502, r"response head is larger than 16384 bytes"),
    ("silent", 502, r"no answer from the proxy in time"),
    ("close", 502, r"the proxy closed the connection before answering"),
])
async def test_http_connect_bad_proxy(sockdir: Path, mode: str, code: int, message: str) -> None:
    path = sockdir / "k.sock"
    async with uds_proxy(path, mode):
        d = HTTPConnectDialer(path, timeout_s=1.5)
        with pytest.raises(StatusError, match=message) as e:
            await asyncio.wait_for(d.dial("10.1.2.3", 10250), 10)
        assert e.value.code == code
        assert e.value.message.startswith(f'egress "cluster" (HTTPConnect over uds {path}) dialing 10.1.2.3:10250: ')


async def test_http_connect_unreachable_proxy(sockdir: Path) -> None:
    d = HTTPConnectDialer(sockdir / "missing.sock")
    with pytest.raises(StatusError, match=r"cannot reach the proxy: No such file or directory") as e:
        await d.dial("10.1.2.3", 10250)
    assert e.value.code == 503 and e.value.reason == "ServiceUnavailable"
    # a socket file nobody listens on
    stale = sockdir / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()
    with pytest.raises(StatusError, match=r"cannot reach the proxy: Connection refused") as e:
        await HTTPConnectDialer(stale).dial("10.1.2.3", 10250)
    assert e.value.code == 503


def test_parse_connect_head() -> None:
    assert parse_connect_head(b"HTTP/1.1 200 Connection established\r\nA: b") == egress.ConnectResponse(200, "Connection established")
    assert parse_connect_head(b"HTTP/1.0 200") == egress.ConnectResponse(200, "")
    for bad in (b"HTTP/2 200 OK", b"HTTP/1.1 20 OK", b"200 OK", b"HTTP/1.1 200 \x00", b""):
        with pytest.raises(ValueError, match="not an HTTP response"):
            parse_connect_head(bad)


# ---------------------------------------------------------------------------------------------------------------
# TLS through the returned socket (the kubelet case), and HTTPConnect over TCP with mTLS to the proxy


@pytest.fixture
def tls_files(tmp_path: Path) -> dict[str, Path]:
    ca = pki.new_ca("egress-test-ca")
    out = {"ca": tmp_path / "ca.crt"}
    out["ca"].write_bytes(ca.cert_pem())
    for name, kw in (("server", {"server": True, "ips": ["127.0.0.1"], "dns_names": ["konnectivity"]}),
                     ("client", {"client": True})):
        pair = pki.issue(ca, common_name=f"egress-test-{name}", **kw)
        pki.save_pair(pair, tmp_path / f"{name}.crt", tmp_path / f"{name}.key")
        out[f"{name}.crt"] = tmp_path / f"{name}.crt"
        out[f"{name}.key"] = tmp_path / f"{name}.key"
    return out


def _server_ctx(files: dict[str, Path], require_client: bool) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(files["ca"]))
    ctx.load_cert_chain(str(files["server.crt"]), str(files["server.key"]))
    if require_client:
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


async def test_tls_inside_the_tunnel(sockdir: Path, tls_files: dict[str, Path]) -> None:
    """The caller wraps the dialled socket in TLS and verifies the far end's certificate through the proxy."""
    server = await asyncio.start_server(_echo, "127.0.0.1", 0, ssl=_server_ctx(tls_files, False))
    port = server.sockets[0].getsockname()[1]
    client_ctx = ssl.create_default_context(cafile=str(tls_files["ca"]))
    path = sockdir / "k.sock"
    try:
        async with uds_proxy(path):
            s = await HTTPConnectDialer(path).dial("127.0.0.1", port)
            reader, writer = await asyncio.open_connection(sock=s, ssl=client_ctx, server_hostname="127.0.0.1")
            writer.write(b"secret")
            assert await asyncio.wait_for(reader.readexactly(6), 5) == b"secret"
            writer.close()
            # a certificate for another name is refused through the tunnel too
            s = await HTTPConnectDialer(path).dial("127.0.0.1", port)
            with pytest.raises(ssl.SSLCertVerificationError):
                await asyncio.open_connection(sock=s, ssl=client_ctx, server_hostname="not-the-node")
    finally:
        server.close()
        await server.wait_closed()


async def test_http_connect_tcp_mtls(tmp_path: Path, tls_files: dict[str, Path], echo_server: int) -> None:
    proxy = ConnectProxy("ok")
    proxy.server = await asyncio.start_server(proxy.handle, "127.0.0.1", 0, ssl=_server_ctx(tls_files, True))
    pport = proxy.server.sockets[0].getsockname()[1]
    doc = https_doc(str(tls_files["ca"]), str(tls_files["client.crt"]), str(tls_files["client.key"]))
    doc = doc.replace(b"127.0.0.1:8132", f"127.0.0.1:{pport}".encode())
    f = tmp_path / "egress.yaml"
    f.write_bytes(doc)
    try:
        d = dialer_for(load_egress_config(f))
        assert isinstance(d, HTTPConnectDialer) and d.description == f"HTTPConnect over tcp https://127.0.0.1:{pport}"
        s = await d.dial("127.0.0.1", echo_server)
        # TLS to the proxy has no half-close: read the exact length back
        assert await roundtrip(s, b"m" * 3_000_000, half_close=False) == b"m" * 3_000_000
        # the proxy's name must match its certificate (tlsServerName overrides it)
        f.write_bytes(https_doc(str(tls_files["ca"]), str(tls_files["client.crt"]), str(tls_files["client.key"]),
                                "wrong-name").replace(b"127.0.0.1:8132", f"127.0.0.1:{pport}".encode()))
        with pytest.raises(StatusError, match="TLS with the proxy failed") as e:
            await dialer_for(load_egress_config(f)).dial("127.0.0.1", echo_server)
        assert e.value.code == 503
        f.write_bytes(https_doc(str(tls_files["ca"]), str(tls_files["client.crt"]), str(tls_files["client.key"]),
                                "konnectivity").replace(b"127.0.0.1:8132", f"127.0.0.1:{pport}".encode()))
        s = await dialer_for(load_egress_config(f)).dial("127.0.0.1", echo_server)
        assert await roundtrip(s, b"by name", half_close=False) == b"by name"
    finally:
        await proxy.stop()


async def test_http_connect_tcp_refused_over_tls(tls_files: dict[str, Path]) -> None:
    proxy = ConnectProxy("403")
    proxy.server = await asyncio.start_server(proxy.handle, "127.0.0.1", 0, ssl=_server_ctx(tls_files, False))
    pport = proxy.server.sockets[0].getsockname()[1]
    ctx = ssl.create_default_context(cafile=str(tls_files["ca"]))
    try:
        d = HTTPConnectDialer(url=f"https://127.0.0.1:{pport}", tls=ctx)
        with pytest.raises(StatusError, match="the proxy refused: 403 Forbidden") as e:
            await d.dial("10.1.2.3", 10250)
        assert e.value.code == 502
        proxy.mode = "oversized"
        with pytest.raises(StatusError, match="larger than 16384 bytes"):
            await asyncio.wait_for(d.dial("10.1.2.3", 10250), 10)
    finally:
        await proxy.stop()


# ---------------------------------------------------------------------------------------------------------------
# proxyProtocol GRPC: the apiserver side of a konnectivity server in gRPC mode


async def test_grpc_dialer_through_a_real_konnectivity_server(tmp_path: Path, sockdir: Path) -> None:
    from kplane.tunnel.agent import KonnectivityAgent
    from kplane.tunnel.auth import NodeAgentAuthorizer
    from kplane.tunnel.server import KonnectivityServer

    ca = pki.new_ca("egress-test-ca")
    (tmp_path / "ca.crt").write_bytes(ca.cert_pem())
    srv = pki.issue(ca, common_name="konnectivity-server", server=True, ips=["127.0.0.1"])
    pki.save_pair(srv, tmp_path / "srv.crt", tmp_path / "srv.key")
    node = pki.issue(ca, common_name="system:node:n1", organizations=["system:nodes"], client=True)
    pki.save_pair(node, tmp_path / "n1.crt", tmp_path / "n1.key")

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    target = await asyncio.start_server(echo, "127.0.0.1", 0)
    tport = target.sockets[0].getsockname()[1]
    uds = sockdir / "k.sock"

    async def owned(_: str) -> list[str]:
        return ["127.0.0.1"]

    server = KonnectivityServer(agent_port=0, uds_path=uds, ca_file=tmp_path / "ca.crt", cert_file=tmp_path / "srv.crt",
                                key_file=tmp_path / "srv.key", host="127.0.0.1", mode="grpc", health_port=None,
                                authorizer=NodeAgentAuthorizer(node_addresses=owned))
    await server.start()
    agent = KonnectivityAgent([f"127.0.0.1:{server.agent_port}"], ca_file=tmp_path / "ca.crt",
                              cert_file=tmp_path / "n1.crt", key_file=tmp_path / "n1.key", agent_id="n1",
                              identifiers="ipv4=127.0.0.1")
    await agent.start()
    try:
        cfg = parse_egress_config(
            b"apiVersion: apiserver.k8s.io/v1beta1\nkind: EgressSelectorConfiguration\negressSelections:\n"
            b"- name: cluster\n  connection:\n    proxyProtocol: GRPC\n    transport:\n      uds:\n"
            b"        udsName: " + str(uds).encode() + b"\n")
        d = dialer_for(cfg, "cluster")
        assert isinstance(d, egress.GRPCDialer)
        deadline = asyncio.get_running_loop().time() + 15
        while True:  # until the agent has registered
            try:
                sock = await d.dial("127.0.0.1", tport)
                break
            except StatusError:
                if asyncio.get_running_loop().time() > deadline:
                    raise
                await asyncio.sleep(0.2)
        reader, writer = await asyncio.open_connection(sock=sock)
        payload = bytes(range(256)) * 4096
        writer.write(payload)
        await writer.drain()
        got = await reader.readexactly(len(payload))
        assert got == payload
        writer.close()
        # an address the agent does not serve: a clear error, no hang
        with pytest.raises(StatusError) as err:
            await d.dial("10.255.255.1", 80)
        assert err.value.code in (502, 503) and "GRPC over uds" in err.value.message
    finally:
        await agent.stop()
        await server.stop()
        target.close()
    # the server gone: 503 naming the socket
    with pytest.raises(StatusError) as err:
        await egress.GRPCDialer(sockdir / "missing.sock").dial("127.0.0.1", 1)
    assert err.value.code == 503
