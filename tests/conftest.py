from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.cluster import Cluster


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    base = tmp_path_factory.mktemp("cluster")
    tokens = base / "tokens.csv"
    tokens.write_text('static-token-alice-0123456789,alice,uid-alice,"devs,qa"\n')
    c = Cluster(base / "data", extra_args=["--token-auth-file", str(tokens)])
    c.start()
    yield c
    c.stop()


@pytest.fixture
def ns(cluster: Cluster, request: pytest.FixtureRequest) -> str:
    name = "t-" + request.node.name.lower().replace("_", "-")[:40].strip("-")
    cluster.kubectl("apply", "-f", "-",
                    input=f'{{"apiVersion":"v1","kind":"Namespace","metadata":{{"name":"{name}"}}}}')
    return name

