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
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any, Self

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

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


class _Server:
    """An aiohttp app on 127.0.0.1 with a bearer check, ``down`` and ``requests``."""

    def __init__(self, expected_bearer: str | None) -> None:
        self.expected_bearer = expected_bearer
        self.requests: list[str] = []
        self.down = False
        self._runner: web.AppRunner | None = None
        self._url: str | None = None

    def routes(self, app: web.Application) -> None:
        raise NotImplementedError

    def ssl_context(self) -> ssl.SSLContext | None:
        return None

    async def start(self) -> None:
        app = web.Application(middlewares=[self._gate])
        self.routes(app)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
        await self._runner.setup()
        context = self.ssl_context()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=context)
        await site.start()
        port = self._runner.addresses[0][1]
        self._url = f"{'https' if context else 'http'}://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def url(self) -> str:
        if self._url is None:
            raise RuntimeError(f"{type(self).__name__} is not started")
        return self._url

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


def serving_tls(directory: Path, name: str, ca_file: Path) -> ssl.SSLContext:
    """A server context for 127.0.0.1 signed by a throw-away CA written to ``ca_file``."""
    directory.mkdir(parents=True, exist_ok=True)
    not_before, not_after = datetime(2000, 1, 1, tzinfo=UTC), datetime(2099, 1, 1, tzinfo=UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"fake {name} CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(IPv4Address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    ca_file.write_bytes(ca_cert.public_bytes(pem))
    cert_file, key_file = directory / f"{name}.pem", directory / f"{name}-key.pem"
    cert_file.write_bytes(cert.public_bytes(pem))
    key_file.write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    return context


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
