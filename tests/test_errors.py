from kplane.errors import StatusError, conflict, invalid


def test_status_body_shape() -> None:
    err = StatusError(413, "request entity too large")
    body = err.status()
    assert body["kind"] == "Status" and body["apiVersion"] == "v1"
    assert body["status"] == "Failure" and body["code"] == 413
    assert body["reason"] == "RequestEntityTooLarge"


def test_conflict_and_invalid_reasons() -> None:
    assert conflict("configmaps", "a").status()["reason"] == "Conflict"
    err = invalid("ConfigMap", "Bad_Name", [("metadata.name", "FieldValueInvalid", "must be DNS-1123")])
    st = err.status()
    assert st["code"] == 422 and st["reason"] == "Invalid"
    assert st["details"]["causes"][0]["field"] == "metadata.name"
