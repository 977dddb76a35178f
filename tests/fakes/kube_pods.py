"""Pods as the Kubernetes API server and a node's kubelet serve them, on loopback.

One :class:`PodTable` holds the cluster's pods (v1 Pod JSON with the fields a real API
server fills in: UID, ``spec.serviceAccountName``, ``spec.nodeName``, ``status.phase``,
container statuses with ``containerd://`` IDs). Two servers read it:

* :class:`FakePodsApi`, the API server's pods: ``GET /api/v1/namespaces/<ns>/pods/<name>``
  (404 ``metav1.Status`` when absent) and ``GET /api/v1/pods`` with an optional
  ``fieldSelector=spec.nodeName=<node>`` (the only field selector the CA sends; any other
  is refused 400 as a real server refuses an unsupported field);
* :class:`FakeKubelet`, one node's kubelet on its authenticated port: ``GET /pods`` over
  HTTPS (a throw-away CA, written to ``ca_file``) answering that node's pods as a
  ``PodList``, to callers presenting ``Authorization: Bearer <expected_bearer>``.

Both count requests (``requests``), can be made to fail (``down``: 503), and answer
pods deleted from the table as gone from the next request on, as the real ones do.
"""

from __future__ import annotations

import copy
import ssl
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import web

from tests.fakes.loopback import LoopbackApp, serving_tls

Obj = dict[str, Any]


def _status(code: int, reason: str, message: str) -> web.Response:
    body = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    return web.json_response(body, status=code)


class PodTable:
    """The cluster's pods, keyed by (namespace, name)."""

    def __init__(self) -> None:
        self.pods: dict[tuple[str, str], Obj] = {}
        self._version = 0

    def add(
        self,
        namespace: str,
        name: str,
        *,
        service_account: str = "default",
        node: str | None = "node-a",
        phase: str = "Running",
        uid: str | None = None,
        containers: int = 1,
    ) -> Obj:
        """Create (or replace, with a new UID) a pod; returns its object."""
        self._version += 1
        pod_uid = uid or str(uuid.uuid4())
        statuses = [
            {
                "name": f"c{i}",
                "containerID": f"containerd://{uuid.uuid4().hex}{uuid.uuid4().hex}",
                "ready": phase == "Running",
            }
            for i in range(containers)
        ]
        obj: Obj = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "uid": pod_uid,
                "resourceVersion": str(self._version),
                "creationTimestamp": _now(),
            },
            "spec": {
                "serviceAccountName": service_account,
                "containers": [{"name": f"c{i}", "image": "app"} for i in range(containers)],
            },
            "status": {"phase": phase, "containerStatuses": statuses},
        }
        if node is not None:
            obj["spec"]["nodeName"] = node
        self.pods[(namespace, name)] = obj
        return obj

    def delete(self, namespace: str, name: str) -> None:
        del self.pods[(namespace, name)]

    def set_phase(self, namespace: str, name: str, phase: str) -> None:
        self.pods[(namespace, name)]["status"]["phase"] = phase

    def uid(self, namespace: str, name: str) -> str:
        return str(self.pods[(namespace, name)]["metadata"]["uid"])

    def container_id(self, namespace: str, name: str, index: int = 0) -> str:
        """The runtime's container ID (64 hex digits, without ``containerd://``)."""
        status = self.pods[(namespace, name)]["status"]["containerStatuses"][index]
        return str(status["containerID"]).split("://", 1)[1]

    def on_node(self, node: str) -> list[Obj]:
        return [copy.deepcopy(p) for p in self.pods.values() if p["spec"].get("nodeName") == node]

    def pod_list(self, items: list[Obj]) -> Obj:
        return {
            "kind": "PodList",
            "apiVersion": "v1",
            "metadata": {"resourceVersion": str(self._version)},
            "items": items,
        }


class _Server(LoopbackApp):
    """A fake with a bearer check, ``down`` and ``requests``."""

    def __init__(self, expected_bearer: str | None) -> None:
        super().__init__()
        self.expected_bearer = expected_bearer
        self.requests: list[str] = []
        self.down = False

    def routes(self, app: web.Application) -> None:
        raise NotImplementedError

    def build(self) -> web.Application:
        app = web.Application(middlewares=[self._gate])
        self.routes(app)
        return app

    @web.middleware
    async def _gate(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.requests.append(request.path_qs)
        if self.down:
            return _status(503, "ServiceUnavailable", "the fake server is down")
        if (
            self.expected_bearer is not None
            and request.headers.get("Authorization") != f"Bearer {self.expected_bearer}"
        ):
            return _status(401, "Unauthorized", "Unauthorized")
        response: web.StreamResponse = await handler(request)
        return response


class FakePodsApi(_Server):
    """The API server's pod endpoints over plain HTTP; see the module docstring."""

    def __init__(self, table: PodTable, *, expected_bearer: str | None = "meshca-pods") -> None:
        super().__init__(expected_bearer)
        self.table = table

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/api/v1/namespaces/{ns}/pods/{name}", self._get)
        app.router.add_get("/api/v1/pods", self._list)

    async def _get(self, request: web.Request) -> web.Response:
        key = (request.match_info["ns"], request.match_info["name"])
        pod = self.table.pods.get(key)
        if pod is None:
            return _status(404, "NotFound", f'pods "{key[1]}" not found')
        return web.json_response(copy.deepcopy(pod))

    async def _list(self, request: web.Request) -> web.Response:
        selector = request.query.get("fieldSelector", "")
        if not selector:
            items = [copy.deepcopy(p) for p in self.table.pods.values()]
        elif selector.startswith("spec.nodeName="):
            items = self.table.on_node(selector.split("=", 1)[1])
        else:
            return _status(400, "BadRequest", f'field label not supported: "{selector}"')
        return web.json_response(self.table.pod_list(items))


class FakeKubelet(_Server):
    """One node's kubelet ``/pods`` over HTTPS; its CA certificate is in ``ca_file``."""

    def __init__(
        self,
        table: PodTable,
        node: str,
        tls_dir: Path,
        *,
        expected_bearer: str | None = "meshca-agent-token",
    ) -> None:
        super().__init__(expected_bearer)
        self.table = table
        self.node = node
        self._tls_dir = tls_dir
        self.ca_file = tls_dir / "kubelet-ca.pem"

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/pods", self._pods)

    async def _pods(self, request: web.Request) -> web.Response:
        return web.json_response(self.table.pod_list(self.table.on_node(self.node)))

    def ssl_context(self) -> ssl.SSLContext:
        return serving_tls(self._tls_dir, "kubelet", self.ca_file)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
