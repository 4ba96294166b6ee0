"""RequestInfo: path + method -> attributes, as upstream's RequestInfoFactory."""

from __future__ import annotations

import pytest

from kplane.apiserver.request import parse


@pytest.mark.parametrize(
    ("method", "path", "query", "expect"),
    [
        ("GET", "/api/v1/pods", {}, ("list", "", "", "pods", "", "")),
        ("GET", "/api/v1/pods", {"watch": "true"}, ("watch", "", "", "pods", "", "")),
        ("GET", "/api/v1/pods", {"watch": "false"}, ("list", "", "", "pods", "", "")),
        ("GET", "/api/v1/watch/namespaces/ns/pods", {}, ("watch", "", "ns", "pods", "", "")),
        ("GET", "/api/v1/namespaces/ns/pods/p", {}, ("get", "", "ns", "pods", "p", "")),
        ("POST", "/api/v1/namespaces/ns/pods/p/exec", {}, ("create", "", "ns", "pods", "p", "exec")),
        ("DELETE", "/api/v1/namespaces/ns/pods", {}, ("deletecollection", "", "ns", "pods", "", "")),
        ("GET", "/api/v1/namespaces/ns", {}, ("get", "", "ns", "namespaces", "ns", "")),
        ("PUT", "/api/v1/namespaces/ns/finalize", {}, ("update", "", "ns", "namespaces", "ns", "finalize")),
        ("GET", "/api/v1/namespaces", {}, ("list", "", "", "namespaces", "", "")),
        ("PATCH", "/apis/rbac.authorization.k8s.io/v1/clusterroles/x", {}, (
            "patch", "rbac.authorization.k8s.io", "", "clusterroles", "x", "")),
        ("GET", "/api/v1/nodes/n1/proxy/metrics/x", {}, ("get", "", "", "nodes", "n1", "proxy")),
    ],
)
def test_resource_requests(method: str, path: str, query: dict[str, str], expect: tuple[str, ...]) -> None:
    info = parse(method, path, query)
    assert info.resource_request
    assert (info.verb, info.api_group, info.namespace, info.resource, info.name, info.subresource) == expect


def test_non_resource_requests() -> None:
    for path in ("/version", "/healthz", "/api", "/apis", "/apis/rbac.authorization.k8s.io", "/openapi/v3", "/"):
        info = parse("GET", path, {})
        assert not info.resource_request and info.verb == "get"


def test_field_selector_name_is_for_authorization_only() -> None:
    info = parse("GET", "/api/v1/namespaces/ns/secrets", {"fieldSelector": "metadata.name=s1"})
    assert info.verb == "list" and info.name == "" and info.authz_name == "s1"


def test_traversal_segments_are_invalid() -> None:
    for path in ("/api/v1/namespaces/ns/pods/../secrets", "/api/v1/namespaces/ns//pods", "/api/v1/./pods"):
        assert parse("GET", path, {}).resource == "<invalid>"


def test_proxy_rest_path() -> None:
    info = parse("GET", "/api/v1/namespaces/ns/pods/https:p:8443/proxy/a/b", {})
    assert info.name == "https:p:8443" and info.subresource == "proxy" and info.rest == "/a/b"
