"""How the bundle writer finds the API server, its CA, its token and its namespace."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshca.config import BundleConfigMapConfig
from meshca.errors import ConfigError
from meshca.kube.client import api_client, api_server_url, lease_namespace


def _config(tmp_path: Path, **changes: object) -> BundleConfigMapConfig:
    account = tmp_path / "serviceaccount"
    account.mkdir(exist_ok=True)
    (account / "token").write_text("token\n")
    (account / "namespace").write_text("meshca-system")
    values: dict[str, object] = {
        "enabled": True,
        "credentials_file": account / "token",
        "ca_file": account / "ca.crt",
    }
    values.update(changes)
    return BundleConfigMapConfig.model_validate(values)


def test_in_cluster_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    config = _config(tmp_path)
    assert api_server_url(config) == "https://10.96.0.1:443"
    assert lease_namespace(config) == "meshca-system"
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "fd00::1")
    assert api_server_url(config) == "https://[fd00::1]:443"


def test_outside_a_pod_the_api_server_must_be_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(ConfigError, match=r"set bundle_configmap\.api_server"):
        api_server_url(_config(tmp_path))


def test_missing_files_are_named(tmp_path: Path) -> None:
    config = _config(tmp_path, api_server="https://127.0.0.1:6443")
    with pytest.raises(ConfigError, match=r"ca_file .*ca.crt does not exist"):
        api_client(config)
    config = _config(
        tmp_path, api_server="http://127.0.0.1:8080", credentials_file=tmp_path / "none"
    )
    with pytest.raises(ConfigError, match=r"cannot read the API token .*none"):
        api_client(config)
    config = _config(tmp_path)
    (tmp_path / "serviceaccount" / "namespace").unlink()
    with pytest.raises(ConfigError, match="no lease_namespace set"):
        lease_namespace(config)


def test_timings_must_let_the_writer_stop_before_another_starts(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="lease_duration > renew_deadline > retry_period"):
        _config(tmp_path, lease_duration="5s", renew_deadline="5s")
