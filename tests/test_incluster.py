"""A pod using the standard in-cluster configuration (KUBERNETES_SERVICE_HOST/PORT, the projected token and CA at
/var/run/secrets/kubernetes.io/serviceaccount) reaches the apiserver through the kubernetes Service's VIP, which
kube-proxy redirects, and is authorized as its service account: 403 before a RoleBinding, 200 after."""

from __future__ import annotations

import json
import os
import shutil
import sys
import textwrap
from pathlib import Path

import pytest

from tests.cluster import Cluster
from tests.test_node import phase, wait

SCRIPT = textwrap.dedent("""
    import os, sys, time
    from kubernetes import client, config
    config.load_incluster_config()
    ns = sys.argv[1]
    print("HOST", os.environ["KUBERNETES_SERVICE_HOST"], os.environ["KUBERNETES_SERVICE_PORT"], flush=True)
    v1 = client.CoreV1Api()
    while True:
        try:
            pods = v1.list_namespaced_pod(ns)
            print("OK", len(pods.items), flush=True)
        except client.ApiException as e:
            print("STATUS", e.status, (e.body or "").replace("\\n", " ")[:300], flush=True)
        except Exception as e:
            print("ERROR", type(e).__name__, str(e)[:200], flush=True)
        time.sleep(0.5)
""")

needs_vips = pytest.mark.skipif(os.geteuid() != 0 or not (shutil.which("nft") or shutil.which("iptables")),
                                reason="Service VIPs need root and nftables (or iptables) for kube-proxy")


@pytest.mark.root
@needs_vips
def test_pod_reaches_apiserver_through_the_kubernetes_vip(cluster: Cluster, ns: str, tmp_path: Path) -> None:
    script = tmp_path / "incluster.py"
    script.write_text(SCRIPT)
    script.chmod(0o644)
    tmp_path.chmod(0o755)
    body = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "lister"},
            "spec": {"containers": [{"name": "c", "image": "none", "command": [sys.executable, str(script), ns]}]}}
    cluster.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(body))
    wait(lambda: phase(cluster, ns, "lister") == "Running")
    vip = json.loads(cluster.kubectl("get", "svc", "kubernetes", "-n", "default", "-o", "json").stdout)["spec"][
        "clusterIP"]

    def logs() -> str:
        return cluster.kubectl("logs", "lister", "-n", ns, check=False).stdout

    wait(lambda: "STATUS" in logs() or "OK" in logs(), timeout=60)
    out = logs()
    assert f"HOST {vip} 443" in out, out  # the Service VIP, not the apiserver's own address
    assert "STATUS 403" in out, out
    assert f"system:serviceaccount:{ns}:default" in out, out
    cluster.kubectl("create", "rolebinding", "lister-view", "-n", ns, "--clusterrole=view",
                    f"--serviceaccount={ns}:default")
    wait(lambda: "OK " in logs(), timeout=30)
    cluster.kubectl("delete", "pod", "lister", "-n", ns, "--grace-period=0", "--force")
