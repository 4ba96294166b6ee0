"""The official kubernetes Python client: CRUD and a watch."""

from __future__ import annotations

import threading

import pytest
from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException

from tests.cluster import Cluster


@pytest.fixture(scope="module")
def api(cluster: Cluster) -> client.ApiClient:
    return config.new_client_from_config(config_file=str(cluster.kubeconfig))


def test_crud(api: client.ApiClient) -> None:
    v1 = client.CoreV1Api(api)
    body = client.V1ConfigMap(metadata=client.V1ObjectMeta(name="pyc", labels={"a": "b"}), data={"k": "v"})
    created = v1.create_namespaced_config_map("default", body)
    assert created.metadata.uid and created.metadata.resource_version
    got = v1.read_namespaced_config_map("pyc", "default")
    assert got.data == {"k": "v"}
    got.data["k"] = "w"
    replaced = v1.replace_namespaced_config_map("pyc", "default", got)
    assert int(replaced.metadata.resource_version) > int(created.metadata.resource_version)
    patched = v1.patch_namespaced_config_map("pyc", "default", {"data": {"n": "1"}})
    assert patched.data == {"k": "w", "n": "1"}
    names = [c.metadata.name for c in v1.list_namespaced_config_map("default", label_selector="a=b").items]
    assert names == ["pyc"]
    got.metadata.resource_version = created.metadata.resource_version
    with pytest.raises(ApiException) as err:
        v1.replace_namespaced_config_map("pyc", "default", got)
    assert err.value.status == 409
    v1.delete_namespaced_config_map("pyc", "default")
    with pytest.raises(ApiException) as err:
        v1.read_namespaced_config_map("pyc", "default")
    assert err.value.status == 404


def test_paging(api: client.ApiClient) -> None:
    v1 = client.CoreV1Api(api)
    v1.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name="paging")))
    for i in range(7):
        v1.create_namespaced_config_map("paging", client.V1ConfigMap(metadata=client.V1ObjectMeta(name=f"c{i}")))
    seen: list[str] = []
    cont = None
    while True:
        page = v1.list_namespaced_config_map("paging", limit=3, _continue=cont)
        seen += [c.metadata.name for c in page.items]
        cont = page.metadata._continue
        if not cont:
            break
    assert sorted(n for n in seen if n.startswith("c")) == [f"c{i}" for i in range(7)]
    assert len(seen) == len(set(seen))


def test_watch(api: client.ApiClient) -> None:
    v1 = client.CoreV1Api(api)
    rv = v1.list_namespaced_config_map("default").metadata.resource_version
    events: list[tuple[str, str]] = []
    w = watch.Watch()

    def run() -> None:
        for ev in w.stream(v1.list_namespaced_config_map, "default", resource_version=rv, timeout_seconds=10):
            events.append((ev["type"], ev["object"].metadata.name))
            if ev["type"] == "DELETED":
                w.stop()

    t = threading.Thread(target=run)
    t.start()
    v1.create_namespaced_config_map("default", client.V1ConfigMap(metadata=client.V1ObjectMeta(name="w1")))
    v1.patch_namespaced_config_map("w1", "default", {"data": {"x": "y"}})
    v1.delete_namespaced_config_map("w1", "default")
    t.join(15)
    assert events == [("ADDED", "w1"), ("MODIFIED", "w1"), ("DELETED", "w1")]
