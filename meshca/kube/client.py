"""The Kubernetes API client meshca uses, built from its own settings.

In a pod the defaults are the in-cluster ones (``KUBERNETES_SERVICE_HOST`` and
``KUBERNETES_SERVICE_PORT``, the service-account CA certificate and token). The token
is a projected one the kubelet rotates, so it is re-read from its file every minute.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Protocol

from kubernetes.aio.client import ApiClient, Configuration

from meshca.config import BundleConfigMapConfig
from meshca.errors import ConfigError

TOKEN_REREAD_SECONDS = 60.0


class ApiAccess(Protocol):
    """Where a settings section says the API server is, and how to trust and call it."""

    @property
    def api_server(self) -> str | None: ...

    @property
    def ca_file(self) -> Path: ...

    @property
    def credentials_file(self) -> Path: ...


def api_server_url(config: ApiAccess, section: str = "bundle_configmap") -> str:
    """``api_server``, or the in-cluster URL; ConfigError (naming the settings
    ``section``) when neither is known."""
    if config.api_server is not None:
        return config.api_server
    host = os.environ.get("KUBERNETES_SERVICE_HOST", "")
    port = os.environ.get("KUBERNETES_SERVICE_PORT", "")
    if not host or not port:
        raise ConfigError(
            f"{section}: not running in a Kubernetes pod (KUBERNETES_SERVICE_HOST and "
            f"KUBERNETES_SERVICE_PORT are not set); set {section}.api_server"
        )
    return f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"


def lease_namespace(config: BundleConfigMapConfig) -> str:
    """The Lease's namespace: configured, or the pod's own."""
    if config.lease_namespace:
        return config.lease_namespace
    path = config.credentials_file.parent / "namespace"
    try:
        namespace = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(
            f"bundle_configmap: no lease_namespace set and the pod's namespace cannot be read "
            f"from {path}: {exc.strerror}"
        ) from exc
    if not namespace:
        raise ConfigError(f"bundle_configmap: {path} is empty; set lease_namespace")
    return namespace


class _Token:
    """Keeps the bearer token fresh in ``configuration`` (read at most once a minute)."""

    def __init__(self, config: ApiAccess, section: str) -> None:
        self._path = config.credentials_file
        self._section = section
        self._read_at = float("-inf")

    def read(self) -> str:
        try:
            token = self._path.read_text().strip()
        except OSError as exc:
            raise ConfigError(
                f"{self._section}: cannot read the API token {self._path}: {exc.strerror}"
            ) from exc
        if not token:
            raise ConfigError(f"{self._section}: the API token file {self._path} is empty")
        self._read_at = time.monotonic()
        return token

    async def refresh(self, configuration: Configuration) -> None:
        if time.monotonic() - self._read_at < TOKEN_REREAD_SECONDS:
            return
        try:
            token = await asyncio.to_thread(self.read)
        except ConfigError:
            return  # keep the token held; the API server says if it no longer works
        configuration.api_key["BearerToken"] = token


def api_client(config: ApiAccess, section: str = "bundle_configmap") -> ApiClient:
    """An API client for ``config``; raises ConfigError naming what is missing."""
    url = api_server_url(config, section)
    ca_file = None
    if url.startswith("https://"):
        if not config.ca_file.is_file():
            raise ConfigError(
                f"{section}: ca_file {config.ca_file} does not exist; it verifies the "
                "API server's certificate"
            )
        ca_file = str(config.ca_file)
    token = _Token(config, section)
    configuration = Configuration(host=url, ssl_ca_cert=ca_file)
    configuration.api_key = {"BearerToken": token.read()}
    configuration.api_key_prefix = {"BearerToken": "Bearer"}
    # The client calls (and awaits) this hook before each request; its stub types it None.
    configuration.refresh_api_key_hook = token.refresh  # type: ignore[assignment]
    return ApiClient(configuration)
