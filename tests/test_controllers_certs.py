"""Bootstrap-token, CSR and node-lifecycle controllers, run in-process against a real kplane cluster."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kplane import bootstraptoken, pki
from kplane.client import APIClient
from kplane.controllers.bootstrap import BootstrapSigner, TokenCleaner
from kplane.controllers.certificates import CSR_PATH, CSRApprover, CSRSigner
from kplane.controllers.nodelifecycle import NOT_READY, UNREACHABLE, NodeLifecycle
from kplane.errors import StatusError
from tests.cluster import Cluster, update_retrying

Obj = dict[str, Any]


# ------------------------------------------------------------------------------------------------ helpers


def _client(cluster: Cluster, who: str) -> APIClient:
    return APIClient(cluster.url, ca_file=cluster.pki / "ca.crt", cert_file=cluster.pki / f"{who}.crt",
                     key_file=cluster.pki / f"{who}.key")


def _pair_client(cluster: Cluster, tmp: Path, pair: pki.KeyPair, key: Any = None) -> APIClient:
    name = uuid.uuid4().hex[:8]
    cert_f, key_f = tmp / f"{name}.crt", tmp / f"{name}.key"
    cert_f.write_bytes(pair.cert_pem())
    key_f.write_bytes(pair.key_pem() if key is None else key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return APIClient(cluster.url, ca_file=cluster.pki / "ca.crt", cert_file=cert_f, key_file=key_f)


def _ca(cluster: Cluster) -> pki.KeyPair:
    return pki.load_pair(cluster.pki / "ca.crt", cluster.pki / "ca.key")


def _node_client(cluster: Cluster, tmp: Path, node: str) -> APIClient:
    pair = pki.issue(_ca(cluster), common_name=f"system:node:{node}", organizations=["system:nodes"], client=True,
                     days=1)
    return _pair_client(cluster, tmp, pair)


def _csr_pem(cn: str, orgs: list[str], *, dns: Sequence[str] = (), ips: Sequence[str] = (),
             key: ec.EllipticCurvePrivateKey | None = None) -> tuple[bytes, ec.EllipticCurvePrivateKey]:
    key = key or ec.generate_private_key(ec.SECP256R1())
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in orgs]
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    b = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(attrs))
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return b.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM), key


def _csr_body(name: str, pem: bytes, signer: str, usages: list[str], expiration_s: int | None = None) -> Obj:
    spec: Obj = {"request": base64.b64encode(pem).decode(), "signerName": signer, "usages": usages}
    if expiration_s is not None:
        spec["expirationSeconds"] = expiration_s
    return {"apiVersion": "certificates.k8s.io/v1", "kind": "CertificateSigningRequest",
            "metadata": {"name": name}, "spec": spec}


def _conds(csr: Obj) -> dict[str, Obj]:
    return {c["type"]: c for c in (csr.get("status") or {}).get("conditions") or []}


async def _eventually(fn: Callable[[], Awaitable[Any]], wait_s: float = 15.0, what: str = "condition") -> Any:
    deadline = asyncio.get_running_loop().time() + wait_s
    last: Any = None
    while asyncio.get_running_loop().time() < deadline:
        last = await fn()
        if last:
            return last
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}; last={last!r}")


async def _get_csr(admin: APIClient, name: str) -> Obj:
    return await admin.get(f"{CSR_PATH}/{name}")


def _uniq(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


@pytest.fixture
async def admin(cluster: Cluster) -> AsyncIterator[APIClient]:
    c = _client(cluster, "admin")
    yield c
    await c.close()


@pytest.fixture
async def cm(cluster: Cluster) -> AsyncIterator[APIClient]:
    c = _client(cluster, "controller-manager")
    yield c
    await c.close()


@pytest.fixture
async def csr_controllers(cluster: Cluster, cm: APIClient) -> AsyncIterator[tuple[CSRApprover, CSRSigner]]:
    approver, signer = CSRApprover(cm), CSRSigner(cm, _ca(cluster))
    approver.start()
    signer.start()
    yield approver, signer
    await approver.close()
    await signer.close()


async def _make_token(admin: APIClient, ttl_s: int = 3600) -> str:
    token = bootstraptoken.generate()
    await admin.create("/api/v1/namespaces/kube-system/secrets", bootstraptoken.secret_for(
        token, ttl_s=ttl_s, description="test", groups=["system:bootstrappers:kplane:default-node-token"]))
    return token


# ------------------------------------------------------------------------------------------------ bootstrap tokens


async def test_cluster_info_signed_for_token_and_unsigned_after_delete(cluster: Cluster, admin: APIClient,
                                                                       cm: APIClient) -> None:
    ca_pem = (cluster.pki / "ca.crt").read_bytes()
    # the cluster runs its own signer too: both must describe the same server (the advertised address)
    signer = BootstrapSigner(cm, server=cluster.advertised_url, ca_pem=ca_pem, poll_s=1)
    signer.start()
    try:
        token = await _make_token(admin)
        tid = token.split(".")[0]
        path = "/api/v1/namespaces/kube-public/configmaps/cluster-info"

        async def signed() -> Obj | None:
            with contextlib.suppress(StatusError):
                data = (await admin.get(path)).get("data") or {}
                if f"jws-kubeconfig-{tid}" in data:
                    return data
            return None

        data = await _eventually(signed, what="cluster-info signature")
        kubeconfig = data["kubeconfig"]
        assert cluster.advertised_url in kubeconfig
        assert base64.b64encode(ca_pem).decode() in kubeconfig
        assert "users: null" in kubeconfig and "token" not in kubeconfig
        sig = data[f"jws-kubeconfig-{tid}"]
        assert bootstraptoken.verify_jws_detached(sig, kubeconfig.encode(), token)
        assert not bootstraptoken.verify_jws_detached(sig, kubeconfig.encode(), bootstraptoken.generate())

        # an admin's stray edit of the kubeconfig is put back
        await update_retrying(admin, path, lambda cur: cur["data"].__setitem__("kubeconfig", "tampered"))
        await _eventually(lambda: _cm_value(admin, path, "kubeconfig", kubeconfig), what="kubeconfig restored")

        await admin.delete(f"/api/v1/namespaces/kube-system/secrets/bootstrap-token-{tid}")

        async def unsigned() -> bool:
            data = (await admin.get(path)).get("data") or {}
            return f"jws-kubeconfig-{tid}" not in data and data.get("kubeconfig") == kubeconfig

        await _eventually(unsigned, what="signature removal")
    finally:
        await signer.close()


async def _cm_value(admin: APIClient, path: str, key: str, want: str) -> bool:
    return ((await admin.get(path)).get("data") or {}).get(key) == want


async def test_expired_tokens_are_not_signed_and_are_cleaned(cluster: Cluster, admin: APIClient,
                                                             cm: APIClient) -> None:
    signer = BootstrapSigner(cm, server=cluster.advertised_url, ca_pem=(cluster.pki / "ca.crt").read_bytes(),
                             poll_s=0.5)
    cleaner = TokenCleaner(cm, poll_s=0.5)
    signer.start()
    try:
        token = await _make_token(admin, ttl_s=2)
        tid = token.split(".")[0]
        path = "/api/v1/namespaces/kube-public/configmaps/cluster-info"

        async def has_sig() -> bool:
            with contextlib.suppress(StatusError):
                return f"jws-kubeconfig-{tid}" in ((await admin.get(path)).get("data") or {})
            return False

        await _eventually(has_sig, what="signature for short-lived token")

        async def no_sig() -> bool:
            return not await has_sig()

        await _eventually(no_sig, wait_s=10, what="signature of expired token removed")
        # (a control plane that runs its own TokenCleaner may already have deleted the expired Secret)
        keep = await _make_token(admin, ttl_s=3600)
        cleaner.start()

        async def gone() -> bool:
            try:
                await admin.get(f"/api/v1/namespaces/kube-system/secrets/bootstrap-token-{tid}")
                return False
            except StatusError as err:
                return err.code == 404

        await _eventually(gone, what="expired token secret deleted")
        await admin.get(f"/api/v1/namespaces/kube-system/secrets/bootstrap-token-{keep.split('.')[0]}")
    finally:
        await signer.close()
        await cleaner.close()


# ------------------------------------------------------------------------------------------------ CSRs


async def test_bootstrap_token_node_client_csr_approved_and_issued(
        cluster: Cluster, admin: APIClient, csr_controllers: Any, tmp_path: Path) -> None:
    token = await _make_token(admin)
    boot = APIClient(cluster.url, ca_file=cluster.pki / "ca.crt", token=token)
    node = _uniq("boot")
    try:
        pem, key = _csr_pem(f"system:node:{node}", ["system:nodes"])
        name = _uniq("node-csr")
        created = await boot.create(CSR_PATH, _csr_body(name, pem, "kubernetes.io/kube-apiserver-client-kubelet",
                                                         ["digital signature", "client auth"], 3600))
        assert created["spec"]["username"] == f"system:bootstrap:{token.split('.')[0]}"

        async def issued() -> Obj | None:
            csr = await boot.get(f"{CSR_PATH}/{name}")
            return csr if (csr.get("status") or {}).get("certificate") else None

        csr = await _eventually(issued, what="certificate")
    finally:
        await boot.close()
    approved = _conds(csr)["Approved"]
    assert approved["status"] == "True" and approved["reason"] == "AutoApproved"
    assert approved["message"] == "Auto approving kubelet client certificate after SubjectAccessReview."
    cert = x509.load_pem_x509_certificate(base64.b64decode(csr["status"]["certificate"]))
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == f"system:node:{node}"
    assert [a.value for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)] == ["system:nodes"]
    assert pki.verify_chain(cert, _ca(cluster).cert)
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == \
        [ExtendedKeyUsageOID.CLIENT_AUTH]
    life = cert.not_valid_after_utc - datetime.now(UTC)
    assert timedelta(minutes=55) < life <= timedelta(hours=1)

    # the issued certificate works, and the node may renew it itself (selfnodeclient)
    nodec = _pair_client(cluster, tmp_path, pki.KeyPair(cert), key=key)
    try:
        pem2, _ = _csr_pem(f"system:node:{node}", ["system:nodes"], key=key)
        name2 = _uniq("renew")
        created2 = await nodec.create(CSR_PATH, _csr_body(name2, pem2, "kubernetes.io/kube-apiserver-client-kubelet",
                                                          ["digital signature", "key encipherment", "client auth"]))
        assert created2["spec"]["username"] == f"system:node:{node}"

        async def renewed() -> Obj | None:
            c = await nodec.get(f"{CSR_PATH}/{name2}")
            return c if (c.get("status") or {}).get("certificate") else None

        c2 = await _eventually(renewed, what="renewed certificate")
        assert _conds(c2)["Approved"]["message"].startswith("Auto approving self kubelet client certificate")
        cert2 = x509.load_pem_x509_certificate(base64.b64decode(c2["status"]["certificate"]))
        # no expirationSeconds: the default (one year) applies
        assert cert2.not_valid_after_utc - datetime.now(UTC) > timedelta(days=360)
    finally:
        await nodec.close()


async def test_node_cannot_get_client_cert_for_other_node(
        cluster: Cluster, admin: APIClient, csr_controllers: Any, tmp_path: Path) -> None:
    a = _uniq("a")
    nodec = _node_client(cluster, tmp_path, a)
    try:
        pem, _ = _csr_pem("system:node:other", ["system:nodes"])
        bad = _uniq("steal")
        await nodec.create(CSR_PATH, _csr_body(bad, pem, "kubernetes.io/kube-apiserver-client-kubelet",
                                               ["digital signature", "client auth"]))
        # wrong organization / extra SANs are not kubelet client requests either
        pem_o, _ = _csr_pem(f"system:node:{a}", ["system:nodes", "system:masters"])
        bad_o = _uniq("org")
        await nodec.create(CSR_PATH, _csr_body(bad_o, pem_o, "kubernetes.io/kube-apiserver-client-kubelet",
                                               ["digital signature", "client auth"]))
        # a legitimate self-renewal created afterwards: once it is issued, the earlier ones have been handled
        pem_ok, _ = _csr_pem(f"system:node:{a}", ["system:nodes"])
        ok = _uniq("self")
        await nodec.create(CSR_PATH, _csr_body(ok, pem_ok, "kubernetes.io/kube-apiserver-client-kubelet",
                                               ["digital signature", "client auth"]))

        async def issued() -> bool:
            return bool(((await _get_csr(admin, ok)).get("status") or {}).get("certificate"))

        await _eventually(issued, what="control CSR issued")
        await asyncio.sleep(0.5)
        for n in (bad, bad_o):
            csr = await _get_csr(admin, n)
            assert _conds(csr) == {}, csr.get("status")
            assert not (csr.get("status") or {}).get("certificate")
    finally:
        await nodec.close()


async def _make_node(admin: APIClient, name: str, addresses: list[tuple[str, str]],
                     ready: str | None = "True", heartbeat: str | None = None) -> Obj:
    await admin.create("/api/v1/nodes", {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}})
    st: Obj = {"addresses": [{"type": t, "address": a} for t, a in addresses]}
    if ready is not None:
        hb = heartbeat or datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        st["conditions"] = [{"type": "Ready", "status": ready, "reason": "KubeletReady",
                             "message": "kubelet is posting ready status", "lastHeartbeatTime": hb,
                             "lastTransitionTime": hb}]
    out: Obj = await update_retrying(admin, f"/api/v1/nodes/{name}/status", lambda n: n.__setitem__("status", st))
    return out


async def test_serving_csr_for_foreign_san_denied_own_sans_issued(
        cluster: Cluster, admin: APIClient, csr_controllers: Any, tmp_path: Path) -> None:
    a = _uniq("srv")
    await _make_node(admin, a, [("Hostname", a), ("InternalIP", "10.1.2.3"), ("InternalDNS", f"{a}.internal")])
    nodec = _node_client(cluster, tmp_path, a)
    usages = ["digital signature", "server auth"]
    try:
        pem, _ = _csr_pem(f"system:node:{a}", ["system:nodes"], dns=[a], ips=["10.1.2.3", "10.9.9.9"])
        bad = _uniq("serving-bad")
        await nodec.create(CSR_PATH, _csr_body(bad, pem, "kubernetes.io/kubelet-serving", usages))

        async def denied() -> Obj | None:
            return _conds(await _get_csr(admin, bad)).get("Denied")

        cond = await _eventually(denied, what="serving CSR denied")
        assert cond["status"] == "True"
        assert "10.9.9.9" in cond["message"] and a in cond["message"]
        await asyncio.sleep(0.5)
        assert not ((await _get_csr(admin, bad)).get("status") or {}).get("certificate")

        # another node's name as CN is denied as well
        pem_cn, _ = _csr_pem("system:node:someone-else", ["system:nodes"], ips=["10.1.2.3"])
        bad_cn = _uniq("serving-cn")
        await nodec.create(CSR_PATH, _csr_body(bad_cn, pem_cn, "kubernetes.io/kubelet-serving", usages))
        cond = await _eventually(lambda: _denied(admin, bad_cn), what="foreign-CN serving CSR denied")
        assert "someone-else" in cond["message"]

        pem_ok, _ = _csr_pem(f"system:node:{a}", ["system:nodes"], dns=[a, f"{a}.internal"], ips=["10.1.2.3"])
        ok = _uniq("serving-ok")
        await nodec.create(CSR_PATH, _csr_body(ok, pem_ok, "kubernetes.io/kubelet-serving",
                                               ["digital signature", "key encipherment", "server auth"]))

        async def issued() -> Obj | None:
            c = await _get_csr(admin, ok)
            return c if (c.get("status") or {}).get("certificate") else None

        csr = await _eventually(issued, what="serving certificate")
        assert "Approved" in _conds(csr)
        cert = x509.load_pem_x509_certificate(base64.b64decode(csr["status"]["certificate"]))
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert set(san.get_values_for_type(x509.DNSName)) == {a, f"{a}.internal"}
        assert [str(i) for i in san.get_values_for_type(x509.IPAddress)] == ["10.1.2.3"]
        assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == \
            [ExtendedKeyUsageOID.SERVER_AUTH]
    finally:
        await nodec.close()


async def _denied(admin: APIClient, name: str) -> Obj | None:
    return _conds(await _get_csr(admin, name)).get("Denied")


async def _approve(admin: APIClient, name: str) -> None:
    csr = await _get_csr(admin, name)
    csr.setdefault("status", {})["conditions"] = [{"type": "Approved", "status": "True", "reason": "Test",
                                                   "message": "approved by test"}]
    await admin.update(f"{CSR_PATH}/{name}/approval", csr)


async def test_apiserver_client_csr_for_system_masters_never_issued(
        cluster: Cluster, admin: APIClient, csr_controllers: Any) -> None:
    usages = ["digital signature", "client auth"]
    pem, _ = _csr_pem("mallory", ["system:masters"])
    bad = _uniq("masters")
    try:
        await admin.create(CSR_PATH, _csr_body(bad, pem, "kubernetes.io/kube-apiserver-client", usages))
    except StatusError as err:  # an apiserver enforcing CertificateSubjectRestriction refuses it at once: fine
        assert err.code in (400, 403, 422)
        return
    await _approve(admin, bad)
    pem_ok, _ = _csr_pem("alice", ["devs"])
    ok = _uniq("alice")
    await admin.create(CSR_PATH, _csr_body(ok, pem_ok, "kubernetes.io/kube-apiserver-client", usages, 600))
    await _approve(admin, ok)

    async def ok_issued() -> Obj | None:
        c = await _get_csr(admin, ok)
        return c if (c.get("status") or {}).get("certificate") else None

    c = await _eventually(ok_issued, what="ordinary apiserver-client certificate")
    cert = x509.load_pem_x509_certificate(base64.b64decode(c["status"]["certificate"]))
    life = cert.not_valid_after_utc - datetime.now(UTC)
    assert timedelta(minutes=9) < life <= timedelta(minutes=10)

    async def failed() -> Obj | None:
        return _conds(await _get_csr(admin, bad)).get("Failed")

    cond = await _eventually(failed, what="Failed condition")
    assert cond["reason"] == "SignerValidationFailure" and "system:masters" in cond["message"]
    await asyncio.sleep(0.5)
    assert not ((await _get_csr(admin, bad)).get("status") or {}).get("certificate")


class _RecordingClient:
    """Stands in for APIClient: records writes (the control plane's own signer would race a live test)."""

    def __init__(self) -> None:
        self.updates: list[tuple[str, Obj]] = []

    async def update(self, path: str, body: Obj) -> Obj:
        self.updates.append((path, body))
        return body

    async def get(self, path: str) -> Obj:
        raise AssertionError(f"unexpected GET {path}")


async def test_signer_caps_duration(cluster: Cluster) -> None:
    rec = _RecordingClient()
    signer = CSRSigner(cast(APIClient, rec), _ca(cluster), max_duration_s=3600)
    assert signer.duration_for({"spec": {"expirationSeconds": 10}}) == 600
    assert signer.duration_for({"spec": {"expirationSeconds": 86400}}) == 3600
    assert signer.duration_for({"spec": {}}) == 3600
    pem, _ = _csr_pem("bob", ["devs"])
    csr = _csr_body("cap", pem, "kubernetes.io/kube-apiserver-client", ["client auth"], 86400)
    csr["metadata"]["uid"] = "u1"
    csr["status"] = {"conditions": [{"type": "Approved", "status": "True", "reason": "Test", "message": ""}]}
    await signer.handle(csr)
    [(path, body)] = rec.updates
    assert path == f"{CSR_PATH}/cap/status"
    cert = x509.load_pem_x509_certificate(base64.b64decode(body["status"]["certificate"]))
    assert timedelta(minutes=59) < cert.not_valid_after_utc - datetime.now(UTC) <= timedelta(hours=1)
    # denied, unapproved or already-issued requests are left alone
    for st in ({"conditions": [{"type": "Denied", "status": "True"}]}, {},
               {"conditions": csr["status"]["conditions"], "certificate": "eA=="}):
        await signer.handle(dict(csr, status=st))
    assert len(rec.updates) == 1


# ------------------------------------------------------------------------------------------------ node lifecycle


def _taints(node: Obj) -> set[tuple[str, str]]:
    return {(t["key"], t["effect"]) for t in (node.get("spec") or {}).get("taints") or []}


async def test_stale_node_becomes_unknown_and_tainted_then_recovers(admin: APIClient, cm: APIClient) -> None:
    old = (datetime.now(UTC) - timedelta(minutes=10)).strftime("%Y-%m-%dT%H:%M:%SZ")
    stale, notready = _uniq("stale"), _uniq("notready")
    await _make_node(admin, stale, [("InternalIP", "10.0.0.7")], heartbeat=old)
    await _make_node(admin, notready, [("InternalIP", "10.0.0.8")], ready="False")
    lease_path = "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases"
    await admin.create(lease_path, {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                                    "metadata": {"name": stale},
                                    "spec": {"holderIdentity": stale, "leaseDurationSeconds": 40,
                                             "renewTime": old.replace("Z", ".000000Z")}})
    # the not-ready node's kubelet is alive (renews its lease) but reports Ready=False
    await admin.create(lease_path, {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                                    "metadata": {"name": notready}, "spec": {"holderIdentity": notready}})
    renewing = {notready}

    async def renew() -> None:
        while True:
            for name in list(renewing):
                with contextlib.suppress(StatusError):
                    lease = await admin.get(f"{lease_path}/{name}")
                    lease["spec"]["renewTime"] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
                    await admin.update(f"{lease_path}/{name}", lease)
            await asyncio.sleep(0.3)

    renewer = asyncio.create_task(renew())
    ctl = NodeLifecycle(cm, grace_s=2, poll_s=0.5, only=lambda n: n in (stale, notready))
    ctl.start()
    try:
        async def unknown() -> Obj | None:
            n = await admin.get(f"/api/v1/nodes/{stale}")
            conds = {c["type"]: c for c in n["status"].get("conditions") or []}
            if conds.get("Ready", {}).get("status") == "Unknown" and \
                    {(UNREACHABLE, "NoSchedule"), (UNREACHABLE, "NoExecute")} <= _taints(n):
                return n
            return None

        n = await _eventually(unknown, what="stale node Unknown + unreachable taints")
        conds = {c["type"]: c for c in n["status"]["conditions"]}
        for t in ("Ready", "MemoryPressure", "DiskPressure", "PIDPressure"):
            assert conds[t]["status"] == "Unknown"
            assert conds[t]["reason"] == "NodeStatusUnknown"
            assert conds[t]["message"] == "Kubelet stopped posting node status."
        assert conds["Ready"]["lastHeartbeatTime"] == old
        assert not any(k == NOT_READY for k, _ in _taints(n))

        async def not_ready_tainted() -> bool:
            n = await admin.get(f"/api/v1/nodes/{notready}")
            return _taints(n) == {(NOT_READY, "NoSchedule"), (NOT_READY, "NoExecute")}

        await _eventually(not_ready_tainted, what="not-ready taints")
        await asyncio.sleep(2.5)  # past grace: a live lease keeps it not-ready, not unreachable
        assert await not_ready_tainted()

        # the kubelet comes back: renews its lease and posts Ready=True -> taints go away and stay away
        renewing.add(stale)
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        conds = [{"type": t, "status": "True" if t == "Ready" else "False",
                  "reason": "KubeletReady" if t == "Ready" else "Fine", "message": "ok",
                  "lastHeartbeatTime": now, "lastTransitionTime": now}
                 for t in ("Ready", "MemoryPressure", "DiskPressure", "PIDPressure")]
        await update_retrying(admin, f"/api/v1/nodes/{stale}/status",
                              lambda n: n["status"].__setitem__("conditions", conds))

        async def untainted() -> bool:
            return not _taints(await admin.get(f"/api/v1/nodes/{stale}"))

        await _eventually(untainted, what="taints removed")
        await asyncio.sleep(3)  # longer than grace: the renewed lease keeps it healthy
        n = await admin.get(f"/api/v1/nodes/{stale}")
        assert not _taints(n)
        assert {c["type"]: c for c in n["status"]["conditions"]}["Ready"]["status"] == "True"
    finally:
        renewer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await renewer
        await ctl.close()
        for n in (stale, notready):
            with contextlib.suppress(StatusError):
                await admin.delete(f"/api/v1/nodes/{n}")
            with contextlib.suppress(StatusError):
                await admin.delete(f"{lease_path}/{n}")
