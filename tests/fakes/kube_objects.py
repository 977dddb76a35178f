"""A fake Kubernetes API server for objects: namespaces, ConfigMaps and Leases.

It speaks the wire format the official client expects, for what meshca's bundle
ConfigMap writer uses: list and watch namespaces (``?watch=true``: one JSON event per
line, from ``resourceVersion``, ending after ``timeoutSeconds``); get, create and
replace (PUT) ConfigMaps and coordination.k8s.io/v1 Leases, with optimistic concurrency
(a PUT whose ``metadata.resourceVersion`` is not the current one is 409 Conflict, as is
a POST of a name that exists); errors as ``metav1.Status``; a namespace being deleted
refuses new objects (403, "is being terminated"). Callers must send
``Authorization: Bearer <expected_bearer>``.

Tests act on it directly (:meth:`add_namespace`, :meth:`configmap`, :meth:`lease`) and
through switches: ``down`` (every request 503), ``requests`` (method and path of each).
"""

from __future__ import annotations

import asyncio
import copy
import json
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from tests.fakes.loopback import LoopbackApp

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


class FakeKubeObjects(LoopbackApp):
    """Namespaces, ConfigMaps and Leases on 127.0.0.1 (a port the OS picks)."""

    def __init__(
        self,
        *,
        namespaces: Iterable[str] = ("default", "kube-system"),
        expected_bearer: str | None = "meshca-writer-token",
    ) -> None:
        super().__init__()
        self.expected_bearer = expected_bearer
        self._version = 0
        self.namespaces: dict[str, Obj] = {}
        self.configmaps: dict[tuple[str, str], Obj] = {}
        self.leases: dict[tuple[str, str], Obj] = {}
        self._events: list[tuple[int, str, Obj]] = []  # namespace watch events
        self._changed = asyncio.Condition()
        self.down = False
        self.requests: list[tuple[str, str]] = []
        for name in namespaces:
            self._put_namespace(name)

    # -- lifecycle --------------------------------------------------------------------

    def build(self) -> web.Application:
        app = web.Application(middlewares=[self._gate])
        ns = "/api/v1/namespaces"
        app.router.add_get(ns, self._list_namespaces)
        app.router.add_get(ns + "/{ns}/configmaps/{name}", self._get_configmap)
        app.router.add_post(ns + "/{ns}/configmaps", self._create_configmap)
        app.router.add_put(ns + "/{ns}/configmaps/{name}", self._replace_configmap)
        leases = "/apis/coordination.k8s.io/v1/namespaces/{ns}/leases"
        app.router.add_get(leases + "/{name}", self._get_lease)
        app.router.add_post(leases, self._create_lease)
        app.router.add_put(leases + "/{name}", self._replace_lease)
        return app

    # -- what tests do ----------------------------------------------------------------

    def add_namespace(self, name: str) -> None:
        """Create a namespace (as ``kubectl create namespace`` would); watchers see it."""
        self._put_namespace(name)
        self._wake()

    def terminate_namespace(self, name: str) -> None:
        """Mark a namespace as being deleted: it refuses new objects."""
        self.namespaces[name]["status"] = {"phase": "Terminating"}
        self.namespaces[name]["metadata"]["deletionTimestamp"] = _now()
        self._bump(self.namespaces[name])
        self._events.append((self._version, "MODIFIED", copy.deepcopy(self.namespaces[name])))
        self._wake()

    def configmap(self, namespace: str, name: str) -> Obj | None:
        return self.configmaps.get((namespace, name))

    def delete_configmap(self, namespace: str, name: str) -> None:
        del self.configmaps[(namespace, name)]

    def lease(self, namespace: str, name: str) -> Obj | None:
        return self.leases.get((namespace, name))

    # -- internals --------------------------------------------------------------------

    def _bump(self, obj: Obj) -> None:
        self._version += 1
        obj["metadata"]["resourceVersion"] = str(self._version)

    def _put_namespace(self, name: str) -> None:
        obj: Obj = {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": name, "uid": str(uuid.uuid4()), "creationTimestamp": _now()},
            "spec": {"finalizers": ["kubernetes"]},
            "status": {"phase": "Active"},
        }
        self._bump(obj)
        self.namespaces[name] = obj
        self._events.append((self._version, "ADDED", copy.deepcopy(obj)))

    def _wake(self) -> None:
        async def notify() -> None:
            async with self._changed:
                self._changed.notify_all()

        asyncio.get_running_loop().create_task(notify())

    @web.middleware
    async def _gate(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.requests.append((request.method, request.path))
        if self.down:
            return _status(503, "ServiceUnavailable", "the fake API server is down")
        if (
            self.expected_bearer is not None
            and request.headers.get("Authorization") != f"Bearer {self.expected_bearer}"
        ):
            return _status(401, "Unauthorized", "Unauthorized")
        response: web.StreamResponse = await handler(request)
        return response

    async def _list_namespaces(self, request: web.Request) -> web.StreamResponse:
        if request.query.get("watch") in ("true", "1"):
            return await self._watch_namespaces(request)
        return web.json_response(
            {
                "kind": "NamespaceList",
                "apiVersion": "v1",
                "metadata": {"resourceVersion": str(self._version)},
                "items": [copy.deepcopy(o) for o in self.namespaces.values()],
            }
        )

    async def _watch_namespaces(self, request: web.Request) -> web.StreamResponse:
        since = int(request.query.get("resourceVersion") or self._version)
        timeout = float(request.query.get("timeoutSeconds", "30"))
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (left := deadline - loop.time()) > 0 and not self.down:
            for version, kind, obj in self._events:
                if version > since:
                    line = json.dumps({"type": kind, "object": obj}) + "\n"
                    await response.write(line.encode())
                    since = version
            async with self._changed:
                try:
                    await asyncio.wait_for(self._changed.wait(), min(left, 0.5))
                except TimeoutError:
                    pass
        await response.write_eof()
        return response

    async def _body(self, request: web.Request, kind: str) -> Obj | web.Response:
        try:
            body = await request.json()
        except ValueError:
            return _status(400, "BadRequest", "the body is not JSON")
        if not isinstance(body, dict) or body.get("kind") not in (kind, None):
            return _status(400, "BadRequest", f"not a {kind}")
        body.setdefault("metadata", {})
        return body

    def _namespace_refuses(self, namespace: str) -> web.Response | None:
        ns = self.namespaces.get(namespace)
        if ns is None:
            return _status(404, "NotFound", f'namespaces "{namespace}" not found')
        if ns["status"].get("phase") == "Terminating":
            return _status(
                403,
                "Forbidden",
                f"unable to create new content in namespace {namespace} because it is "
                "being terminated",
            )
        return None

    async def _get(
        self, store: dict[tuple[str, str], Obj], request: web.Request, what: str
    ) -> web.Response:
        key = (request.match_info["ns"], request.match_info["name"])
        if key not in store:
            return _status(404, "NotFound", f'{what} "{key[1]}" not found')
        return web.json_response(copy.deepcopy(store[key]))

    async def _create(
        self, store: dict[tuple[str, str], Obj], request: web.Request, kind: str, api: str
    ) -> web.Response:
        namespace = request.match_info["ns"]
        refused = self._namespace_refuses(namespace)
        if refused is not None:
            return refused
        body = await self._body(request, kind)
        if isinstance(body, web.Response):
            return body
        name = body["metadata"].get("name")
        if not isinstance(name, str) or not name:
            return _status(422, "Invalid", "metadata.name: Required value")
        if (namespace, name) in store:
            return _status(409, "AlreadyExists", f'{kind} "{name}" already exists')
        body.update(apiVersion=api, kind=kind)
        body["metadata"].update(namespace=namespace, uid=str(uuid.uuid4()))
        self._bump(body)
        store[(namespace, name)] = body
        return web.json_response(copy.deepcopy(body), status=201)

    async def _replace(
        self, store: dict[tuple[str, str], Obj], request: web.Request, kind: str, api: str
    ) -> web.Response:
        key = (request.match_info["ns"], request.match_info["name"])
        body = await self._body(request, kind)
        if isinstance(body, web.Response):
            return body
        if key not in store:
            return _status(404, "NotFound", f'{kind} "{key[1]}" not found')
        given = body["metadata"].get("resourceVersion")
        if given != store[key]["metadata"]["resourceVersion"]:
            return _status(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on {kind} "{key[1]}": the object has been '
                "modified; please apply your changes to the latest version and try again",
            )
        body.update(apiVersion=api, kind=kind)
        body["metadata"].update(namespace=key[0], name=key[1])
        self._bump(body)
        store[key] = body
        return web.json_response(copy.deepcopy(body))

    async def _get_configmap(self, request: web.Request) -> web.Response:
        return await self._get(self.configmaps, request, "configmaps")

    async def _create_configmap(self, request: web.Request) -> web.Response:
        return await self._create(self.configmaps, request, "ConfigMap", "v1")

    async def _replace_configmap(self, request: web.Request) -> web.Response:
        return await self._replace(self.configmaps, request, "ConfigMap", "v1")

    async def _get_lease(self, request: web.Request) -> web.Response:
        return await self._get(self.leases, request, "leases.coordination.k8s.io")

    async def _create_lease(self, request: web.Request) -> web.Response:
        return await self._create(self.leases, request, "Lease", "coordination.k8s.io/v1")

    async def _replace_lease(self, request: web.Request) -> web.Response:
        return await self._replace(self.leases, request, "Lease", "coordination.k8s.io/v1")


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
