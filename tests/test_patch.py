from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kplane.apiserver.patch import (
    apply_patch,
    is_primitive_merge,
    json_merge_patch,
    json_patch,
    merge_key,
    strategic_merge_patch,
)
from kplane.errors import StatusError

# ------------------------------------------------------------------------------------------------
# RFC 7386 appendix A

RFC7386 = [
    ({"a": "b"}, {"a": "c"}, {"a": "c"}),
    ({"a": "b"}, {"b": "c"}, {"a": "b", "b": "c"}),
    ({"a": "b"}, {"a": None}, {}),
    ({"a": "b", "b": "c"}, {"a": None}, {"b": "c"}),
    ({"a": ["b"]}, {"a": "c"}, {"a": "c"}),
    ({"a": "c"}, {"a": ["b"]}, {"a": ["b"]}),
    ({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}, {"a": {"b": "d"}}),
    ({"a": [{"b": "c"}]}, {"a": [1]}, {"a": [1]}),
    (["a", "b"], ["c", "d"], ["c", "d"]),
    ({"a": "b"}, ["c"], ["c"]),
    ({"a": "foo"}, None, None),
    ({"a": "foo"}, "bar", "bar"),
    ({"e": None}, {"a": 1}, {"e": None, "a": 1}),
    ([1, 2], {"a": "b", "c": None}, {"a": "b"}),
    ({}, {"a": {"bb": {"ccc": None}}}, {"a": {"bb": {}}}),
]


@pytest.mark.parametrize(("target", "patch", "expected"), RFC7386)
def test_json_merge_patch_rfc7386(target: Any, patch: Any, expected: Any) -> None:
    t0, p0 = copy.deepcopy(target), copy.deepcopy(patch)
    assert json_merge_patch(target, patch) == expected
    assert target == t0 and patch == p0


def test_json_merge_patch_result_does_not_alias_inputs() -> None:
    target = {"a": {"x": [1]}}
    patch = {"b": {"y": [2]}}
    out = json_merge_patch(target, patch)
    out["a"]["x"].append(9)
    out["b"]["y"].append(9)
    assert target == {"a": {"x": [1]}} and patch == {"b": {"y": [2]}}


# ------------------------------------------------------------------------------------------------
# RFC 6902 appendix A

RFC6902_OK = [
    # A.1 add object member
    ({"foo": "bar"}, [{"op": "add", "path": "/baz", "value": "qux"}], {"baz": "qux", "foo": "bar"}),
    # A.2 add array element
    (
        {"foo": ["bar", "baz"]},
        [{"op": "add", "path": "/foo/1", "value": "qux"}],
        {"foo": ["bar", "qux", "baz"]},
    ),
    # A.3 remove object member
    ({"baz": "qux", "foo": "bar"}, [{"op": "remove", "path": "/baz"}], {"foo": "bar"}),
    # A.4 remove array element
    ({"foo": ["bar", "qux", "baz"]}, [{"op": "remove", "path": "/foo/1"}], {"foo": ["bar", "baz"]}),
    # A.5 replace
    (
        {"baz": "qux", "foo": "bar"},
        [{"op": "replace", "path": "/baz", "value": "boo"}],
        {"baz": "boo", "foo": "bar"},
    ),
    # A.6 move value
    (
        {"foo": {"bar": "baz", "waldo": "fred"}, "qux": {"corge": "grault"}},
        [{"op": "move", "from": "/foo/waldo", "path": "/qux/thud"}],
        {"foo": {"bar": "baz"}, "qux": {"corge": "grault", "thud": "fred"}},
    ),
    # A.7 move array element
    (
        {"foo": ["all", "grass", "cows", "eat"]},
        [{"op": "move", "from": "/foo/1", "path": "/foo/3"}],
        {"foo": ["all", "cows", "eat", "grass"]},
    ),
    # A.8 test success
    (
        {"baz": "qux", "foo": ["a", 2, "c"]},
        [{"op": "test", "path": "/baz", "value": "qux"}, {"op": "test", "path": "/foo/1", "value": 2}],
        {"baz": "qux", "foo": ["a", 2, "c"]},
    ),
    # A.10 add nested member object
    (
        {"foo": "bar"},
        [{"op": "add", "path": "/child", "value": {"grandchild": {}}}],
        {"foo": "bar", "child": {"grandchild": {}}},
    ),
    # A.11 ignore unrecognized elements
    (
        {"foo": "bar"},
        [{"op": "add", "path": "/baz", "value": "qux", "xyz": 123}],
        {"foo": "bar", "baz": "qux"},
    ),
    # A.14 ~ escape ordering
    ({"/": 9, "~1": 10}, [{"op": "test", "path": "/~01", "value": 10}], {"/": 9, "~1": 10}),
    ({"/": 9, "~1": 10}, [{"op": "test", "path": "/~1", "value": 9}], {"/": 9, "~1": 10}),
    # A.16 add array value
    (
        {"foo": ["bar"]},
        [{"op": "add", "path": "/foo/-", "value": ["abc", "def"]}],
        {"foo": ["bar", ["abc", "def"]]},
    ),
    # extras: copy, whole-document replace, null values, 1 == 1.0
    ({"a": {"b": 1}}, [{"op": "copy", "from": "/a", "path": "/c"}], {"a": {"b": 1}, "c": {"b": 1}}),
    ({"a": 1}, [{"op": "replace", "path": "", "value": [1]}], [1]),
    ({"a": 1}, [{"op": "add", "path": "/a", "value": None}], {"a": None}),
    ({"a": 1}, [{"op": "test", "path": "/a", "value": 1.0}], {"a": 1}),
    ({"a": [1]}, [{"op": "add", "path": "/a/1", "value": 2}], {"a": [1, 2]}),
    ({"a": 1}, [{"op": "move", "from": "/a", "path": "/a"}], {"a": 1}),
]


@pytest.mark.parametrize(("target", "ops", "expected"), RFC6902_OK)
def test_json_patch_rfc6902(target: Any, ops: Any, expected: Any) -> None:
    t0, o0 = copy.deepcopy(target), copy.deepcopy(ops)
    assert json_patch(target, ops) == expected
    assert target == t0 and ops == o0


RFC6902_ERR = [
    # A.9 test failure
    ({"baz": "qux", "foo": ["a", 2, "c"]}, [{"op": "test", "path": "/baz", "value": "bar"}], 422),
    # A.12 add to nonexistent target
    ({"foo": "bar"}, [{"op": "add", "path": "/baz/bat", "value": "qux"}], 422),
    # A.15 comparing strings and numbers
    ({"/": 9, "~1": 10}, [{"op": "test", "path": "/~01", "value": "10"}], 422),
    # bool is not a number
    ({"a": 1}, [{"op": "test", "path": "/a", "value": True}], 422),
    # remove a missing path / out-of-range index / "-"
    ({"foo": "bar"}, [{"op": "remove", "path": "/baz"}], 422),
    ({"foo": [1]}, [{"op": "remove", "path": "/foo/1"}], 422),
    ({"foo": [1]}, [{"op": "remove", "path": "/foo/-"}], 422),
    ({"foo": [1]}, [{"op": "add", "path": "/foo/2", "value": 0}], 422),
    ({"foo": [1]}, [{"op": "add", "path": "/foo/01", "value": 0}], 422),
    ({"foo": "bar"}, [{"op": "replace", "path": "/nope", "value": 1}], 422),
    ({"foo": "bar"}, [{"op": "copy", "from": "/nope", "path": "/x"}], 422),
    # bad op / malformed operation
    ({"foo": "bar"}, [{"op": "frobnicate", "path": "/foo"}], 400),
    ({"foo": "bar"}, [{"path": "/foo"}], 400),
    ({"foo": "bar"}, [{"op": "add", "path": "/x"}], 400),
    ({"foo": "bar"}, [{"op": "move", "path": "/x"}], 400),
    ({"foo": "bar"}, [{"op": "remove"}], 400),
    ({"foo": "bar"}, ["remove"], 400),
    ({"foo": "bar"}, {"op": "remove", "path": "/foo"}, 400),
    # malformed pointers
    ({"foo": "bar"}, [{"op": "remove", "path": "foo"}], 400),
    ({"foo": "bar"}, [{"op": "add", "path": "/a~2b", "value": 1}], 400),
    ({"foo": "bar"}, [{"op": "add", "path": "/a~", "value": 1}], 400),
    ({"foo": "bar"}, [{"op": "add", "path": 5, "value": 1}], 400),
    # move into own child
    ({"a": {"b": {}}}, [{"op": "move", "from": "/a", "path": "/a/b/c"}], 400),
]


@pytest.mark.parametrize(("target", "ops", "code"), RFC6902_ERR)
def test_json_patch_errors(target: Any, ops: Any, code: int) -> None:
    t0 = copy.deepcopy(target)
    with pytest.raises(StatusError) as exc:
        json_patch(target, ops)
    assert exc.value.code == code
    assert exc.value.message
    assert target == t0


def test_json_patch_is_atomic_and_values_not_aliased() -> None:
    target = {"a": 1}
    value = {"x": [1]}
    ops = [{"op": "add", "path": "/b", "value": value}, {"op": "add", "path": "/b/x/-", "value": 2}]
    out = json_patch(target, ops)
    assert out == {"a": 1, "b": {"x": [1, 2]}}
    assert value == {"x": [1]}
    with pytest.raises(StatusError):
        json_patch(target, [{"op": "remove", "path": "/a"}, {"op": "test", "path": "/a", "value": 1}])
    assert target == {"a": 1}


# ------------------------------------------------------------------------------------------------
# Strategic merge patch


def pod() -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p", "labels": {"app": "x", "tier": "web"}, "finalizers": ["a", "b"]},
        "spec": {
            "containers": [
                {
                    "name": "app",
                    "image": "app:1",
                    "env": [{"name": "A", "value": "1"}],
                    "ports": [{"containerPort": 80, "protocol": "TCP"}],
                },
                {"name": "side", "image": "side:1"},
            ],
            "tolerations": [{"key": "k1", "operator": "Exists"}],
            "volumes": [{"name": "v1", "emptyDir": {}}],
        },
    }


def smp(target: dict[str, Any], patch: dict[str, Any], kind: str) -> dict[str, Any]:
    t0, p0 = copy.deepcopy(target), copy.deepcopy(patch)
    out = strategic_merge_patch(target, patch, kind)
    assert target == t0, "target mutated"
    assert patch == p0, "patch mutated"
    return out


def test_smp_container_image_by_name_keeps_others() -> None:
    out = smp(pod(), {"spec": {"containers": [{"name": "side", "image": "side:2"}]}}, "Pod")
    cs = out["spec"]["containers"]
    assert [c["name"] for c in cs] == ["app", "side"]
    assert cs[0] == pod()["spec"]["containers"][0]
    assert cs[1] == {"name": "side", "image": "side:2"}


def test_smp_workload_template_containers() -> None:
    dep = {"kind": "Deployment", "spec": {"replicas": 1, "template": {"spec": pod()["spec"]}}}
    patch = {"spec": {"template": {"spec": {"containers": [{"name": "app", "image": "app:2"}]}}}}
    out = smp(dep, patch, "Deployment")
    cs = out["spec"]["template"]["spec"]["containers"]
    assert [(c["name"], c["image"]) for c in cs] == [("app", "app:2"), ("side", "side:1")]
    assert cs[0]["env"] == [{"name": "A", "value": "1"}]
    assert out["spec"]["replicas"] == 1


def test_smp_add_env_var_and_port() -> None:
    patch = {
        "spec": {
            "containers": [
                {
                    "name": "app",
                    "env": [{"name": "B", "value": "2"}, {"name": "A", "value": "one"}],
                    "ports": [{"containerPort": 443}],
                }
            ]
        }
    }
    out = smp(pod(), patch, "Pod")
    app = out["spec"]["containers"][0]
    assert app["env"] == [{"name": "A", "value": "one"}, {"name": "B", "value": "2"}]
    assert app["ports"] == [{"containerPort": 80, "protocol": "TCP"}, {"containerPort": 443}]


def test_smp_delete_container() -> None:
    out = smp(pod(), {"spec": {"containers": [{"name": "app", "$patch": "delete"}]}}, "Pod")
    assert [c["name"] for c in out["spec"]["containers"]] == ["side"]


def test_smp_set_element_order() -> None:
    patch = {
        "spec": {
            "$setElementOrder/containers": [{"name": "side"}, {"name": "new"}, {"name": "app"}],
            "containers": [{"name": "new", "image": "new:1"}],
        }
    }
    out = smp(pod(), patch, "Pod")
    assert [c["name"] for c in out["spec"]["containers"]] == ["side", "new", "app"]
    # unlisted elements keep their relative order after the listed ones
    out = smp(pod(), {"spec": {"$setElementOrder/containers": [{"name": "side"}]}}, "Pod")
    assert [c["name"] for c in out["spec"]["containers"]] == ["side", "app"]
    # primitive lists
    out = smp(pod(), {"metadata": {"$setElementOrder/finalizers": ["b", "a"]}}, "Pod")
    assert out["metadata"]["finalizers"] == ["b", "a"]


def test_smp_retain_keys() -> None:
    dep = {"spec": {"strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1}}}}
    patch = {"spec": {"strategy": {"$retainKeys": ["type"], "type": "Recreate"}}}
    out = smp(dep, patch, "Deployment")
    assert out == {"spec": {"strategy": {"type": "Recreate"}}}


def test_smp_null_deletes_key() -> None:
    out = smp(pod(), {"metadata": {"labels": {"tier": None, "new": "y"}}}, "Pod")
    assert out["metadata"]["labels"] == {"app": "x", "new": "y"}
    out = smp(pod(), {"spec": {"volumes": None}}, "Pod")
    assert "volumes" not in out["spec"]


def test_smp_finalizers_merge_and_delete_from_primitive_list() -> None:
    out = smp(pod(), {"metadata": {"finalizers": ["b", "c"]}}, "Pod")
    assert out["metadata"]["finalizers"] == ["a", "b", "c"]
    out = smp(pod(), {"metadata": {"$deleteFromPrimitiveList/finalizers": ["a"]}}, "Pod")
    assert out["metadata"]["finalizers"] == ["b"]
    # finalizers merge for every built-in kind, but not for unknown kinds
    out = smp({"metadata": {"finalizers": ["a"]}}, {"metadata": {"finalizers": ["z"]}}, "ConfigMap")
    assert out["metadata"]["finalizers"] == ["a", "z"]
    out = smp({"metadata": {"finalizers": ["a"]}}, {"metadata": {"finalizers": ["z"]}}, "Widget")
    assert out["metadata"]["finalizers"] == ["z"]


def test_smp_service_ports_by_port() -> None:
    svc = {
        "kind": "Service",
        "spec": {
            "ports": [{"port": 80, "targetPort": 8080, "name": "http"}, {"port": 443, "name": "https"}],
        },
    }
    out = smp(svc, {"spec": {"ports": [{"port": 443, "targetPort": 8443}, {"port": 9000}]}}, "Service")
    assert out["spec"]["ports"] == [
        {"port": 80, "targetPort": 8080, "name": "http"},
        {"port": 443, "name": "https", "targetPort": 8443},
        {"port": 9000},
    ]


def test_smp_replace_directives() -> None:
    # list-level replace
    patch = {"spec": {"containers": [{"name": "only", "image": "o:1"}, {"$patch": "replace"}]}}
    out = smp(pod(), patch, "Pod")
    assert out["spec"]["containers"] == [{"name": "only", "image": "o:1"}]
    # map-level replace
    out = smp(pod(), {"metadata": {"labels": {"$patch": "replace", "only": "me"}}}, "Pod")
    assert out["metadata"]["labels"] == {"only": "me"}
    # map-level delete
    out = smp(pod(), {"metadata": {"labels": {"$patch": "delete"}}}, "Pod")
    assert "labels" not in out["metadata"]


def test_smp_lists_without_key_replace() -> None:
    out = smp(pod(), {"spec": {"tolerations": [{"key": "k2", "operator": "Exists"}]}}, "Pod")
    assert out["spec"]["tolerations"] == [{"key": "k2", "operator": "Exists"}]
    ep = {"subsets": [{"addresses": [{"ip": "1.1.1.1"}]}]}
    out = smp(ep, {"subsets": [{"addresses": [{"ip": "2.2.2.2"}]}]}, "Endpoints")
    assert out["subsets"] == [{"addresses": [{"ip": "2.2.2.2"}]}]


def test_smp_conditions_and_owner_references() -> None:
    node = {
        "status": {
            "conditions": [{"type": "Ready", "status": "False"}, {"type": "DiskPressure", "status": "False"}],
            "addresses": [{"type": "InternalIP", "address": "10.0.0.1"}],
        }
    }
    patch = {
        "status": {
            "conditions": [{"type": "Ready", "status": "True"}],
            "addresses": [{"type": "Hostname", "address": "n1"}],
        }
    }
    out = smp(node, patch, "Node")
    assert out["status"]["conditions"] == [
        {"type": "Ready", "status": "True"},
        {"type": "DiskPressure", "status": "False"},
    ]
    assert len(out["status"]["addresses"]) == 2
    rs = {"metadata": {"ownerReferences": [{"uid": "1", "name": "a"}]}}
    out = smp(rs, {"metadata": {"ownerReferences": [{"uid": "2", "name": "b"}]}}, "ReplicaSet")
    assert [o["uid"] for o in out["metadata"]["ownerReferences"]] == ["1", "2"]


def test_smp_unknown_kind_is_merge_patch_with_directives() -> None:
    obj = {"spec": {"items": [{"name": "a", "v": 1}], "m": {"x": 1, "y": 2}}}
    out = smp(obj, {"spec": {"items": [{"name": "b"}], "m": {"y": None}}}, "Widget")
    assert out == {"spec": {"items": [{"name": "b"}], "m": {"x": 1}}}
    out = smp(obj, {"spec": {"m": {"$patch": "replace", "z": 3}}}, "Widget")
    assert out["spec"]["m"] == {"z": 3}


def test_smp_new_values_are_cleaned_of_directives() -> None:
    out = smp({}, {"metadata": {"labels": {"a": "1", "b": None}}}, "Pod")
    assert out == {"metadata": {"labels": {"a": "1"}}}


def test_smp_errors() -> None:
    with pytest.raises(StatusError) as exc:
        strategic_merge_patch(pod(), {"spec": {"$patch": "bogus"}}, "Pod")
    assert exc.value.code == 400
    with pytest.raises(StatusError) as exc:
        strategic_merge_patch(pod(), {"spec": {"containers": [{"image": "x"}]}}, "Pod")
    assert exc.value.code == 422
    with pytest.raises(StatusError) as exc:
        strategic_merge_patch(pod(), {"spec": {"$retainKeys": "nope"}}, "Pod")
    assert exc.value.code == 400
    with pytest.raises(StatusError) as exc:
        strategic_merge_patch(pod(), ["x"], "Pod")  # type: ignore[arg-type]
    assert exc.value.code == 400


def test_merge_key_table() -> None:
    assert merge_key(("spec", "containers"), "Pod") == "name"
    assert merge_key(("spec", "template", "spec", "containers"), "Deployment") == "name"
    assert merge_key(("spec", "template", "spec", "initContainers", "env"), "StatefulSet") == "name"
    assert merge_key(("spec", "jobTemplate", "spec", "template", "spec", "volumes"), "CronJob") == "name"
    assert merge_key(("spec", "ports"), "Service") == "port"
    assert merge_key(("spec", "containers", "ports"), "Pod") == "containerPort"
    assert merge_key(("spec", "containers", "volumeMounts"), "Pod") == "mountPath"
    assert merge_key(("spec", "tolerations"), "Pod") is None
    assert merge_key(("spec", "ports"), "Pod") is None
    assert merge_key(("status", "conditions"), "Deployment") == "type"
    assert merge_key(("spec", "containers"), "Widget") is None
    assert is_primitive_merge(("metadata", "finalizers"), "Pod")
    assert is_primitive_merge(("spec", "template", "metadata", "finalizers"), "Deployment")
    assert not is_primitive_merge(("spec", "finalizers"), "Pod")


def test_apply_patch_dispatch() -> None:
    t = {"a": {"b": 1}}
    assert apply_patch("application/merge-patch+json", t, {"a": {"c": 2}}, "X") == {"a": {"b": 1, "c": 2}}
    assert apply_patch("application/json-patch+json", t, [{"op": "remove", "path": "/a"}], "X") == {}
    assert apply_patch("application/strategic-merge-patch+json; charset=utf-8", t, {"a": None}, "X") == {}
    with pytest.raises(StatusError) as exc:
        apply_patch("text/plain", t, {}, "X")
    assert exc.value.code == 415


# ------------------------------------------------------------------------------------------------
# Properties

_scalars = st.one_of(
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=5),
)
_json_no_null = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4),
    max_leaves=15,
)
_json = st.recursive(
    st.none() | _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4),
    max_leaves=15,
)
_maps_no_null = st.dictionaries(st.text(max_size=4), _json_no_null, max_size=5)


@given(_maps_no_null)
def test_merge_patch_self_is_identity(x: dict[str, Any]) -> None:
    x0 = copy.deepcopy(x)
    assert json_merge_patch(x, x) == x
    assert x == x0


@given(_json)
def test_json_patch_empty_is_identity(x: Any) -> None:
    x0 = copy.deepcopy(x)
    assert json_patch(x, []) == x
    assert x == x0


@given(_json, _json)
def test_merge_patch_never_mutates(target: Any, patch: Any) -> None:
    t0, p0 = copy.deepcopy(target), copy.deepcopy(patch)
    json_merge_patch(target, patch)
    assert target == t0 and patch == p0


_keys = st.text(max_size=4).filter(lambda k: not k.startswith("$"))
_plain = st.recursive(
    st.none() | _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_keys, inner, max_size=4),
    max_leaves=15,
)


@given(st.dictionaries(_keys, _plain, max_size=5), st.dictionaries(_keys, _plain, max_size=5))
def test_smp_unknown_kind_matches_merge_patch(t: dict[str, Any], p: dict[str, Any]) -> None:
    """Without directives, SMP of an unknown kind is exactly RFC 7386 (for map targets)."""
    t0, p0 = copy.deepcopy(t), copy.deepcopy(p)
    assert strategic_merge_patch(t, p, "Widget") == json_merge_patch(t, p)
    assert t == t0 and p == p0
