"""Pod volumes on the node: emptyDir, configMap, secret, downwardAPI, hostPath and projected (with bound
service-account tokens refreshed before they expire).

Files are written atomically; content comes from the apiserver with the node's identity, so the Node authorizer
decides which secrets and configmaps this node may read (only those its pods reference).
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kplane.client import APIClient
from kplane.errors import StatusError

Obj = dict[str, Any]
_SAFE = re.compile(r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$")


class VolumeError(Exception):
    """A volume could not be prepared; the message is shown in the pod's status."""


@dataclass
class TokenFile:
    path: Path
    refresh_at: float  # monotonic-ish wall time (time.time) after which the token must be refreshed


@dataclass
class PodVolumes:
    root: Path
    dirs: dict[str, Path] = field(default_factory=dict)
    tokens: list[tuple[TokenFile, Obj, str]] = field(default_factory=list)  # (file, source, volume)


def _write(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _check_rel(p: str) -> str:
    if not p or p.startswith("/") or ".." in p.split("/") or not _SAFE.match(p):
        raise VolumeError(f"invalid path {p!r} in volume items: must be relative without '..'")
    return p


def _downward_value(pod: Obj, ref: Obj) -> str:
    fp = ref.get("fieldPath", "")
    md = pod.get("metadata", {})
    if fp == "metadata.namespace":
        return str(md.get("namespace", ""))
    if fp == "metadata.name":
        return str(md.get("name", ""))
    if fp == "metadata.uid":
        return str(md.get("uid", ""))
    if fp in ("metadata.labels", "metadata.annotations"):
        d = md.get(fp.split(".")[1]) or {}
        return "\n".join(f'{k}="{v}"' for k, v in sorted(d.items()))
    m = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", fp)
    if m:
        return str((md.get(m.group(1)) or {}).get(m.group(2), ""))
    if fp == "spec.nodeName":
        return str(pod.get("spec", {}).get("nodeName", ""))
    if fp == "spec.serviceAccountName":
        return str(pod.get("spec", {}).get("serviceAccountName", ""))
    if fp in ("status.podIP", "status.hostIP"):
        return str(pod.get("status", {}).get(fp.split(".")[1], ""))
    raise VolumeError(f"unsupported fieldPath {fp!r}")


class VolumeManager:
    def __init__(self, client: APIClient, root: Path) -> None:
        self.client = client
        self.root = root

    def pod_dir(self, uid: str) -> Path:
        if not re.fullmatch(r"[A-Za-z0-9-]+", uid):
            raise VolumeError(f"invalid pod uid {uid!r}")
        return self.root / uid / "volumes"

    async def prepare(self, pod: Obj) -> PodVolumes:
        uid = pod["metadata"]["uid"]
        pv = PodVolumes(self.pod_dir(uid))
        pv.root.mkdir(parents=True, exist_ok=True, mode=0o750)
        for vol in pod.get("spec", {}).get("volumes") or []:
            name = vol.get("name", "")
            if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name):
                raise VolumeError(f"invalid volume name {name!r}")
            if "hostPath" in vol:
                pv.dirs[name] = Path(vol["hostPath"].get("path", "/"))
                continue
            d = pv.root / name
            d.mkdir(exist_ok=True, mode=0o777 if "emptyDir" in vol else 0o755)
            pv.dirs[name] = d
            if "emptyDir" in vol:
                continue
            if "configMap" in vol:
                await self._configmap(pod, vol["configMap"], d)
            elif "secret" in vol:
                await self._secret(pod, vol["secret"], d)
            elif "downwardAPI" in vol:
                self._downward(pod, vol["downwardAPI"], d)
            elif "projected" in vol:
                proj = vol["projected"]
                mode = int(proj.get("defaultMode", 0o644))
                for src in proj.get("sources") or []:
                    if "serviceAccountToken" in src:
                        tf = await self._token(pod, src["serviceAccountToken"], d, mode)
                        pv.tokens.append((tf, src["serviceAccountToken"], name))
                    elif "configMap" in src:
                        await self._configmap(pod, {**src["configMap"], "defaultMode": mode}, d)
                    elif "secret" in src:
                        await self._secret(pod, {**src["secret"], "defaultMode": mode}, d)
                    elif "downwardAPI" in src:
                        self._downward(pod, {**src["downwardAPI"], "defaultMode": mode}, d)
            else:
                raise VolumeError(f"volume {name!r}: this volume type is not supported by kplane")
        return pv

    async def refresh_tokens(self, pod: Obj, pv: PodVolumes) -> None:
        now = time.time()
        for i, (tf, src, _name) in enumerate(pv.tokens):
            if now >= tf.refresh_at:
                mode = tf.path.stat().st_mode & 0o777 if tf.path.exists() else 0o644
                pv.tokens[i] = (await self._token(pod, src, tf.path.parent, mode), src, _name)

    async def _get(self, path: str, optional: bool, what: str) -> Obj | None:
        try:
            return await self.client.get(path)
        except StatusError as err:
            if err.code == 404 and optional:
                return None
            raise VolumeError(f"{what}: {err.message}") from err

    def _items(self, data: dict[str, bytes], spec: Obj, d: Path, what: str) -> None:
        default_mode = int(spec.get("defaultMode", 0o644))
        items = spec.get("items")
        if items:
            for it in items:
                key = it.get("key")
                if key not in data:
                    if spec.get("optional"):
                        continue
                    raise VolumeError(f"{what}: key {key!r} not found")
                _write(d / _check_rel(str(it.get("path", key))), data[key], int(it.get("mode", default_mode)))
        else:
            for key, val in data.items():
                _write(d / _check_rel(key), val, default_mode)

    async def _configmap(self, pod: Obj, spec: Obj, d: Path) -> None:
        ns, name = pod["metadata"]["namespace"], spec.get("name", "")
        cm = await self._get(f"/api/v1/namespaces/{ns}/configmaps/{name}", bool(spec.get("optional")),
                             f'configmap "{name}"')
        if cm is None:
            return
        data = {k: str(v).encode() for k, v in (cm.get("data") or {}).items()}
        data.update({k: base64.b64decode(v) for k, v in (cm.get("binaryData") or {}).items()})
        self._items(data, spec, d, f'configmap "{name}"')

    async def _secret(self, pod: Obj, spec: Obj, d: Path) -> None:
        ns = pod["metadata"]["namespace"]
        name = spec.get("secretName") or spec.get("name", "")
        sec = await self._get(f"/api/v1/namespaces/{ns}/secrets/{name}", bool(spec.get("optional")),
                              f'secret "{name}"')
        if sec is None:
            return
        data = {k: base64.b64decode(v) for k, v in (sec.get("data") or {}).items()}
        self._items(data, spec, d, f'secret "{name}"')

    def _downward(self, pod: Obj, spec: Obj, d: Path) -> None:
        mode = int(spec.get("defaultMode", 0o644))
        for it in spec.get("items") or []:
            if "fieldRef" not in it:
                continue
            _write(d / _check_rel(str(it.get("path"))), _downward_value(pod, it["fieldRef"]).encode(),
                   int(it.get("mode", mode)))

    async def _token(self, pod: Obj, src: Obj, d: Path, mode: int) -> TokenFile:
        md, spec = pod["metadata"], pod.get("spec", {})
        sa = spec.get("serviceAccountName", "default")
        exp = int(src.get("expirationSeconds", 3607))
        body: Obj = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                     "spec": {"expirationSeconds": exp,
                              "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": md["name"],
                                                 "uid": md["uid"]}}}
        if src.get("audience"):
            body["spec"]["audiences"] = [src["audience"]]
        try:
            tr = await self.client.create(f"/api/v1/namespaces/{md['namespace']}/serviceaccounts/{sa}/token", body)
        except StatusError as err:
            raise VolumeError(f"service account token for {sa}: {err.message}") from err
        path = d / _check_rel(str(src.get("path", "token")))
        _write(path, tr["status"]["token"].encode(), mode)
        # refresh at 80 % of the lifetime, or after 24 h, whichever is first (the kubelet's rule)
        return TokenFile(path, time.time() + min(exp * 0.8, 24 * 3600))

    def cleanup(self, uid: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(self.root / uid)
