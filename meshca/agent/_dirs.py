"""Creating the directories the agent writes into, as Istio's agent does.

A missing ``output_dir`` or socket directory is created (with any missing parents) rather
than refused, with an exact mode whatever the umask: 0755 for the file sink (readable by
the data plane, writable by the agent alone), 0700 for a socket directory unless the
socket's own mode lets group or others connect (then 0711: they may reach the socket by
name, not list the directory). Each directory made is logged. A directory that exists is
left as it is (the sinks then check it).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from meshca.errors import ConfigError

log = logging.getLogger(__name__)

OUTPUT_DIR_MODE = 0o755
SOCKET_DIR_MODE = 0o700
SHARED_SOCKET_DIR_MODE = 0o711


def socket_directory_mode(socket_mode: int) -> int:
    """The mode for a socket's new directory: closed unless the socket is shared."""
    return SHARED_SOCKET_DIR_MODE if socket_mode & 0o077 else SOCKET_DIR_MODE


def ensure_directory(path: Path, mode: int, what: str) -> None:
    """Create ``path`` and its missing parents with ``mode``; ConfigError naming the
    directory when that is not possible."""
    missing: list[Path] = []
    current = Path(os.path.abspath(path))
    while not os.path.lexists(current) and current != current.parent:
        missing.append(current)
        current = current.parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, mode)
        except FileExistsError:
            continue  # made meanwhile by someone else: theirs to set up
        except OSError as exc:
            raise ConfigError(
                f"cannot create the {what} directory {directory}: {exc.strerror or exc}"
            ) from None
        os.chmod(directory, mode)  # exactly, whatever the umask
        log.info("created the %s directory %s (mode %04o)", what, directory, mode)
