"""A small async Kubernetes REST client for the operator's children.

kopf watches RLJobs; creating and patching the children is up to the operator. This client
speaks plain REST over aiohttp (kopf's own dependency) with the credentials kopf's login
helpers find: the pod's service account in a cluster, else $KUBECONFIG / ~/.kube/config.

    async with Kube.connect(settings) as kube:
        current = await kube.get(manifest)               # None when absent
        await kube.create(manifest)
        await kube.merge_patch(manifest, {"spec": {"replicas": 0}})
        await kube.served("serving.knative.dev/v1", "services")  # API discovery
"""

from __future__ import annotations

import logging
from typing import Any

import aiohttp
import kopf

log = logging.getLogger("rollfleet.operator")

# Every kind the operator writes, with its resource (plural) name.
PLURALS = {
    "ConfigMap": "configmaps",
    "Secret": "secrets",
    "Service": "services",  # core/v1 and serving.knative.dev/v1 alike
    "PersistentVolumeClaim": "persistentvolumeclaims",
    "Pod": "pods",
    "Deployment": "deployments",
    "StatefulSet": "statefulsets",
    "NetworkPolicy": "networkpolicies",
    "RayJob": "rayjobs",
    "RLJob": "rljobs",
}


class KubeError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


def collection_path(api_version: str, kind: str, namespace: str) -> str:
    prefix = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    return f"{prefix}/namespaces/{namespace}/{PLURALS[kind]}"


def object_path(manifest: dict[str, Any]) -> str:
    meta = manifest["metadata"]
    base = collection_path(manifest["apiVersion"], manifest["kind"], meta["namespace"])
    return f"{base}/{meta['name']}"


class Kube:
    def __init__(self, info: kopf.ConnectionInfo):
        self.server = info.server.rstrip("/")
        ssl = info.as_ssl_context() if self.server.startswith("https") else False
        self.session = aiohttp.ClientSession(
            headers=info.as_http_headers(),
            connector=aiohttp.TCPConnector(ssl=ssl),
            timeout=aiohttp.ClientTimeout(total=30),
        )

    @classmethod
    def connect(cls, settings: kopf.OperatorSettings) -> Kube:
        """Log in as kopf does: the service account in a pod, else the kubeconfig."""
        login = {"settings": settings, "logger": log}
        info = kopf.login_with_service_account(**login) or kopf.login_with_kubeconfig(**login)
        if info is None:
            raise kopf.PermanentError(
                "no Kubernetes credentials: no service account, no kubeconfig"
            )
        return cls(info)

    async def __aenter__(self) -> Kube:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.session.close()

    async def _request(self, method: str, path: str, **kwargs) -> dict[str, Any] | None:
        async with self.session.request(method, self.server + path, **kwargs) as response:
            if response.status == 404:
                return None
            body = await response.text()
            if response.status >= 400:
                raise KubeError(response.status, body[:500])
            return await response.json(content_type=None) if body else {}

    async def get(self, manifest: dict[str, Any]) -> dict[str, Any] | None:
        return await self._request("GET", object_path(manifest))

    async def list(
        self, api_version: str, kind: str, namespace: str, labels: dict[str, str]
    ) -> list[dict[str, Any]]:
        selector = ",".join(f"{k}={v}" for k, v in labels.items())
        path = collection_path(api_version, kind, namespace)
        found = await self._request("GET", path, params={"labelSelector": selector})
        items = (found or {}).get("items", [])
        # Not every server filters by label (the test emulator does not): filter here too.
        return [
            item
            for item in items
            if all(
                item.get("metadata", {}).get("labels", {}).get(k) == v for k, v in labels.items()
            )
        ]

    async def create(self, manifest: dict[str, Any]) -> dict[str, Any]:
        meta = manifest["metadata"]
        path = collection_path(manifest["apiVersion"], manifest["kind"], meta["namespace"])
        created = await self._request("POST", path, json=manifest)
        if created is None:
            raise KubeError(404, f"{manifest['apiVersion']} {manifest['kind']} is not served")
        return created

    async def merge_patch(self, manifest: dict[str, Any], patch: dict[str, Any]) -> None:
        await self._request(
            "PATCH",
            object_path(manifest),
            json=patch,
            headers={"Content-Type": "application/merge-patch+json"},
        )

    async def served(self, api_version: str, plural: str) -> bool:
        """API discovery: does the cluster serve this resource (e.g. Knative's services)?"""
        found = await self._request("GET", f"/apis/{api_version}")
        if found is None:
            return False
        return any(r.get("name") == plural for r in found.get("resources", []))
