"""The real kubectl 1.37 against a real kplane apiserver over HTTPS."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from tests.cluster import KUBECTL, Cluster

POD = """
apiVersion: v1
kind: Pod
metadata:
  name: {name}
  labels: {{app: web}}
spec:
  containers:
  - name: main
    image: busybox:1.36
    command: ["sleep", "3600"]
    env: [{{name: A, value: "1"}}]
  - name: side
    image: busybox:1.36
    command: ["sleep", "3600"]
"""


def test_version_and_api_resources(cluster: Cluster) -> None:
    out = cluster.kubectl("version", "-o", "json").stdout
    server = json.loads(out)["serverVersion"]
    assert server["major"] == "1" and server["minor"] == "37"
    res = cluster.kubectl("api-resources").stdout
    for line in ("pods", "certificatesigningrequests", "selfsubjectaccessreviews", "leases", "clusterroles"):
        assert line in res
    assert "po " in res  # short names come from discovery


def test_get_table_columns(cluster: Cluster, ns: str) -> None:
    cluster.kubectl("apply", "-n", ns, "-f", "-", input=POD.format(name="p1"))
    header = cluster.kubectl("get", "pods", "-n", ns).stdout.splitlines()[0].split()
    assert header == ["NAME", "READY", "STATUS", "RESTARTS", "AGE"]
    wide = cluster.kubectl("get", "pods", "-n", ns, "-o", "wide").stdout.splitlines()
    assert wide[0].split()[:7] == ["NAME", "READY", "STATUS", "RESTARTS", "AGE", "IP", "NODE"]
    assert wide[1].split()[0] == "p1" and wide[1].split()[1] in ("0/2", "1/2", "2/2")
    assert cluster.kubectl("get", "namespaces").stdout.splitlines()[0].split() == ["NAME", "STATUS", "AGE"]
    nodes = cluster.kubectl("get", "nodes").stdout.splitlines()
    assert nodes[0].split() == ["NAME", "STATUS", "ROLES", "AGE", "VERSION"]
    own = next(cluster.data_dir.glob("node/*")).name  # other tests add fake (NotReady) nodes to this cluster
    assert next(line for line in nodes[1:] if line.split()[0] == own).split()[1] == "Ready"


def test_create_apply_unchanged_configured(cluster: Cluster, ns: str) -> None:
    cm = '{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"app"},"data":{"k":"%s"}}'
    assert "created" in cluster.kubectl("apply", "-n", ns, "-f", "-", input=cm % "1").stdout
    assert "unchanged" in cluster.kubectl("apply", "-n", ns, "-f", "-", input=cm % "1").stdout
    assert "configured" in cluster.kubectl("apply", "-n", ns, "-f", "-", input=cm % "2").stdout
    got = json.loads(cluster.kubectl("get", "cm", "app", "-n", ns, "-o", "json").stdout)
    assert got["data"] == {"k": "2"}
    assert "kubectl.kubernetes.io/last-applied-configuration" in got["metadata"]["annotations"]
    # create of an existing object is AlreadyExists
    p = cluster.kubectl("create", "-n", ns, "-f", "-", input=cm % "3", check=False)
    assert p.returncode != 0 and "AlreadyExists" in p.stderr


def test_server_side_apply(cluster: Cluster, ns: str) -> None:
    cm = '{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"ssa"},"data":%s}'
    out = cluster.kubectl("apply", "--server-side", "-n", ns, "-f", "-", input=cm % '{"a":"1","b":"2"}').stdout
    assert "serverside-applied" in out
    cluster.kubectl("apply", "--server-side", "-n", ns, "-f", "-", input=cm % '{"a":"9"}')
    got = json.loads(cluster.kubectl("get", "cm", "ssa", "-n", ns, "-o", "json", "--show-managed-fields").stdout)
    # a field the manager stopped applying is removed; the manager is recorded
    assert got["data"] == {"a": "9"}
    assert any(m["manager"] == "kubectl" and m["operation"] == "Apply" for m in got["metadata"]["managedFields"])


def test_patch_merge_json_strategic(cluster: Cluster, ns: str) -> None:
    cluster.kubectl("apply", "-n", ns, "-f", "-", input=POD.format(name="pp"))
    cluster.kubectl("patch", "pod", "pp", "-n", ns, "-p",
                    '{"spec":{"containers":[{"name":"main","image":"busybox:1.37"}]}}')
    pod = json.loads(cluster.kubectl("get", "pod", "pp", "-n", ns, "-o", "json").stdout)
    images = {c["name"]: c["image"] for c in pod["spec"]["containers"]}
    assert images == {"main": "busybox:1.37", "side": "busybox:1.36"}  # strategic: merged by name
    cluster.kubectl("patch", "pod", "pp", "-n", ns, "--type=merge", "-p", '{"metadata":{"labels":{"m":"1"}}}')
    cluster.kubectl("patch", "pod", "pp", "-n", ns, "--type=json",
                    "-p", '[{"op":"replace","path":"/metadata/labels/app","value":"api"}]')
    labels = json.loads(cluster.kubectl("get", "pod", "pp", "-n", ns, "-o", "json").stdout)["metadata"]["labels"]
    assert labels == {"app": "api", "m": "1"}
    bad = cluster.kubectl("patch", "pod", "pp", "-n", ns, "--type=json",
                          "-p", '[{"op":"test","path":"/metadata/name","value":"nope"}]', check=False)
    assert bad.returncode != 0


def test_label_and_selectors(cluster: Cluster, ns: str) -> None:
    for n in ("a", "b"):
        cluster.kubectl("create", "configmap", n, "-n", ns, "--from-literal=x=y")
    cluster.kubectl("label", "configmap", "a", "-n", ns, "tier=db")
    out = cluster.kubectl("get", "cm", "-n", ns, "-l", "tier=db", "-o", "name").stdout.split()
    assert out == ["configmap/a"]
    out = cluster.kubectl("get", "cm", "-n", ns, "-l", "tier!=db", "-o", "name").stdout.split()
    assert "configmap/b" in out and "configmap/a" not in out
    out = cluster.kubectl("get", "cm", "-n", ns, "--field-selector", "metadata.name=b", "-o", "name").stdout
    assert out.split() == ["configmap/b"]


def test_replace_with_stale_resource_version_conflicts(cluster: Cluster, ns: str) -> None:
    cluster.kubectl("create", "configmap", "c", "-n", ns, "--from-literal=x=1")
    obj = json.loads(cluster.kubectl("get", "cm", "c", "-n", ns, "-o", "json").stdout)
    cluster.kubectl("label", "cm", "c", "-n", ns, "bump=1")
    obj["data"]["x"] = "2"
    p = cluster.kubectl("replace", "-n", ns, "-f", "-", input=json.dumps(obj), check=False)
    assert p.returncode != 0 and "Conflict" in p.stderr and "the object has been modified" in p.stderr


def test_delete(cluster: Cluster, ns: str) -> None:
    cluster.kubectl("create", "configmap", "gone", "-n", ns)
    assert 'deleted' in cluster.kubectl("delete", "cm", "gone", "-n", ns).stdout
    p = cluster.kubectl("get", "cm", "gone", "-n", ns, check=False)
    assert p.returncode != 0 and "NotFound" in p.stderr


def test_get_watch(cluster: Cluster, ns: str) -> None:
    import os

    env = dict(os.environ, KUBECONFIG=str(cluster.kubeconfig), HOME=str(cluster.data_dir.parent))
    w = subprocess.Popen([KUBECTL, "get", "cm", "-n", ns, "-w", "--request-timeout=0"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
    try:
        time.sleep(1.5)
        cluster.kubectl("create", "configmap", "watched", "-n", ns)
        deadline = time.monotonic() + 15
        seen = ""
        assert w.stdout is not None
        while time.monotonic() < deadline:
            line = w.stdout.readline()
            seen += line
            if "watched" in line:
                break
        assert "watched" in seen
    finally:
        w.terminate()
        w.wait(5)


def test_auth_whoami_and_can_i(cluster: Cluster) -> None:
    out = cluster.kubectl("auth", "whoami").stdout
    assert "kplane-admin" in out and "system:masters" in out
    assert cluster.kubectl("auth", "can-i", "delete", "nodes").stdout.strip() == "yes"
    assert cluster.kubectl("auth", "can-i", "--list").returncode == 0


def test_service_account_token_rbac_grant_and_revoke(cluster: Cluster, ns: str, tmp_path: pytest.TempPathFactory) -> None:
    cluster.kubectl("create", "serviceaccount", "bot", "-n", ns)
    token = cluster.kubectl("create", "token", "bot", "-n", ns, "--duration=10m").stdout.strip()
    assert token.count(".") == 2
    kc = cluster.token_kubeconfig(tmp_path / "bot.kubeconfig", token)
    me = cluster.kubectl("auth", "whoami", kubeconfig=kc).stdout
    assert f"system:serviceaccount:{ns}:bot" in me
    denied = cluster.kubectl("get", "pods", "-n", ns, kubeconfig=kc, check=False)
    assert denied.returncode != 0 and "Forbidden" in denied.stderr
    assert cluster.kubectl("auth", "can-i", "list", "pods", "-n", ns, kubeconfig=kc, check=False).stdout.strip() == "no"
    cluster.kubectl("create", "role", "reader", "-n", ns, "--verb=get,list,watch", "--resource=pods")
    cluster.kubectl("create", "rolebinding", "bot-reader", "-n", ns, "--role=reader", f"--serviceaccount={ns}:bot")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if cluster.kubectl("get", "pods", "-n", ns, kubeconfig=kc, check=False).returncode == 0:
            break
        time.sleep(0.1)
    assert cluster.kubectl("auth", "can-i", "list", "pods", "-n", ns, kubeconfig=kc).stdout.strip() == "yes"
    # the grant is namespaced: other namespaces stay forbidden
    assert cluster.kubectl("get", "pods", "-n", "default", kubeconfig=kc, check=False).returncode != 0
    cluster.kubectl("delete", "rolebinding", "bot-reader", "-n", ns)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if cluster.kubectl("get", "pods", "-n", ns, kubeconfig=kc, check=False).returncode != 0:
            break
        time.sleep(0.1)
    assert cluster.kubectl("get", "pods", "-n", ns, kubeconfig=kc, check=False).returncode != 0
    # deleting the service account invalidates its tokens
    cluster.kubectl("delete", "serviceaccount", "bot", "-n", ns)
    p = cluster.kubectl("auth", "whoami", kubeconfig=kc, check=False)
    assert p.returncode != 0 and "Unauthorized" in p.stderr


def test_namespace_deletion_removes_content(cluster: Cluster) -> None:
    cluster.kubectl("create", "namespace", "doomed")
    cluster.kubectl("create", "configmap", "c", "-n", "doomed")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the controllers fill a new namespace
        if cluster.kubectl("get", "sa", "default", "-n", "doomed", check=False).returncode == 0:
            break
        time.sleep(0.1)
    cluster.kubectl("get", "cm", "kube-root-ca.crt", "-n", "doomed")
    cluster.kubectl("delete", "namespace", "doomed", "--timeout=30s")
    p = cluster.kubectl("get", "namespace", "doomed", check=False)
    assert p.returncode != 0 and "NotFound" in p.stderr
    p = cluster.kubectl("delete", "namespace", "kube-system", check=False)
    assert p.returncode != 0 and "Forbidden" in p.stderr


def test_restart_keeps_data(tmp_path_factory: pytest.TempPathFactory) -> None:
    base = tmp_path_factory.mktemp("restart")
    c = Cluster(base / "data")
    c.start()
    try:
        c.kubectl("create", "configmap", "durable", "--from-literal=k=v")
    finally:
        assert c.stop() == 0
    c.start()
    try:
        got = json.loads(c.kubectl("get", "cm", "durable", "-o", "json").stdout)
        assert got["data"] == {"k": "v"}
    finally:
        assert c.stop() == 0


def test_explain(cluster: Cluster) -> None:
    out = cluster.kubectl("explain", "pods.spec.containers").stdout
    assert "FIELD: containers <[]Container>" in out and "image" in out


def test_certificate_approve_and_deny(cluster: Cluster) -> None:
    import base64

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    csr = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bob")])).sign(key, hashes.SHA256())
    pem = base64.b64encode(csr.public_bytes(serialization.Encoding.PEM)).decode()
    for name in ("bob-a", "bob-d"):
        cluster.kubectl("apply", "-f", "-", input=json.dumps({
            "apiVersion": "certificates.k8s.io/v1", "kind": "CertificateSigningRequest", "metadata": {"name": name},
            "spec": {"request": pem, "signerName": "kubernetes.io/kube-apiserver-client", "usages": ["client auth"]}}))
    assert "Pending" in cluster.kubectl("get", "csr", "bob-a").stdout
    cluster.kubectl("certificate", "approve", "bob-a")  # a protobuf PUT to .../approval
    cluster.kubectl("certificate", "deny", "bob-d")
    got = json.loads(cluster.kubectl("get", "csr", "bob-a", "-o", "json").stdout)
    assert got["status"]["conditions"][0]["type"] == "Approved"
    assert got["spec"]["username"] == "kplane-admin"  # the requestor is the caller, never the body
    assert "Denied" in cluster.kubectl("get", "csr", "bob-d").stdout
    p = cluster.kubectl("certificate", "deny", "bob-a", check=False)
    assert p.returncode != 0 and "already Approved" in p.stderr


def test_bootstrap_tokens(cluster: Cluster, tmp_path: Path) -> None:
    from datetime import UTC, datetime, timedelta

    def secret(tid: str, sec: str, expires: datetime) -> str:
        return json.dumps({
            "apiVersion": "v1", "kind": "Secret", "type": "bootstrap.kubernetes.io/token",
            "metadata": {"name": f"bootstrap-token-{tid}", "namespace": "kube-system"},
            "stringData": {"token-id": tid, "token-secret": sec, "usage-bootstrap-authentication": "true",
                           "expiration": expires.strftime("%Y-%m-%dT%H:%M:%SZ"),
                           "auth-extra-groups": "system:bootstrappers:kplane:default-node-token"}})

    now = datetime.now(UTC)
    cluster.kubectl("apply", "-f", "-", input=secret("abcdef", "0123456789abcdef", now + timedelta(hours=1)))
    cluster.kubectl("apply", "-f", "-", input=secret("oldtok", "0123456789abcdef", now - timedelta(minutes=1)))
    good = cluster.token_kubeconfig(tmp_path / "good", "abcdef.0123456789abcdef")
    me = cluster.kubectl("auth", "whoami", "-o", "json", kubeconfig=good).stdout
    info = json.loads(me)["status"]["userInfo"]
    assert info["username"] == "system:bootstrap:abcdef"
    assert "system:bootstrappers:kplane:default-node-token" in info["groups"]
    # bootstrappers may create CSRs, nothing else
    assert cluster.kubectl("auth", "can-i", "create", "csr", kubeconfig=good).stdout.strip() == "yes"
    assert cluster.kubectl("auth", "can-i", "list", "secrets", "-A", kubeconfig=good, check=False).stdout.strip() == "no"
    for bad in ("abcdef.0123456789abcdee", "oldtok.0123456789abcdef", "zzzzzz.0123456789abcdef"):
        kc = cluster.token_kubeconfig(tmp_path / "bad", bad)
        p = cluster.kubectl("auth", "whoami", kubeconfig=kc, check=False)
        assert p.returncode != 0 and "Unauthorized" in p.stderr, bad
