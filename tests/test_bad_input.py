"""Bad input at the apiserver: every refusal is a Status body with the right code, and the server keeps serving."""

from __future__ import annotations

import json
import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
import urllib3

from kplane import pki
from tests.cluster import Cluster

urllib3.disable_warnings()


def client_files(cluster: Cluster, tmp: Path, name: str, pair: pki.KeyPair) -> tuple[str, str]:
    crt, key = tmp / f"{name}.crt", tmp / f"{name}.key"
    pki.save_pair(pair, crt, key)
    return str(crt), str(key)


def call(cluster: Cluster, method: str, path: str, *, cert: tuple[str, str] | None = None,
         token: str | None = None, **kw: Any) -> requests.Response:
    headers = kw.pop("headers", {})
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return requests.request(method, cluster.url + path, cert=cert, verify=str(cluster.pki / "ca.crt"),
                            headers=headers, timeout=10, **kw)


@pytest.fixture(scope="module")
def admin(cluster: Cluster) -> tuple[str, str]:
    return str(cluster.pki / "admin.crt"), str(cluster.pki / "admin.key")


def assert_status(r: requests.Response, code: int, reason: str | None = None) -> dict[str, Any]:
    assert r.status_code == code, r.text
    body = r.json()
    assert body["kind"] == "Status" and body["code"] == code and body["status"] == "Failure"
    if reason:
        assert body["reason"] == reason
    return body  # type: ignore[no-any-return]


def still_serving(cluster: Cluster, admin: tuple[str, str]) -> None:
    assert call(cluster, "GET", "/api/v1/namespaces/default", cert=admin).status_code == 200


def test_anonymous_sees_only_health_and_version(cluster: Cluster) -> None:
    assert call(cluster, "GET", "/healthz").text == "ok"
    assert call(cluster, "GET", "/version").json()["major"] == "1"
    body = assert_status(call(cluster, "GET", "/api/v1/namespaces/default/pods"), 403, "Forbidden")
    assert 'User "system:anonymous" cannot list resource "pods"' in body["message"]
    assert_status(call(cluster, "GET", "/api"), 403)


def test_bad_token_is_401_even_with_anonymous_on(cluster: Cluster, admin: tuple[str, str]) -> None:
    assert_status(call(cluster, "GET", "/version", token="not-a-token"), 401, "Unauthorized")
    assert_status(call(cluster, "GET", "/version", token="qwerty.0123456789abcdef"), 401)  # bootstrap shape, no secret
    assert_status(call(cluster, "GET", "/version", token="a.b.c"), 401)  # JWT shape, garbage
    assert_status(call(cluster, "GET", "/version", headers={"Authorization": "Basic Zm9vOmJhcg=="}), 401)
    still_serving(cluster, admin)


def test_static_token_user_is_forbidden_not_unauthorized(cluster: Cluster) -> None:
    tok = "static-token-alice-0123456789"
    r = call(cluster, "POST", "/apis/authentication.k8s.io/v1/selfsubjectreviews", token=tok,
             json={"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"})
    assert r.status_code == 201
    info = r.json()["status"]["userInfo"]
    assert info["username"] == "alice" and set(info["groups"]) >= {"devs", "qa", "system:authenticated"}
    body = assert_status(call(cluster, "GET", "/api/v1/secrets", token=tok), 403, "Forbidden")
    assert 'User "alice" cannot list resource "secrets"' in body["message"]


def test_expired_client_certificate_is_401(cluster: Cluster, tmp_path: Path, admin: tuple[str, str]) -> None:
    ca = pki.load_pair(cluster.pki / "ca.crt", cluster.pki / "ca.key")
    now = datetime.now(UTC)
    expired = pki.issue(ca, common_name="late", organizations=["system:masters"], client=True,
                        not_before=now - timedelta(days=2), not_after=now - timedelta(days=1))
    body = assert_status(call(cluster, "GET", "/api/v1/pods", cert=client_files(cluster, tmp_path, "late", expired)),
                         401, "Unauthorized")
    assert "expired" in body["message"]
    still_serving(cluster, admin)


def test_client_cert_from_another_ca_is_refused(cluster: Cluster, tmp_path: Path, admin: tuple[str, str]) -> None:
    rogue_ca = pki.new_ca("rogue")
    rogue = pki.issue(rogue_ca, common_name="kplane-admin", organizations=["system:masters"], client=True)
    # TLS 1.3 verifies the client certificate after the client's handshake ends: the refusal is an alert
    # that surfaces as an SSL error or a closed connection, never a response
    with pytest.raises((requests.exceptions.SSLError, requests.exceptions.ConnectionError)):
        call(cluster, "GET", "/api/v1/pods", cert=client_files(cluster, tmp_path, "rogue", rogue))
    still_serving(cluster, admin)


def test_client_that_trusts_another_ca_refuses_the_server(cluster: Cluster, tmp_path: Path) -> None:
    other = tmp_path / "other-ca.crt"
    other.write_bytes(pki.new_ca("other").cert_pem())
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(cluster.url + "/version", verify=str(other), timeout=5)


def test_no_plain_http(cluster: Cluster) -> None:
    with pytest.raises(requests.exceptions.ConnectionError):  # a TLS port: plain HTTP is never served
        requests.get(f"http://127.0.0.1:{cluster.port}/version", timeout=5)


def test_malformed_json(cluster: Cluster, admin: tuple[str, str]) -> None:
    r = call(cluster, "POST", "/api/v1/namespaces/default/configmaps", cert=admin, data=b'{"kind": "ConfigMap",',
             headers={"Content-Type": "application/json"})
    assert_status(r, 400, "BadRequest")
    r = call(cluster, "POST", "/api/v1/namespaces/default/configmaps", cert=admin, data=b"[1,2]",
             headers={"Content-Type": "application/json"})
    assert_status(r, 400)
    r = call(cluster, "POST", "/api/v1/namespaces/default/configmaps", cert=admin, data=b"k8s\x00\xff\xff",
             headers={"Content-Type": "application/vnd.kubernetes.protobuf"})
    assert r.status_code in (400, 415) and r.json()["kind"] == "Status"
    r = call(cluster, "PATCH", "/api/v1/namespaces/default", cert=admin, data=b"{}",
             headers={"Content-Type": "text/x-nonsense"})
    assert_status(r, 415)
    still_serving(cluster, admin)


def test_oversized_body_is_413(cluster: Cluster, admin: tuple[str, str]) -> None:
    big = json.dumps({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "big"},
                      "data": {"k": "x" * (4 * 1024 * 1024)}})
    r = call(cluster, "POST", "/api/v1/namespaces/default/configmaps", cert=admin, data=big,
             headers={"Content-Type": "application/json"})
    body = assert_status(r, 413, "RequestEntityTooLarge")
    assert "limit is" in body["message"]
    still_serving(cluster, admin)


def test_invalid_names_are_422_with_causes(cluster: Cluster, admin: tuple[str, str]) -> None:
    for bad in ("Bad_Name", "-x", "a" * 254, ""):
        r = call(cluster, "POST", "/api/v1/namespaces/default/configmaps", cert=admin,
                 json={"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": bad}})
        body = assert_status(r, 422, "Invalid")
        assert body["details"]["causes"][0]["field"] == "metadata.name"
    r = call(cluster, "POST", "/api/v1/namespaces", cert=admin,
             json={"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "a.b"}})  # labels only
    assert_status(r, 422)
    r = call(cluster, "POST", "/api/v1/namespaces/default/pods", cert=admin,
             json={"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {"containers": []}})
    body = assert_status(r, 422)
    assert body["details"]["causes"][0]["field"] == "spec.containers"


def test_unknown_fields_strict(cluster: Cluster, admin: tuple[str, str]) -> None:
    obj = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "strict", "bogus": 1},
           "data": {"a": "b"}, "extra": True}
    r = call(cluster, "POST", "/api/v1/namespaces/default/configmaps?fieldValidation=Strict", cert=admin, json=obj)
    body = assert_status(r, 400, "BadRequest")
    assert 'unknown field "metadata.bogus"' in body["message"] and 'unknown field "extra"' in body["message"]
    r = call(cluster, "POST", "/api/v1/namespaces/default/configmaps?fieldValidation=Warn", cert=admin, json=obj)
    assert r.status_code == 201 and "unknown field" in r.headers.get("Warning", "")
    call(cluster, "DELETE", "/api/v1/namespaces/default/configmaps/strict", cert=admin)


def test_path_traversal_and_unknown_paths(cluster: Cluster, admin: tuple[str, str]) -> None:
    for path in ("/api/v1/namespaces/default/configmaps/%2e%2e/secrets", "/api/v1/namespaces/default/..%2fsecrets",
                 "/api/v1/nosuchthing", "/apis/nope/v1/things", "/api/v1/namespaces/default/pods/p/nosub"):
        r = call(cluster, "GET", path, cert=admin)
        assert r.status_code == 404, path
        assert r.json()["kind"] == "Status"


def test_not_found_and_wrong_namespace(cluster: Cluster, admin: tuple[str, str]) -> None:
    assert_status(call(cluster, "GET", "/api/v1/namespaces/default/configmaps/none", cert=admin), 404, "NotFound")
    r = call(cluster, "POST", "/api/v1/namespaces/default/configmaps", cert=admin,
             json={"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x", "namespace": "other"}})
    assert_status(r, 400)
    r = call(cluster, "POST", "/api/v1/namespaces/missing-ns/configmaps", cert=admin,
             json={"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}})
    assert_status(r, 404, "NotFound")
    r = call(cluster, "POST", "/api/v1/namespaces/default/configmaps", cert=admin,
             json={"apiVersion": "apps/v1", "kind": "ConfigMap", "metadata": {"name": "x"}})
    assert_status(r, 400)


def test_expired_service_account_token_is_401(cluster: Cluster, admin: tuple[str, str]) -> None:
    sa_key = pki.load_private_key(cluster.pki / "sa.key")
    tokens = pki.ServiceAccountTokens(sa_key)
    sa = call(cluster, "GET", "/api/v1/namespaces/default/serviceaccounts/default", cert=admin).json()
    tokens._clock = lambda: datetime.now(UTC).timestamp() - 7200
    token, _ = tokens.issue_bound("default", "default", sa["metadata"]["uid"],
                                  audiences=["https://kubernetes.default.svc.cluster.local"], expiration_s=600)
    assert_status(call(cluster, "GET", "/version", token=token), 401)
    other = pki.ServiceAccountTokens(pki.new_ca("x").key)  # a key the server does not trust
    forged, _ = other.issue_bound("default", "default", sa["metadata"]["uid"],
                                  audiences=["https://kubernetes.default.svc.cluster.local"], expiration_s=600)
    assert_status(call(cluster, "GET", "/version", token=forged), 401)


def test_watch_with_too_old_resource_version_and_bad_params(cluster: Cluster, admin: tuple[str, str]) -> None:
    r = call(cluster, "GET", "/api/v1/namespaces/default/configmaps?limit=-1", cert=admin)
    assert_status(r, 400)
    r = call(cluster, "GET", "/api/v1/namespaces/default/configmaps?labelSelector=a%20in%20(", cert=admin)
    assert_status(r, 400)
    r = call(cluster, "GET", "/api/v1/namespaces/default/configmaps?fieldSelector=spec.nope%3Dx", cert=admin)
    assert_status(r, 400)
    r = call(cluster, "GET", "/api/v1/namespaces/default/configmaps?watch=true&sendInitialEvents=true", cert=admin)
    assert_status(r, 422, "Invalid")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_tls_1_1_refused(cluster: Cluster) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
        ctx.minimum_version = ssl.TLSVersion.TLSv1_1
    except (ValueError, ssl.SSLError):
        pytest.skip("this OpenSSL cannot even offer TLS 1.1")
    import socket

    with socket.create_connection(("127.0.0.1", cluster.port), timeout=5) as s, pytest.raises(ssl.SSLError):
        ctx.wrap_socket(s)


def test_field_selector_on_name_lists_not_gets(cluster: Cluster, admin: tuple[str, str]) -> None:
    # fieldSelector=metadata.name=x narrows a list (and names the object for authorization); it is never a GET
    r = call(cluster, "GET", "/api/v1/namespaces?fieldSelector=metadata.name%3Ddefault", cert=admin)
    assert r.status_code == 200 and r.json()["kind"] == "NamespaceList"
    assert [i["metadata"]["name"] for i in r.json()["items"]] == ["default"]


def test_watch_list_initial_events_then_bookmark(cluster: Cluster, admin: tuple[str, str]) -> None:
    q = ("watch=true&sendInitialEvents=true&resourceVersionMatch=NotOlderThan&allowWatchBookmarks=true"
         "&timeoutSeconds=1&fieldSelector=metadata.name%3Ddefault")
    r = call(cluster, "GET", f"/api/v1/namespaces?{q}", cert=admin, stream=True)
    lines = [json.loads(x) for x in r.iter_lines() if x]
    assert [e["type"] for e in lines[:2]] == ["ADDED", "BOOKMARK"]
    assert lines[0]["object"]["metadata"]["name"] == "default"
    assert lines[1]["object"]["metadata"]["annotations"] == {"k8s.io/initial-events-end": "true"}

