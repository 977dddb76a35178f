"""deploy/kubernetes: every overlay renders, validates, and configures a CA that starts.

``kubectl kustomize`` renders each directory offline; every object is validated against
the Kubernetes 1.32 OpenAPI schemas (``kubernetes-validate``, strict: unknown fields are
errors); the CA's pod is read for what the platform relies on; and the configuration the
manifests hand the CA (the generated ConfigMap plus the container's environment) is
loaded as ``meshca server`` loads it, and started with the pkcs11 overlay's settings:
the root in SoftHSM2, tokens checked against a fake cluster, the bundle written to a
fake API server. Only what a pod's surroundings provide is replaced: listen addresses,
the HSM library's path and token, the database URL and PIN behind their Secrets, the
API server's address.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import kubernetes_validate
import pytest
import yaml
from click.testing import CliRunner

from meshca.cli.main import main
from meshca.config import Pkcs11SignerConfig, load_settings
from meshca.server import start_server
from tests.fakes.kube import FakeKubeApi
from tests.fakes.kube_objects import FakeKubeObjects
from tests.fakes.softhsm import MAIN_TOKEN, USER_PIN, softhsm, unavailable_reason, unique_label

ROOT = Path(__file__).parents[2] / "deploy" / "kubernetes"
DIRECTORIES = [
    "base",
    "overlays/postgres",
    "overlays/pkcs11",
    "overlays/gcpkms",
    "overlays/sidecar-example",
    "overlays/vm",
]
CA_OVERLAYS = ["overlays/postgres", "overlays/pkcs11", "overlays/gcpkms", "overlays/vm"]
KUBERNETES_VERSION = "1.32"


def render(directory: str) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed (it renders the kustomizations offline)")
    result = subprocess.run(
        [kubectl, "kustomize", str(ROOT / directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    (doc,) = [
        d
        for d in docs
        if d["kind"] == kind and (name is None or d["metadata"]["name"].startswith(name))
    ]
    return doc


@pytest.mark.parametrize("directory", DIRECTORIES)
def test_renders_and_validates_against_the_kubernetes_schemas(directory: str) -> None:
    docs = render(directory)
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_the_validator_refuses_a_misspelt_field() -> None:
    """The check above can fail: a field the schema does not know is an error."""
    deployment = find(render("overlays/gcpkms"), "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGett"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("directory", CA_OVERLAYS)
def test_the_ca_pod_is_locked_down_and_probed(directory: str) -> None:
    docs = render(directory)
    deployment = find(docs, "Deployment", "meshca")
    assert deployment["metadata"]["namespace"] == "meshca-system"
    assert deployment["spec"]["replicas"] == 2
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "meshca"
    spread = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert spread[0]["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert not any("hostPath" in volume for volume in pod["volumes"])
    for container in pod["containers"] + pod.get("initContainers", []):
        hardened = container["securityContext"]
        assert hardened["readOnlyRootFilesystem"] is True
        assert hardened["allowPrivilegeEscalation"] is False
        assert hardened["capabilities"] == {"drop": ["ALL"]}
    (ca,) = pod["containers"]
    assert ca["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert ca["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert ca["resources"]["requests"] == {"cpu": "250m", "memory": "192Mi"}
    secrets = {
        e["name"]: e["valueFrom"]["secretKeyRef"]["name"].split("-")[:2]
        for e in ca["env"]
        if "valueFrom" in e
    }
    assert secrets == {
        "MESHCA_DATABASE_URL": ["meshca", "database"],
        "MESHCA_PKCS11_PIN": ["meshca", "hsm"],
    }
    service = find(docs, "Service", "meshca-vms" if directory == "overlays/vm" else "meshca")
    assert {p["port"] for p in service["spec"]["ports"]} >= {15012, 15013, 15014}
    assert find(docs, "PodDisruptionBudget")["spec"]["minAvailable"] == 1
    assert (
        find(docs, "Namespace")["metadata"]["labels"]["pod-security.kubernetes.io/enforce"]
        == "restricted"
    )


def test_rbac_grants_only_what_the_ca_uses() -> None:
    docs = render("overlays/gcpkms")
    rules = find(docs, "ClusterRole", "meshca")["rules"]
    granted = {
        (group, resource, verb, name)
        for rule in rules
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
        for name in rule.get("resourceNames", ["*"])
    }
    assert granted == {
        ("authentication.k8s.io", "tokenreviews", "create", "*"),
        ("", "namespaces", "get", "*"),
        ("", "namespaces", "list", "*"),
        ("", "namespaces", "watch", "*"),
        ("", "configmaps", "create", "*"),
        ("", "configmaps", "get", "istio-ca-root-cert"),
        ("", "configmaps", "update", "istio-ca-root-cert"),
    }
    role = find(docs, "Role", "meshca-bundle-writer")
    assert role["metadata"]["namespace"] == "meshca-system"
    assert role["rules"] == [
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "verbs": ["get", "create", "update"],
        }
    ]
    discovery = [
        d
        for d in docs
        if d["kind"] == "ClusterRoleBinding"
        and d["roleRef"]["name"] == "system:service-account-issuer-discovery"
    ]
    assert [s["name"] for d in discovery for s in d["subjects"]] == ["meshca"]
    sidecar = render("overlays/sidecar-example")
    pod = find(sidecar, "Pod")
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["meshca-ca"]["configMap"]["name"] == "istio-ca-root-cert"


def pod_config(directory: str, tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """The config file and environment the overlay gives the CA container; values behind
    Secrets are returned as ``<secret name>/<key>`` for the caller to fill in."""
    docs = render(directory)
    configmap = find(docs, "ConfigMap", "meshca-config")
    config = tmp_path / "config.yaml"
    config.write_text(configmap["data"]["config.yaml"])
    deployment = find(docs, "Deployment", "meshca")
    (ca,) = deployment["spec"]["template"]["spec"]["containers"]
    mount = next(m for m in ca["volumeMounts"] if m["name"] == "config")
    assert ca["args"] == ["server", "--config", f"{mount['mountPath']}/config.yaml"]
    env = {}
    for item in ca["env"]:
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = f"{ref['name']}/{ref['key']}"
    return config, env


@pytest.fixture
def environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    for name in ("MESHCA_CONFIG", "KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"):
        monkeypatch.delenv(name, raising=False)
    yield monkeypatch


@pytest.mark.parametrize("directory", CA_OVERLAYS)
def test_the_pod_configuration_parses(
    directory: str, tmp_path: Path, environment: pytest.MonkeyPatch
) -> None:
    config, env = pod_config(directory, tmp_path)
    for name, value in env.items():
        environment.setenv(name, value)
    settings = load_settings(config)
    assert settings.workers == 1
    assert settings.bundle_configmap.enabled
    (cluster,) = settings.effective_clusters
    assert cluster.cluster_id == "Kubernetes"
    assert str(cluster.ca_file) == "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
    assert "meshca.meshca-system.svc" in settings.server_dns_names
    # postgres alone keeps the file signer, which cannot run in these pods: it is the
    # base the pkcs11 and gcpkms overlays build on, and says so.
    kinds = {"overlays/postgres": "file", "overlays/pkcs11": "pkcs11"}
    assert settings.signer.kind == kinds.get(directory, "gcpkms")


@pytest.fixture
async def objects() -> AsyncIterator[FakeKubeObjects]:
    async with FakeKubeObjects(namespaces=("default", "meshca-system", "shop")) as api:
        yield api


@pytest.fixture
async def cluster() -> AsyncIterator[FakeKubeApi]:
    async with FakeKubeApi() as api:
        yield api


async def test_the_pkcs11_overlay_configuration_starts_a_ca(
    tmp_path: Path,
    environment: pytest.MonkeyPatch,
    objects: FakeKubeObjects,
    cluster: FakeKubeApi,
) -> None:
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    hsm = softhsm()
    config, env = pod_config("overlays/pkcs11", tmp_path)
    token = tmp_path / "serviceaccount-token"
    token.write_text("meshca-writer-token\n")
    pod = {
        **env,
        # What the pod's surroundings provide:
        "MESHCA_DATABASE_URL": f"sqlite:///{tmp_path / 'meshca.db'}",  # Secret
        "MESHCA_PKCS11_PIN": USER_PIN,  # Secret
        "MESHCA_SIGNER__MODULE": str(hsm.module),  # the vendor's library
        "MESHCA_SIGNER__TOKEN_LABEL": MAIN_TOKEN,
        "MESHCA_SIGNER__KEY_LABEL": unique_label("k8s-overlay"),
        "MESHCA_GRPC_LISTEN": "127.0.0.1:0",
        "MESHCA_GRPC_MTLS_LISTEN": "127.0.0.1:0",
        "MESHCA_HTTP_LISTEN": "127.0.0.1:0",
        "MESHCA_STATE_DIR": str(tmp_path / "state"),
        # The cluster: its token issuer and its API server.
        "MESHCA_CLUSTERS": json.dumps([{"mode": "jwt", "issuer": cluster.issuer}]),
        "MESHCA_BUNDLE_CONFIGMAP__API_SERVER": objects.url,
        "MESHCA_BUNDLE_CONFIGMAP__CREDENTIALS_FILE": str(token),
        "MESHCA_BUNDLE_CONFIGMAP__LEASE_NAMESPACE": "meshca-system",
    }
    assert pod["MESHCA_SIGNER__KIND"] == "pkcs11"
    for name, value in pod.items():
        environment.setenv(name, value)
    # As the overlay says: create the root in the HSM first.
    created = CliRunner().invoke(
        main, ["admin", "root", "create", "--config", str(config)], catch_exceptions=False
    )
    assert created.exit_code == 0, created.output
    settings = load_settings(config)
    assert isinstance(settings.signer, Pkcs11SignerConfig)
    server = await start_server(settings)
    try:
        url = f"http://127.0.0.1:{server.http_port}/readyz"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 15
        async with aiohttp.ClientSession() as session:
            while True:
                async with session.get(url) as response:
                    body = await response.text()
                if response.status == 200:
                    break
                assert loop.time() < deadline, body
                await asyncio.sleep(0.1)
        while objects.configmap("shop", "istio-ca-root-cert") is None:
            assert loop.time() < deadline, "no bundle ConfigMap written"
            await asyncio.sleep(0.1)
    finally:
        await server.stop(grace=0)
