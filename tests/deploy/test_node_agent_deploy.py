"""deploy/kubernetes components/node-agent (and overlays/node-agent, which adds it to the
gcpkms CA): renders, validates against the 1.32 schemas, grants what the agent and the
CA use, and hands the agent and the CA configurations they load."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from meshca.agent.config import load_agent_settings
from meshca.config import load_settings
from tests.deploy.test_kubernetes import KUBERNETES_VERSION, find, pod_config, render

OVERLAY = "overlays/node-agent"


@pytest.fixture
def environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    for name in ("MESHCA_CONFIG", "MESHCA_AGENT_CONFIG", "KUBERNETES_SERVICE_HOST"):
        monkeypatch.delenv(name, raising=False)
    yield monkeypatch


def _rules(role: dict[str, Any]) -> set[tuple[str, str, str]]:
    return {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def test_renders_and_validates() -> None:
    docs = render(OVERLAY)
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert ("DaemonSet", "meshca-agent") in kinds
    assert ("Deployment", "meshca") in kinds  # the CA of the overlay it builds on


def test_the_daemonset_has_what_telling_callers_apart_needs_and_no_more() -> None:
    docs = render(OVERLAY)
    daemonset = find(docs, "DaemonSet", "meshca-agent")
    assert daemonset["metadata"]["namespace"] == "meshca-node"
    namespace = next(
        d for d in docs if d["kind"] == "Namespace" and d["metadata"]["name"] == "meshca-node"
    )
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"
    ca_namespace = next(
        d for d in docs if d["kind"] == "Namespace" and d["metadata"]["name"] == "meshca-system"
    )
    assert ca_namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    pod = daemonset["spec"]["template"]["spec"]
    assert pod["hostPID"] is True
    assert "hostNetwork" not in pod
    assert pod["serviceAccountName"] == "meshca-agent"
    assert pod["tolerations"] == [{"operator": "Exists"}]
    (agent,) = pod["containers"]
    hardened = agent["securityContext"]
    assert hardened == {
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
    }
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["sockets"]["hostPath"] == {
        "path": "/var/run/meshca",
        "type": "DirectoryOrCreate",
    }
    (token,) = volumes["istio-token"]["projected"]["sources"]
    assert token["serviceAccountToken"]["audience"] == "istio-ca"
    assert volumes["meshca-ca"]["configMap"]["name"] == "istio-ca-root-cert"
    assert [v for v in pod["volumes"] if "hostPath" in v] == [volumes["sockets"]]
    assert agent["readinessProbe"]["httpGet"]["path"] == "/readyz"


def test_rbac_for_the_agent_and_the_ca() -> None:
    docs = render(OVERLAY)
    assert _rules(find(docs, "ClusterRole", "meshca-agent")) == {
        ("", "nodes/pods", "get"),
        ("", "nodes/proxy", "get"),
    }
    assert _rules(find(docs, "ClusterRole", "meshca-node-authorizer")) == {
        ("", "pods", "get"),
        ("", "pods", "list"),
    }
    binding = find(docs, "ClusterRoleBinding", "meshca-node-authorizer")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "meshca", "namespace": "meshca-system"}
    ]
    agent_binding = find(docs, "ClusterRoleBinding", "meshca-agent")
    assert agent_binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "meshca-agent", "namespace": "meshca-node"}
    ]


def test_the_ca_trusts_the_agents_service_account(
    tmp_path: Path, environment: pytest.MonkeyPatch
) -> None:
    config, env = pod_config(OVERLAY, tmp_path)
    for name, value in env.items():
        environment.setenv(name, value)
    settings = load_settings(config)
    assert settings.node_agents.service_accounts == ["meshca-node/meshca-agent"]
    assert settings.node_agents_cluster == "Kubernetes"
    assert settings.node_agents.api_server is None  # in-cluster


def test_the_agent_configuration_loads(environment: pytest.MonkeyPatch) -> None:
    daemonset = find(render(OVERLAY), "DaemonSet", "meshca-agent")
    (agent,) = daemonset["spec"]["template"]["spec"]["containers"]
    assert agent["args"] == ["agent"]
    values = {e["name"]: e.get("value") for e in agent["env"]}
    node_ip = next(e for e in agent["env"] if e["name"] == "NODE_IP")
    assert node_ip["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"
    for name, value in values.items():
        if name.startswith("MESHCA_AGENT_"):
            # What the kubelet does with $(NODE_IP) in a value.
            environment.setenv(name, value.replace("$(NODE_IP)", "10.0.0.5"))
    settings = load_agent_settings()
    assert settings.attestation == "k8s"
    assert settings.credential == "k8s"
    assert settings.kubelet_url == "https://10.0.0.5:10250"
    assert settings.socket_mode == 0o666
    assert str(settings.kubelet_ca_file) == "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
    assert {str(settings.sds_socket), str(settings.workload_api_socket)} == {
        "/var/run/meshca/sds.sock",
        "/var/run/meshca/workload.sock",
    }
