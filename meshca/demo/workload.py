"""One agent of the demo and what the demo reads of it: its configuration, and the SVID
and trust bundle its file sink writes (``certs/``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from meshca.demo.children import Child


def fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


@dataclass
class Workload:
    """One agent and what the demo knows of it."""

    name: str
    spiffe_id: str
    directory: Path
    child: Child | None = None
    proxy_port: int = 0
    first_svid_seconds: float = 0.0

    @property
    def certs(self) -> Path:
        return self.directory / "certs"

    def chain(self) -> list[x509.Certificate]:
        return x509.load_pem_x509_certificates((self.certs / "cert-chain.pem").read_bytes())

    def bundle(self) -> list[x509.Certificate]:
        return x509.load_pem_x509_certificates((self.certs / "root-cert.pem").read_bytes())

    def serial(self) -> str:
        return f"{self.chain()[0].serial_number:x}"

    def write_config(
        self, ca_ports: dict[str, str], pin: str, trust_domain: str, **settings: object
    ) -> Path:
        """Write the agent's ``agent.yaml``: the CA's ports, its root pinned, the SVID
        also written to ``certs/``, the proxy's access log beside; ``settings`` add the
        credential and the proxy's routes."""
        config: dict[str, object] = {
            "ca_address": ca_ports["grpc"],
            "ca_server_name": "localhost",
            "mtls_address": ca_ports["mtls"],
            "ca_bundle_url": f"http://{ca_ports['http']}/v1/bundle",
            "ca_bundle_sha256": [pin],
            "bundle_refresh_interval": "1s",
            "trust_domain": trust_domain,
            "output_dir": str(self.certs),
            "http_listen": "127.0.0.1:0",
            "proxy_access_log": str(self.directory / "access.log"),
            **settings,
        }
        path = self.directory / "agent.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    def root_fingerprint(self) -> str:
        """The fingerprint of the bundle root the current chain ends at."""
        top = self.chain()[-1]
        for root in self.bundle():
            if root.subject == top.issuer:
                return fingerprint(root)
        return "?"
