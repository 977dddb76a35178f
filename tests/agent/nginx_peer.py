"""Debian's nginx as a real TLS peer: a throw-away server whose config lives in tmp.

The server runs in the foreground (``daemon off``) with its pid file, logs and temp
directories under a prefix in tmp, listening on 127.0.0.1 only, so it works as root (CI)
and as an ordinary user. As root the workers run as the current user and group instead
of nginx's default ``nobody``; as anyone else nginx cannot switch users and the ``user``
directive is left out.
"""

from __future__ import annotations

import grp
import os
import pwd
import signal
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509

NGINX = Path("/usr/sbin/nginx")
NOT_INSTALLED = (
    f"nginx is not installed at {NGINX} (Debian: apt-get install nginx-light; "
    "`make system-deps` installs it)"
)
_TEMP_PATHS = {  # directive -> the module that owns it (absent when built --without-...)
    "client_body_temp_path": None,
    "proxy_temp_path": "http_proxy",
    "fastcgi_temp_path": "http_fastcgi",
    "uwsgi_temp_path": "http_uwsgi",
    "scgi_temp_path": "http_scgi",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _temp_path_directives(prefix: Path) -> str:
    built = subprocess.run(
        [NGINX, "-V"], capture_output=True, text=True, timeout=10, check=True
    ).stderr
    lines = []
    for directive, module in _TEMP_PATHS.items():
        if module is None or f"--without-{module}_module" not in built:
            lines.append(f"    {directive} {prefix / directive};")
    return "\n".join(lines)


def _user_directive() -> str:
    if os.geteuid() != 0:
        return ""
    user = pwd.getpwuid(os.geteuid()).pw_name
    group = grp.getgrgid(os.getegid()).gr_name
    return f"user {user} {group};"


@dataclass
class NginxServer:
    """One nginx serving HTTPS with the given certificate files; mTLS against ``bundle``."""

    prefix: Path
    cert: Path
    key: Path
    bundle: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def conf(self) -> Path:
        return self.prefix / "nginx.conf"

    @property
    def pid_file(self) -> Path:
        return self.prefix / "nginx.pid"

    @property
    def error_log(self) -> Path:
        return self.prefix / "error.log"

    def _base_argv(self) -> list[str]:
        return [
            str(NGINX),
            "-p",
            f"{self.prefix}/",
            "-c",
            str(self.conf),
            "-e",
            str(self.error_log),
        ]

    def reload_command(self) -> list[str]:
        """What an operator gives the file sink: ``nginx -s reload`` for this config."""
        return [*self._base_argv(), "-s", "reload"]

    def write_config(self) -> None:
        self.prefix.mkdir(parents=True, exist_ok=True)
        self.conf.write_text(
            f"""{_user_directive()}
daemon off;
master_process on;
worker_processes 1;
pid {self.pid_file};
error_log {self.error_log} info;
events {{ worker_connections 64; }}
http {{
    access_log {self.prefix / "access.log"};
{_temp_path_directives(self.prefix)}
    server {{
        listen 127.0.0.1:{self.port} ssl;
        ssl_certificate {self.cert};
        ssl_certificate_key {self.key};
        ssl_client_certificate {self.bundle};
        ssl_verify_client on;
        ssl_verify_depth 2;
        location / {{
            default_type text/plain;
            return 200 "verify=$ssl_client_verify\\n";
        }}
    }}
}}
"""
        )

    def start(self, timeout: float = 10.0) -> None:
        self.write_config()
        check = subprocess.run(
            [*self._base_argv(), "-t"], capture_output=True, text=True, timeout=timeout
        )
        if check.returncode != 0:
            raise RuntimeError(f"nginx -t refused the config:\n{check.stderr}")
        self.process = subprocess.Popen(
            self._base_argv(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"nginx exited at start-up:\n{self.log_tail()}")
            if self.pid_file.exists() and self._accepting():
                return
            time.sleep(0.05)
        raise RuntimeError(f"nginx did not listen within {timeout}s:\n{self.log_tail()}")

    def _accepting(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def stop(self, timeout: float = 10.0) -> int | None:
        """Graceful shutdown (SIGQUIT), then SIGKILL if it hangs; returns the exit code."""
        proc, self.process = self.process, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGQUIT)
            try:
                return proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
        return proc.wait(timeout)

    def log_tail(self, size: int = 4000) -> str:
        try:
            return self.error_log.read_text(errors="replace")[-size:]
        except OSError:
            return "(no error log)"


def fetch(
    port: int, bundle: Path, client_cert: Path, client_key: Path
) -> tuple[x509.Certificate, bytes]:
    """One HTTPS request as an mTLS client trusting only ``bundle``.

    The handshake succeeds only if nginx serves a chain that verifies up to a root in the
    bundle (the client holds no intermediates). Hostname checking is off: an X509-SVID
    names a SPIFFE ID in its URI SAN, not a DNS name; callers check that ID instead.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=str(bundle))
    ctx.load_cert_chain(str(client_cert), str(client_key))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        tls.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        response = b""
        for _ in range(100):  # bounded: the reply is a few hundred bytes
            chunk = tls.recv(4096)
            if not chunk:
                break
            response += chunk
    return x509.load_der_x509_certificate(der), response
