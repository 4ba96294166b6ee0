"""The node: TLS bootstrap, heartbeat, pods as processes, service-account injection, and what a node may not do."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.cluster import Cluster

NODE_ROOT = os.geteuid() == 0


def wait(fn: Any, timeout: float = 30, every: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"timed out; last value {last!r}")


def node_name(cluster: Cluster) -> str:
    """The cluster's own node (other tests add fake Node objects to the shared cluster)."""
    return next(cluster.data_dir.glob("node/*")).name


def pod_json(cluster: Cluster, ns: str, name: str) -> dict[str, Any]:
    return json.loads(cluster.kubectl("get", "pod", name, "-n", ns, "-o", "json").stdout)  # type: ignore[no-any-return]


def phase(cluster: Cluster, ns: str, name: str) -> str:
    return str(pod_json(cluster, ns, name)["status"].get("phase"))


def run_pod(cluster: Cluster, ns: str, name: str, command: list[str], **spec: Any) -> None:
    body = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"containers": [{"name": "c", "image": "none", "command": command}], **spec}}
    cluster.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(body))


def node_cert(cluster: Cluster) -> tuple[str, str]:
    pem = str(next(cluster.data_dir.glob("node/*/pki/kubelet-client-current.pem")))
    return pem, pem


def test_node_ready_with_upstream_columns(cluster: Cluster) -> None:
    lines = cluster.kubectl("get", "nodes", "-o", "wide").stdout.splitlines()
    assert lines[0].split()[:7] == ["NAME", "STATUS", "ROLES", "AGE", "VERSION", "INTERNAL-IP", "EXTERNAL-IP"]
    node = json.loads(cluster.kubectl("get", "node", node_name(cluster), "-o", "json").stdout)
    conds = {c["type"]: c["status"] for c in node["status"]["conditions"]}
    assert conds == {"Ready": "True", "MemoryPressure": "False", "DiskPressure": "False", "PIDPressure": "False"}
    assert node["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"] == cluster.kubelet_port
    assert int(node["status"]["capacity"]["pods"]) > 0


def test_kubelet_client_csr_approved_and_issued(cluster: Cluster) -> None:
    csrs = json.loads(cluster.kubectl("get", "csr", "-o", "json").stdout)["items"]
    client = [c for c in csrs if c["spec"]["signerName"] == "kubernetes.io/kube-apiserver-client-kubelet"]
    assert client, csrs
    c = client[0]
    assert c["spec"]["username"].startswith("system:bootstrap:")  # requested with the bootstrap token
    assert [x["type"] for x in c["status"]["conditions"]] == ["Approved"]
    assert c["status"]["certificate"]
    serving = [c for c in csrs if c["spec"]["signerName"] == "kubernetes.io/kubelet-serving"]
    assert serving and serving[0]["status"].get("certificate")
    out = cluster.kubectl("get", "csr").stdout
    assert "Approved,Issued" in out
    # the node now authenticates as itself
    r = requests.post(cluster.url + "/apis/authentication.k8s.io/v1/selfsubjectreviews", cert=node_cert(cluster),
                      verify=str(cluster.pki / "ca.crt"), timeout=10,
                      json={"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"})
    info = r.json()["status"]["userInfo"]
    assert info["username"] == f"system:node:{node_name(cluster)}" and "system:nodes" in info["groups"]


@pytest.mark.slow
def test_lease_renews(cluster: Cluster) -> None:
    name = node_name(cluster)

    def renew() -> str:
        lease = json.loads(cluster.kubectl("get", "lease", name, "-n", "kube-node-lease", "-o", "json").stdout)
        assert lease["spec"]["holderIdentity"] == name
        return str(lease["spec"]["renewTime"])

    first = renew()
    wait(lambda: renew() != first, timeout=25, every=1)


def test_pod_runs_to_succeeded(cluster: Cluster, ns: str) -> None:
    run_pod(cluster, ns, "once", ["sh", "-c", "echo done"], restartPolicy="Never")
    wait(lambda: phase(cluster, ns, "once") == "Succeeded")
    st = pod_json(cluster, ns, "once")["status"]["containerStatuses"][0]
    assert st["state"]["terminated"]["exitCode"] == 0 and st["state"]["terminated"]["reason"] == "Completed"
    assert "Completed" in cluster.kubectl("get", "pod", "once", "-n", ns).stdout


def test_failed_pod_and_missing_command(cluster: Cluster, ns: str) -> None:
    run_pod(cluster, ns, "fails", ["sh", "-c", "exit 7"], restartPolicy="Never")
    wait(lambda: phase(cluster, ns, "fails") == "Failed")
    assert pod_json(cluster, ns, "fails")["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 7
    body = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "nocmd"},
            "spec": {"containers": [{"name": "c", "image": "nginx"}]}}
    cluster.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(body))

    def waiting() -> dict[str, Any] | None:
        cs = pod_json(cluster, ns, "nocmd")["status"].get("containerStatuses") or [{}]
        w = cs[0].get("state", {}).get("waiting")
        return w if w and w.get("reason") == "CreateContainerConfigError" else None

    w = wait(waiting)
    assert "has no command" in w["message"]


def test_crashing_pod_restarts_with_last_state(cluster: Cluster, ns: str) -> None:
    run_pod(cluster, ns, "crash", ["sh", "-c", "echo boom; exit 3"])

    def restarted() -> dict[str, Any] | None:
        cs = pod_json(cluster, ns, "crash")["status"].get("containerStatuses") or [{}]
        return cs[0] if cs[0].get("restartCount", 0) >= 2 else None

    cs = wait(restarted)
    assert cs["lastState"]["terminated"]["exitCode"] == 3
    assert phase(cluster, ns, "crash") == "Running"
    wait(lambda: "CrashLoopBackOff" in cluster.kubectl("get", "pod", "crash", "-n", ns).stdout
         or "Error" in cluster.kubectl("get", "pod", "crash", "-n", ns).stdout)


def test_delete_stops_process_within_grace_period(cluster: Cluster, ns: str) -> None:
    run_pod(cluster, ns, "stubborn", ["sh", "-c", "trap '' TERM; while true; do sleep 0.2; done"],
            terminationGracePeriodSeconds=2)
    wait(lambda: phase(cluster, ns, "stubborn") == "Running")
    uid = pod_json(cluster, ns, "stubborn")["metadata"]["uid"]
    pid_file = next(cluster.data_dir.glob(f"node/*/containers/containers/{uid}_c_0/pid"))
    pid = int(pid_file.read_text().split()[0])
    os.kill(pid, 0)
    t0 = time.monotonic()
    cluster.kubectl("delete", "pod", "stubborn", "-n", ns, "--timeout=20s")
    took = time.monotonic() - t0
    assert 1.5 <= took <= 8, took  # SIGTERM ignored: killed when the 2 s grace ran out
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    # a process that honours SIGTERM goes at once
    run_pod(cluster, ns, "polite", ["sleep", "600"], terminationGracePeriodSeconds=30)
    wait(lambda: phase(cluster, ns, "polite") == "Running")
    t0 = time.monotonic()
    cluster.kubectl("delete", "pod", "polite", "-n", ns, "--timeout=20s")
    assert time.monotonic() - t0 < 5


@pytest.mark.skipif(not NODE_ROOT, reason="the standard service-account path needs a mount namespace (root)")
def test_pod_reads_token_and_ca_from_standard_path(cluster: Cluster, ns: str) -> None:
    script = (
        "import json, os, ssl, urllib.request\n"
        "d = '/var/run/secrets/kubernetes.io/serviceaccount'\n"
        "tok = open(d + '/token').read(); ns = open(d + '/namespace').read()\n"
        "ctx = ssl.create_default_context(cafile=d + '/ca.crt')\n"
        "url = 'https://%s:%s/apis/authentication.k8s.io/v1/selfsubjectreviews' % ("
        "os.environ['KUBERNETES_SERVICE_HOST'], os.environ['KUBERNETES_SERVICE_PORT'])\n"
        "body = json.dumps({'apiVersion': 'authentication.k8s.io/v1', 'kind': 'SelfSubjectReview'}).encode()\n"
        "req = urllib.request.Request(url, data=body, headers={'Authorization': 'Bearer ' + tok,"
        " 'Content-Type': 'application/json'})\n"
        "u = json.load(urllib.request.urlopen(req, context=ctx))['status']['userInfo']\n"
        "assert u['username'] == 'system:serviceaccount:%s:default' % ns, u\n"
        "assert 'authentication.kubernetes.io/pod-name' in u.get('extra', {}), u\n"
        "print('ok', u['username'])\n"
    )
    run_pod(cluster, ns, "insider", [sys.executable, "-c", script], restartPolicy="Never")
    wait(lambda: phase(cluster, ns, "insider") in ("Succeeded", "Failed"))
    assert phase(cluster, ns, "insider") == "Succeeded"
    # the token is bound to the pod: once the pod is gone, the token no longer authenticates
    pod = pod_json(cluster, ns, "insider")
    vol = next(v["name"] for v in pod["spec"]["volumes"] if v["name"].startswith("kube-api-access-"))
    tok_file = next(cluster.data_dir.glob(f"node/*/pods/{pod['metadata']['uid']}/volumes/{vol}/token"))
    token = tok_file.read_text()
    ok = requests.get(cluster.url + "/api", headers={"Authorization": f"Bearer {token}"},
                      verify=str(cluster.pki / "ca.crt"), timeout=10)
    assert ok.status_code == 200
    cluster.kubectl("delete", "pod", "insider", "-n", ns)
    gone = requests.get(cluster.url + "/api", headers={"Authorization": f"Bearer {token}"},
                        verify=str(cluster.pki / "ca.crt"), timeout=10)
    assert gone.status_code == 401


def test_env_from_configmap_and_secret_and_volumes(cluster: Cluster, ns: str) -> None:
    cluster.kubectl("create", "configmap", "cfg", "-n", ns, "--from-literal=COLOR=blue", "--from-literal=file.txt=hi")
    cluster.kubectl("create", "secret", "generic", "sec", "-n", ns, "--from-literal=PASSWORD=s3cret")
    out_dir = cluster.data_dir.parent / f"out-{ns}"
    out_dir.mkdir()
    target = out_dir / "env.txt"
    body = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "envs"}, "spec": {
        "restartPolicy": "Never",
        "containers": [{"name": "c", "image": "none", "workingDir": str(out_dir),
                        "command": ["sh", "-c", "echo \"$COLOR $PASSWORD $MY_NS $(pwd)\" > env.txt"],
                        "env": [{"name": "COLOR", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "COLOR"}}},
                                {"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "sec",
                                                                                     "key": "PASSWORD"}}},
                                {"name": "MY_NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}]}]}}
    cluster.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(body))
    wait(lambda: phase(cluster, ns, "envs") == "Succeeded")
    assert target.read_text().strip() == f"blue s3cret {ns} {out_dir}"


def test_node_may_not_write_another_node_or_read_unrelated_secrets(cluster: Cluster, ns: str) -> None:
    cert, ca = node_cert(cluster), str(cluster.pki / "ca.crt")
    me = node_name(cluster)
    admin = (str(cluster.pki / "admin.crt"), str(cluster.pki / "admin.key"))
    other = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "someone-else"}}
    requests.post(cluster.url + "/api/v1/nodes", json=other, cert=admin, verify=ca, timeout=10)
    try:
        cur = requests.get(cluster.url + "/api/v1/nodes/someone-else", cert=admin, verify=ca, timeout=10).json()
        cur["status"] = {"conditions": [{"type": "Ready", "status": "True"}]}
        cur["metadata"].pop("resourceVersion", None)  # unconditional: node IPAM may write the Node meanwhile
        r = requests.put(cluster.url + "/api/v1/nodes/someone-else/status", json=cur, cert=cert, verify=ca, timeout=10)
        assert r.status_code == 403 and r.json()["kind"] == "Status"
        r = requests.delete(cluster.url + "/api/v1/nodes/someone-else", cert=cert, verify=ca, timeout=10)
        assert r.status_code == 403
    finally:
        requests.delete(cluster.url + "/api/v1/nodes/someone-else", cert=admin, verify=ca, timeout=10)
    # a secret no pod on this node uses: forbidden; after a pod on this node mounts it: allowed
    cluster.kubectl("create", "secret", "generic", "private", "-n", ns, "--from-literal=k=v")
    r = requests.get(cluster.url + f"/api/v1/namespaces/{ns}/secrets/private", cert=cert, verify=ca, timeout=10)
    assert r.status_code == 403 and "no relationship found" in r.json()["message"]
    r = requests.get(cluster.url + f"/api/v1/namespaces/{ns}/secrets", cert=cert, verify=ca, timeout=10)
    assert r.status_code == 403
    body = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "user"}, "spec": {
        "containers": [{"name": "c", "image": "none", "command": ["sleep", "600"],
                        "volumeMounts": [{"name": "s", "mountPath": "/tmp/kplane-test-secret"}]}],
        "volumes": [{"name": "s", "secret": {"secretName": "private"}}]}}
    cluster.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(body))
    wait(lambda: pod_json(cluster, ns, "user")["spec"].get("nodeName") == me)
    r = requests.get(cluster.url + f"/api/v1/namespaces/{ns}/secrets/private", cert=cert, verify=ca, timeout=10)
    assert r.status_code == 200
    # a node may not list all pods, only its own
    r = requests.get(cluster.url + "/api/v1/pods", cert=cert, verify=ca, timeout=10)
    assert r.status_code == 403
    r = requests.get(cluster.url + f"/api/v1/pods?fieldSelector=spec.nodeName%3D{me}", cert=cert, verify=ca,
                     timeout=10)
    assert r.status_code == 200
    cluster.kubectl("delete", "pod", "user", "-n", ns, "--wait=false")


def test_csr_for_another_nodes_name_is_not_approved(cluster: Cluster, tmp_path: Path) -> None:
    import base64

    from kplane.kubelet import tlsbootstrap as tb

    key = tb.new_key()
    csr = tb.build_csr(key, "other-node")
    body = {"apiVersion": "certificates.k8s.io/v1", "kind": "CertificateSigningRequest",
            "metadata": {"name": "steal-other-node"},
            "spec": {"request": base64.b64encode(csr).decode(), "signerName": tb.CLIENT_SIGNER,
                     "usages": ["digital signature", "client auth"]}}
    r = requests.post(cluster.url + "/apis/certificates.k8s.io/v1/certificatesigningrequests", json=body,
                      cert=node_cert(cluster), verify=str(cluster.pki / "ca.crt"), timeout=10)
    assert r.status_code == 201
    assert r.json()["spec"]["username"] == f"system:node:{node_name(cluster)}"
    time.sleep(3)  # the approver has seen it by now
    got = json.loads(cluster.kubectl("get", "csr", "steal-other-node", "-o", "json").stdout)
    assert not got.get("status", {}).get("conditions") and not got.get("status", {}).get("certificate")


# --- a separate server and agent: the join line, bad tokens and hashes, agent restarts --------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    c = Cluster(tmp_path_factory.mktemp("server") / "data", node=False)
    c.start()
    yield c
    c.stop()


def token_create(server: Cluster, ttl: str = "1h") -> tuple[str, str]:
    out = subprocess.run([sys.executable, "-m", "kplane.cli", "token", "create", "--data-dir", str(server.data_dir),
                          "--ttl", ttl], capture_output=True, text=True, check=True).stdout.splitlines()
    token, join = out[0], out[1]
    # the join line names the advertised address (the default-route interface's, as upstream), on the same port
    assert re.fullmatch(rf"kplane agent --server https://[0-9.]+:{server.port} --token {token} "
                        r"--discovery-token-ca-cert-hash sha256:[0-9a-f]{64}", join), join
    return token, join.split()[-1]


def agent_cmd(server: Cluster, data: Path, name: str, *extra: str) -> list[str]:
    from tests.cluster import free_port

    return [sys.executable, "-m", "kplane.cli", "agent", "--server", server.url, "--data-dir", str(data),
            "--node-name", name, "--kubelet-port", str(free_port()), "--pod-restart-backoff", "1",
            "--discovery-timeout", "3", *extra]


def test_agent_refuses_wrong_hash_and_bad_tokens(server: Cluster, tmp_path: Path) -> None:
    token, ca_hash = token_create(server)
    wrong_hash = "sha256:" + "0" * 64
    p = subprocess.run(agent_cmd(server, tmp_path / "a", "bad1", "--token", token, "--discovery-token-ca-cert-hash",
                                 wrong_hash), capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "does not match --discovery-token-ca-cert-hash" in p.stderr
    unknown = "zzzzzz.0123456789abcdef"
    p = subprocess.run(agent_cmd(server, tmp_path / "b", "bad2", "--token", unknown, "--discovery-token-ca-cert-hash",
                                 ca_hash), capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "no signature for token id zzzzzz" in p.stderr
    forged = token[:7] + ("a" if token[7] != "a" else "b") + token[8:]  # right id, wrong secret
    p = subprocess.run(agent_cmd(server, tmp_path / "c", "bad3", "--token", forged, "--discovery-token-ca-cert-hash",
                                 ca_hash), capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "signature does not verify" in p.stderr
    p = subprocess.run(agent_cmd(server, tmp_path / "d", "bad4", "--token", "not-a-token",
                                 "--discovery-token-ca-cert-hash", ca_hash), capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "bootstrap token must look like" in p.stderr
    assert "bad1" not in server.kubectl("get", "nodes").stdout


def test_expired_bootstrap_token_is_refused(server: Cluster, tmp_path: Path) -> None:
    from datetime import UTC, datetime, timedelta

    from kplane import bootstraptoken

    token = bootstraptoken.generate()
    secret = bootstraptoken.secret_for(token, ttl_s=3600, description="expired")
    secret["stringData"]["expiration"] = (datetime.now(UTC) - timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    server.kubectl("apply", "-f", "-", input=json.dumps(secret))
    _, ca_hash = token_create(server)
    p = subprocess.run(agent_cmd(server, tmp_path / "e", "late", "--token", token, "--discovery-token-ca-cert-hash",
                                 ca_hash), capture_output=True, text=True, timeout=60)
    assert p.returncode == 1, p.stderr
    assert "late" not in server.kubectl("get", "nodes").stdout


def stop_agent(agent: subprocess.Popen[bytes], data: Path) -> None:
    """Stop an agent as Ctrl-C does (killed if it takes over 15 s), then whatever containers it left."""
    from tests.cluster import stop_containers

    agent.send_signal(2)
    try:
        agent.wait(15)
    except subprocess.TimeoutExpired:
        agent.kill()
    stop_containers(data)


def test_node_is_registered_with_its_status(server: Cluster, tmp_path: Path) -> None:
    """As the kubelet does, the agent creates its Node with the status in it: the first revision of the Node
    (replayed by a watch from before it existed) already has conditions, addresses and nodeInfo."""

    before = json.loads(server.kubectl("get", "--raw", "/api/v1/nodes").stdout)["metadata"]["resourceVersion"]
    assert before
    token, ca_hash = token_create(server)
    data = tmp_path / "agent"
    agent = subprocess.Popen(agent_cmd(server, data, "regstat", "--token", token, "--discovery-token-ca-cert-hash",
                                       ca_hash), stdout=(tmp_path / "agent.log").open("ab"), stderr=subprocess.STDOUT)
    try:
        wait(lambda: "Ready" in server.kubectl("get", "node", "regstat", check=False).stdout, timeout=40)
        raw = server.kubectl("get", "--raw",
                             f"/api/v1/nodes?watch=1&resourceVersion={before}&timeoutSeconds=1").stdout
        first = next(e for e in map(json.loads, raw.splitlines())
                     if e["object"]["metadata"]["name"] == "regstat")
        assert first["type"] == "ADDED"
        st = first["object"]["status"]
        assert {c["type"] for c in st["conditions"]} >= {"Ready", "MemoryPressure", "DiskPressure", "PIDPressure"}
        assert st["addresses"] and st["nodeInfo"]["kubeletVersion"] and st["daemonEndpoints"]["kubeletEndpoint"]
    finally:
        stop_agent(agent, data)
        server.kubectl("delete", "node", "regstat", check=False)


def test_agent_restart_leaves_pods_running(server: Cluster, tmp_path: Path) -> None:

    token, ca_hash = token_create(server)
    data = tmp_path / "agent"
    log = (tmp_path / "agent.log").open("ab")
    cmd = agent_cmd(server, data, "worker", "--token", token, "--discovery-token-ca-cert-hash", ca_hash)
    agent = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait(lambda: "Ready" in server.kubectl("get", "node", "worker", check=False).stdout, timeout=40)
        server.kubectl("apply", "-f", "-", input=json.dumps({
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "durable"},
            "spec": {"nodeName": "worker", "containers": [
                {"name": "c", "image": "none", "command": ["sh", "-c", "sleep 2; echo $$ > /dev/null; sleep 600"]}]}}))
        wait(lambda: phase(server, "default", "durable") == "Running")
        uid = pod_json(server, "default", "durable")["metadata"]["uid"]
        pid = int(next(data.glob(f"node/worker/containers/containers/{uid}_c_0/pid")).read_text().split()[0])
        agent.send_signal(2)
        assert agent.wait(15) == 0
        os.kill(pid, 0)  # still running with the agent gone
        # restart without a token: the node has its certificate now
        cmd2 = [a for a in cmd if a not in (token,)]
        cmd2.remove("--token")
        agent = subprocess.Popen(cmd2, stdout=log, stderr=subprocess.STDOUT)
        time.sleep(3)
        os.kill(pid, 0)
        st = pod_json(server, "default", "durable")["status"]["containerStatuses"][0]
        assert st["restartCount"] == 0 and "running" in st["state"]
        # an exit while the agent is down is not lost
        agent.send_signal(2)
        agent.wait(15)
        os.kill(pid, 9)
        agent = subprocess.Popen(cmd2, stdout=log, stderr=subprocess.STDOUT)

        def restarted() -> dict[str, Any] | None:
            cs = pod_json(server, "default", "durable")["status"]["containerStatuses"][0]
            return cs if cs.get("restartCount", 0) >= 1 else None

        cs = wait(restarted)
        assert cs["lastState"]["terminated"]["exitCode"] == 137
    finally:
        stop_agent(agent, data)


async def test_client_certificate_rotation_uses_selfnodeclient(server: Cluster, tmp_path: Path) -> None:
    import random

    from cryptography import x509

    from kplane.kubelet import tlsbootstrap as tb
    from kplane.kubelet.agent import NodeAgent, NodeConfig
    from tests.cluster import free_port

    token, ca_hash = token_create(server)
    agent = NodeAgent(NodeConfig(server=server.url, data_dir=tmp_path / "rot", name="rotor", token=token,
                                 ca_hash=ca_hash, kubelet_port=free_port()))
    await agent.ensure_credentials()
    agent.client = agent._node_client()
    try:
        first = x509.load_pem_x509_certificate(agent.client_pem.read_bytes())
        await agent.rotate_client_now()
        second = x509.load_pem_x509_certificate(agent.client_pem.read_bytes())
        assert second.serial_number != first.serial_number
        assert second.subject == first.subject
        assert second.public_key().public_numbers() != first.public_key().public_numbers()  # a new key
        me = await agent.client.create("/apis/authentication.k8s.io/v1/selfsubjectreviews",
                                       {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"})
        assert me["status"]["userInfo"]["username"] == "system:node:rotor"
        csrs = (await agent.client.get("/apis/certificates.k8s.io/v1/certificatesigningrequests"))["items"]
        renewal = [c for c in csrs if c["spec"]["username"] == "system:node:rotor"]
        assert renewal and "self" in renewal[0]["status"]["conditions"][0]["message"]
    finally:
        await agent.client.close()
    # the deadline falls at 70-90 % of the lifetime
    life = second.not_valid_after_utc - second.not_valid_before_utc
    for seed in range(50):
        d = tb.rotation_deadline(second, rng=random.Random(seed)) - second.not_valid_before_utc
        assert life * 0.7 <= d <= life * 0.9


def test_stopping_while_a_pod_terminates_is_clean(tmp_path: Path) -> None:
    """`kplane up` stopped while a pod is being deleted (its worker is in the grace period): the worker removes
    itself from the pod table as it is cancelled, which once crashed the agent's stop ("dictionary changed size
    during iteration"). The stop must be clean: exit code 0 and no traceback in the log."""
    c = Cluster(tmp_path / "data")
    c.start()
    try:
        ns = "default"
        run_pod(c, ns, "stubborn", ["sh", "-c", "trap '' TERM; while true; do sleep 0.2; done"],
                terminationGracePeriodSeconds=30)
        wait(lambda: phase(c, ns, "stubborn") == "Running")
        c.kubectl("delete", "pod", "stubborn", "-n", ns, "--wait=false")
        wait(lambda: bool(pod_json(c, ns, "stubborn")["metadata"].get("deletionTimestamp")))
        time.sleep(0.5)  # the worker is now waiting out the grace period
    finally:
        rc = c.stop()
    log = c.log_path.read_text()
    assert rc == 0, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
