"""File sink: the agent's credentials as PEM files for nginx, HAProxy and other proxies.

On every new credentials version the sink writes the certificate chain (leaf first), the
private key (PKCS#8, mode 0600) and the trust bundle (mode 0644), then reloads the data
plane with a command (``nginx -s reload``) or a signal to the pid in a pid file.

Layout and write order
----------------------
A key and its certificate live in two files, so replacing them one at a time (even
with an atomic rename each) leaves a moment when the directory holds the new key beside
the old certificate, or the reverse; a proxy reloading then fails or, worse, serves
nothing. The sink therefore switches all three files at once, the way Kubernetes
publishes Secret volumes and the layout Envoy's ``watched_directory`` expects::

    <directory>/
        cert-chain.pem  -> .meshca-current/cert-chain.pem
        key.pem         -> .meshca-current/key.pem
        root-cert.pem   -> .meshca-current/root-cert.pem
        .meshca-current -> .meshca-v7-1f2e3d4c        (the one switch)
        .meshca-v7-1f2e3d4c/   cert-chain.pem 0644, key.pem 0600, root-cert.pem 0644
        .meshca-v6-a9b8c7d6/   the previous version, kept for readers still opening it

Each write makes a fresh version directory; creates the bundle, then the chain, then the
key in it, each with ``O_CREAT|O_EXCL`` and its final mode from the first byte (owner and
group set before any byte is written); fsyncs every file and both directories; then
points ``.meshca-current`` at it with one ``rename(2)`` of a new symlink over the old
one, and fsyncs the directory again. A reader therefore sees the old set or the new set
of files, never a partial PEM and never a key beside another key's certificate, and a
crash at any point leaves the previous version in place. The bundle-before-certificate
rule of root rotation (peers must trust a new root before they see a certificate under
it) holds trivially: the bundle and the certificate change in the same instant.

One limit remains for any layout of separate files: a reader that opens the key, and the
chain a moment later, may straddle a switch. The reload runs after the switch, so a
proxy reloading on the sink's command reads one consistent set; a program that polls the
files should read the key, the chain, then the key again and retry if the key changed,
or resolve ``.meshca-current`` once and read everything through that directory.

The directory is created (mode 0755) when missing; it must be writable by its owner
only: anyone who could write to it could swap in a certificate and key of their own.
Reload failures and write failures are logged (with the command's exit code and output,
never key material), counted in :attr:`FileSink.stats`, and tried again on the next
version; they never stop the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import os
import pwd
import secrets
import shutil
import signal
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from meshca.agent._dirs import OUTPUT_DIR_MODE, ensure_directory
from meshca.agent.credentials import CredentialStore, X509Credentials
from meshca.errors import ConfigError

log = logging.getLogger(__name__)

CURRENT_LINK = ".meshca-current"
VERSION_PREFIX = ".meshca-v"
TMP_PREFIX = ".meshca-tmp-"
KEY_MODE = 0o600
PUBLIC_MODE = 0o644
VERSION_DIR_MODE = 0o755
_OUTPUT_TAIL = 2048  # bytes of a failed reload command's stdout and stderr kept in the log


@dataclass(slots=True)
class FileSinkStats:
    """Counters a metrics exporter can read; they only grow."""

    writes: int = 0
    write_failures: int = 0
    reloads: int = 0
    reload_failures: int = 0
    reloads_skipped: int = 0  # signal configured, but no pid file yet (data plane not started)


class _ReloadError(Exception):
    """A reload attempt failed; the message says why, for the log."""


class _NoProcessError(Exception):
    """The pid file does not exist yet: the data plane has not started."""


class FileSink:
    """Writes every credentials version to ``directory`` and reloads the data plane.

    ``reload_command`` is an argv list run without a shell, with ``reload_timeout``
    seconds to finish, and with ``MESHCA_CERT_FILE``, ``MESHCA_KEY_FILE``,
    ``MESHCA_BUNDLE_FILE``, ``MESHCA_SPIFFE_ID``, ``MESHCA_CREDENTIALS_VERSION`` and
    ``MESHCA_NOT_AFTER`` added to the agent's environment. Alternatively ``reload_signal``
    is sent to the pid read from ``reload_pid_file`` at each reload (for nginx: SIGHUP and
    its ``pid`` file); a pid file that does not exist yet means the data plane has not
    started, which is not a failure. ``owner`` and ``group`` (names or ids) own the files
    written; changing the owner needs root. The key stays 0600 whatever the group, so
    ``owner`` is the user that reads it (nginx's master process runs as root: none needed).
    """

    def __init__(
        self,
        directory: Path,
        *,
        cert_file: str = "cert-chain.pem",
        key_file: str = "key.pem",
        bundle_file: str = "root-cert.pem",
        reload_command: Sequence[str] | None = None,
        reload_signal: int | None = None,
        reload_pid_file: Path | None = None,
        reload_timeout: float = 30.0,
        owner: int | str | None = None,
        group: int | str | None = None,
    ) -> None:
        names = (cert_file, key_file, bundle_file)
        for name in names:
            _check_file_name(name)
        if len(set(names)) != len(names):
            raise ConfigError(f"file sink file names must differ: {', '.join(names)}")
        self._directory = Path(directory)
        self._cert_file, self._key_file, self._bundle_file = names
        self._command = _check_command(reload_command)
        self._signal = _check_signal(reload_signal, reload_pid_file)
        self._pid_file = reload_pid_file
        if self._command and self._signal is not None:
            raise ConfigError("file sink: choose a reload command or a reload signal, not both")
        if not reload_timeout > 0:
            raise ConfigError(f"reload timeout must be positive, got {reload_timeout}")
        self._timeout = reload_timeout
        self._uid = _resolve_owner(owner)
        self._gid = _resolve_group(group)
        self.stats = FileSinkStats()
        self._task: asyncio.Task[None] | None = None
        self._handled = asyncio.Condition()
        self._handled_version = 0
        self._written_version = 0

    @property
    def directory(self) -> Path:
        return self._directory

    @property
    def cert_path(self) -> Path:
        return self._directory / self._cert_file

    @property
    def key_path(self) -> Path:
        return self._directory / self._key_file

    @property
    def bundle_path(self) -> Path:
        return self._directory / self._bundle_file

    @property
    def written_version(self) -> int:
        """The credentials version whose files are on disk now (0 before the first write)."""
        return self._written_version

    async def start(self, store: CredentialStore) -> None:
        """Check the directory and owner settings, then follow ``store``'s updates."""
        if self._task is not None:
            raise RuntimeError("file sink already started")
        self._check_directory()
        self._check_ownership_allowed()
        self._task = asyncio.create_task(self._run(store), name="meshca-file-sink")
        self._task.add_done_callback(_log_unexpected_end)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def wait_handled(self, version: int) -> bool:
        """Wait until the sink has dealt with ``version`` (or a newer one).

        Returns whether the files on disk are now of that version or newer: ``False``
        means the write failed (it was logged and counted). Callers bound the wait.
        """
        async with self._handled:
            await self._handled.wait_for(lambda: self._handled_version >= version)
        return self._written_version >= version

    async def _run(self, store: CredentialStore) -> None:
        async for creds in store.updates():
            if await self._write(creds):
                await self._reload(creds)
            async with self._handled:
                self._handled_version = creds.version
                self._handled.notify_all()

    async def _write(self, creds: X509Credentials) -> bool:
        work = asyncio.ensure_future(asyncio.to_thread(self._write_files, creds))
        try:
            await asyncio.shield(work)
        except asyncio.CancelledError:
            await asyncio.wait([work])  # let a started write finish before stopping
            raise
        except OSError as exc:
            self.stats.write_failures += 1
            log.error(
                "could not write credentials version %d to %s: %s; the files of version %d "
                "stay in place and the next version tries again",
                creds.version,
                self._directory,
                exc,
                self._written_version,
            )
            return False
        self.stats.writes += 1
        self._written_version = creds.version
        log.info(
            "wrote credentials version %d for %s (serial %x, expires %s) to %s",
            creds.version,
            creds.spiffe_id,
            creds.leaf.serial_number,
            creds.not_after.isoformat(),
            self._directory,
        )
        return True

    def _write_files(self, creds: X509Credentials) -> None:
        """Publish a new version directory with one symlink switch (runs in a thread)."""
        top = self._directory
        name = f"{VERSION_PREFIX}{creds.version}-{secrets.token_hex(4)}"
        version_dir = top / name
        os.mkdir(version_dir, VERSION_DIR_MODE)
        published = False
        try:
            if self._uid != -1 or self._gid != -1:
                os.chown(version_dir, self._uid, self._gid)
            os.chmod(version_dir, VERSION_DIR_MODE)  # still empty; undo a stricter umask
            for file_name, data, mode in (
                (self._bundle_file, creds.bundle_pem(), PUBLIC_MODE),
                (self._cert_file, creds.chain_pem(), PUBLIC_MODE),
                (self._key_file, creds.key_pem(), KEY_MODE),
            ):
                _write_new_file(version_dir / file_name, data, mode, self._uid, self._gid)
            _fsync_dir(version_dir)
            _fsync_dir(top)
            previous = _read_link(top / CURRENT_LINK)
            _replace_with_symlink(top, CURRENT_LINK, name)
            published = True
            for file_name in (self._bundle_file, self._cert_file, self._key_file):
                target = f"{CURRENT_LINK}/{file_name}"
                if _read_link(top / file_name) != target:
                    _replace_with_symlink(top, file_name, target)
            _fsync_dir(top)
        finally:
            if not published:
                shutil.rmtree(version_dir, ignore_errors=True)
        _remove_old_versions(top, keep={name, previous})

    async def _reload(self, creds: X509Credentials) -> None:
        if not self._command and self._signal is None:
            return
        try:
            if self._command:
                await self._run_command(creds)
                what = f"ran reload command {self._command[0]}"
            else:
                pid = await self._send_signal()
                what = f"sent {_signal_name(self._signal)} to pid {pid}"
        except _NoProcessError as exc:
            self.stats.reloads_skipped += 1
            log.info("no reload for credentials version %d: %s", creds.version, exc)
            return
        except _ReloadError as exc:
            self.stats.reload_failures += 1
            log.error(
                "reload after writing credentials version %d failed: %s; "
                "the next version tries again",
                creds.version,
                exc,
            )
            return
        self.stats.reloads += 1
        log.info("%s after writing credentials version %d", what, creds.version)

    async def _run_command(self, creds: X509Credentials) -> None:
        env = dict(os.environ)
        env.update(
            MESHCA_CERT_FILE=str(self.cert_path),
            MESHCA_KEY_FILE=str(self.key_path),
            MESHCA_BUNDLE_FILE=str(self.bundle_path),
            MESHCA_SPIFFE_ID=str(creds.spiffe_id),
            MESHCA_CREDENTIALS_VERSION=str(creds.version),
            MESHCA_NOT_AFTER=creds.not_after.isoformat(),
        )
        argv = self._command
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                start_new_session=True,  # its own process group, so a timeout kills it all
            )
        except OSError as exc:
            raise _ReloadError(f"could not start {argv[0]}: {exc}") from exc
        try:
            out, err = await asyncio.wait_for(proc.communicate(), self._timeout)
        except TimeoutError:
            _kill_group(proc.pid)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 5)
            raise _ReloadError(
                f"{argv[0]} did not finish within {self._timeout:g}s and was killed"
            ) from None
        except asyncio.CancelledError:
            _kill_group(proc.pid)
            raise
        code = proc.returncode
        if code != 0:
            how = f"exit code {code}" if code and code > 0 else f"killed by signal {-(code or 0)}"
            raise _ReloadError(
                f"{' '.join(argv)} failed with {how}; stdout: {_tail(out)!r}; "
                f"stderr: {_tail(err)!r}"
            )

    async def _send_signal(self) -> int:
        assert self._signal is not None and self._pid_file is not None
        pid = await asyncio.to_thread(_read_pid_file, self._pid_file)
        try:
            os.kill(pid, self._signal)
        except ProcessLookupError:
            raise _ReloadError(
                f"no process {pid}: the pid file {self._pid_file} is stale"
            ) from None
        except OSError as exc:
            raise _ReloadError(f"could not signal pid {pid}: {exc.strerror}") from None
        return pid

    def _check_directory(self) -> None:
        path = self._directory
        ensure_directory(path, OUTPUT_DIR_MODE, "file sink")
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise ConfigError(
                f"file sink directory {path} does not exist; create it, writable by its "
                "owner only (e.g. mode 0755)",
                reason="output_dir_missing",
            ) from None
        except OSError as exc:
            raise ConfigError(f"file sink directory {path}: {exc.strerror}") from None
        if not stat.S_ISDIR(st.st_mode):
            raise ConfigError(f"file sink directory {path} is not a directory")
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise ConfigError(
                f"file sink directory {path} is group- or world-writable "
                f"(mode {stat.S_IMODE(st.st_mode):04o}): another user could replace the "
                "certificate and key; allowed: writable by its owner only (chmod go-w)",
                reason="output_dir_insecure",
            )
        if st.st_uid not in (0, os.geteuid()):
            raise ConfigError(
                f"file sink directory {path} is owned by uid {st.st_uid}, who could replace "
                "the certificate and key (an owner may change the mode at any time); "
                f"allowed: owned by root or by the agent's user (chown {os.geteuid()} {path})",
                reason="output_dir_insecure",
            )
        if not os.access(path, os.W_OK | os.X_OK):
            raise ConfigError(f"file sink directory {path} is not writable by this process")

    def _check_ownership_allowed(self) -> None:
        if os.geteuid() == 0:
            return
        if self._uid not in (-1, os.geteuid()):
            raise ConfigError(
                f"file owner {self._uid} needs the agent to run as root "
                f"(it runs as uid {os.geteuid()})"
            )
        if self._gid not in (-1, os.getegid(), *os.getgroups()):
            raise ConfigError(f"file group {self._gid} needs root or membership of that group")


def _check_file_name(name: str) -> None:
    if not name or "/" in name or name in (".", "..") or name.startswith(".meshca"):
        raise ConfigError(
            f"file sink file name {name!r} is not allowed: a plain name in the output "
            "directory, not starting with '.meshca'"
        )


def _check_command(command: Sequence[str] | None) -> tuple[str, ...]:
    if command is None:
        return ()
    if isinstance(command, str):
        raise ConfigError("reload command must be an argv list, not a shell string")
    argv = tuple(command)
    if not argv or not argv[0]:
        raise ConfigError("reload command is empty")
    program = argv[0]
    if os.sep in program:
        found = program if os.access(program, os.X_OK) else None
    else:
        found = shutil.which(program)
    if found is None:
        raise ConfigError(f"reload command {program!r} is not an executable file")
    return argv


def _check_signal(sig: int | None, pid_file: Path | None) -> int | None:
    if (sig is None) != (pid_file is None):
        raise ConfigError("a reload signal needs a reload pid file, and the reverse")
    if sig is None:
        return None
    try:
        return int(signal.Signals(sig))
    except ValueError:
        raise ConfigError(f"reload signal {sig} is not a signal number") from None


def _signal_name(sig: int | None) -> str:
    return signal.Signals(sig).name if sig is not None else "no signal"


def _resolve_owner(owner: int | str | None) -> int:
    if owner is None:
        return -1
    if isinstance(owner, int):
        return owner
    try:
        return pwd.getpwnam(owner).pw_uid
    except KeyError:
        raise ConfigError(f"file sink owner {owner!r} is not a user on this machine") from None


def _resolve_group(group: int | str | None) -> int:
    if group is None:
        return -1
    if isinstance(group, int):
        return group
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError(f"file sink group {group!r} is not a group on this machine") from None


def _write_new_file(path: Path, data: bytes, mode: int, uid: int, gid: int) -> None:
    """Create ``path`` (it must not exist) with ``mode`` and owner before any byte, fsync."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(path, flags, mode)
    try:
        if uid != -1 or gid != -1:
            os.fchown(fd, uid, gid)
        if stat.S_IMODE(os.fstat(fd).st_mode) != mode:
            os.fchmod(fd, mode)  # the umask took bits away; the file is still empty
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_link(path: Path) -> str | None:
    try:
        return os.readlink(path)
    except OSError:  # missing, or not a symlink (a regular file from another tool)
        return None


def _replace_with_symlink(directory: Path, name: str, target: str) -> None:
    """Point ``directory/name`` at ``target`` atomically, whatever was there before."""
    tmp = directory / f"{TMP_PREFIX}{secrets.token_hex(8)}"
    os.symlink(target, tmp)
    try:
        os.replace(tmp, directory / name)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _remove_old_versions(directory: Path, keep: set[str | None]) -> None:
    """Delete version directories but the current and the previous, and stray temp links."""
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.name.startswith(TMP_PREFIX):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
            elif entry.name.startswith(VERSION_PREFIX) and entry.name not in keep:
                shutil.rmtree(entry.path, ignore_errors=True)


def _read_pid_file(path: Path) -> int:
    try:
        st = os.stat(path)
        text = path.read_text(encoding="ascii", errors="replace")
    except FileNotFoundError:
        raise _NoProcessError(f"pid file {path} does not exist yet") from None
    except OSError as exc:
        raise _ReloadError(f"could not read pid file {path}: {exc.strerror}") from None
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise _ReloadError(
            f"pid file {path} is writable by other users; not signalling the pid it names"
        )
    value = text.strip()
    if not value.isdigit() or not 0 < int(value) < 2**31:
        raise _ReloadError(f"pid file {path} does not hold a process id: {value[:40]!r}")
    pid = int(value)
    if pid == os.getpid():
        raise _ReloadError(f"pid file {path} names the agent itself ({pid})")
    return pid


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _tail(output: bytes) -> str:
    text = output.decode("utf-8", errors="replace").strip()
    return text if len(text) <= _OUTPUT_TAIL else "..." + text[-_OUTPUT_TAIL:]


def _log_unexpected_end(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("file sink stopped: %s", exc, exc_info=exc)
