"""The proxy's access log: one JSON object per line, per connection and per HTTP request.

Field names (the Envoy bootstrap in deploy/envoy logs the same names from its command
operators, so one set of tools reads both)::

    start_time       connection (or request) start, RFC 3339 UTC     %START_TIME%
    direction        inbound | outbound                              (per listener)
    listener         the LISTEN address as configured                 (per listener)
    peer_spiffe_id   the peer's SPIFFE ID from its verified SVID      %DOWNSTREAM_PEER_URI_SAN%
    peer_address     the peer's IP                   %DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%
    peer_port        the peer's port                                  %DOWNSTREAM_REMOTE_PORT%
    local_spiffe_id  our SPIFFE ID in this handshake                  %DOWNSTREAM_LOCAL_URI_SAN%
    peer_serial      the peer certificate's serial, lowercase hex     %DOWNSTREAM_PEER_SERIAL%
    peer_not_after   the peer certificate's notAfter                  %DOWNSTREAM_PEER_CERT_V_END%
    tls_version      e.g. TLSv1.3                                     %DOWNSTREAM_TLS_VERSION%
    tls_cipher       e.g. TLS_AES_128_GCM_SHA256                      %DOWNSTREAM_TLS_CIPHER%
    decision         allow | deny | error
    rule             the policy rule or check that decided
    reason           why a connection was refused or failed   %CONNECTION_TERMINATION_DETAILS%
    bytes_received   plaintext bytes from the peer, relayed           %BYTES_RECEIVED%
    bytes_sent       plaintext bytes relayed to the peer              %BYTES_SENT%
    duration_ms      milliseconds from accept to close                %DURATION%
    method           HTTP listeners, per request                      %REQ(:METHOD)%
    path             without query or user info      %REQ_WITHOUT_QUERY(:PATH)%
    status                                                            %RESPONSE_CODE%

Outbound lines name the upstream as the peer (Envoy's ``UPSTREAM_*`` operators) and add
``app_address`` / ``app_port``, the local client. Fields that do not apply are null.

The file is opened for appending, line-buffered; :meth:`AccessLog.reopen` (on SIGHUP,
or when the path no longer names the open file, as after logrotate moves it) opens the
path again. ``-`` is standard output.

Every field is written by ``json.dumps`` (ASCII only: control characters, quotes and
line breaks in what a peer sent are escaped), so a peer cannot end a line or forge
one.

Refusals are limited: anyone who can reach a port can make connections that are
refused, each worth a line. Past ``refusal_rate`` such lines a second (per process; 0:
no limit) the rest are counted, and one line per second says how many were left out::

    {"start_time": ..., "decision": "suppressed", "suppressed": 812,
     "reason": "812 refused connections not logged (more than 100 a second)"}

Allowed connections and their requests are always logged.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

log = logging.getLogger(__name__)


class AccessLog:
    """Writes access-log records; ``path`` None means standard output."""

    def __init__(self, path: Path | None, refusal_rate: int = 0) -> None:
        self.path = path
        self._file: IO[str] = sys.stdout
        self._inode: tuple[int, int] | None = None
        self.refusal_rate = refusal_rate
        self._tokens = float(refusal_rate)
        self._filled = time.monotonic()
        self.suppressed = 0  # refusals left out since the last summary line
        self.reopen()

    def reopen(self) -> None:
        """Open the path again (after a rotation); standard output is left as it is."""
        if self.path is None:
            return
        new = open(self.path, "a", buffering=1, encoding="utf-8")
        st = os.fstat(new.fileno())
        old, self._file, self._inode = self._file, new, (st.st_dev, st.st_ino)
        if old is not sys.stdout:
            old.close()

    def check_rotated(self) -> bool:
        """Reopen when the path names another file (or none): True if reopened."""
        if self.path is None:
            return False
        try:
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self._inode:
                return False
        except FileNotFoundError:
            pass
        try:
            self.reopen()
        except OSError as exc:
            log.error("access log %s: cannot reopen: %s", self.path, exc.strerror)
            return False
        return True

    def write_refusal(self, record: dict[str, Any]) -> bool:
        """Write a refused connection's line, unless past the rate: then count it and
        return False."""
        if self.refusal_rate > 0:
            now = time.monotonic()
            self._tokens = min(
                float(self.refusal_rate),
                self._tokens + (now - self._filled) * self.refusal_rate,
            )
            self._filled = now
            if self._tokens < 1:
                self.suppressed += 1
                return False
            self._tokens -= 1
        self.flush_suppressed()
        self.write(record)
        return True

    def flush_suppressed(self) -> None:
        """The summary line of the refusals left out, if any (called once a second)."""
        if not self.suppressed:
            return
        count, self.suppressed = self.suppressed, 0
        self.write(
            {
                "start_time": datetime.now(UTC).isoformat(),
                "decision": "suppressed",
                "suppressed": count,
                "reason": f"{count} refused connections not logged "
                f"(more than {self.refusal_rate} a second)",
            }
        )

    def write(self, record: dict[str, Any]) -> None:
        try:
            self._file.write(json.dumps(record, separators=(",", ":")) + "\n")
            if self.path is None:
                self._file.flush()
        except OSError as exc:  # a full disk must not take the proxy down
            log.error("access log: cannot write: %s", exc.strerror)

    def close(self) -> None:
        self.flush_suppressed()
        if self._file is not sys.stdout:
            self._file.close()
        else:
            self._file.flush()
