"""meshca's private files on disk: the state directory, the SQLite files, their owner.

The state directory holds the ledger (pod names, UIDs, peer addresses) and, with the
``file`` signer, the root key, so only the user meshca runs as may enter it. These rules
hold whatever the process umask:

- A missing directory is created with mode 0700 (missing parents 0755), and the mode is
  set again on the open directory, so neither a loose umask (000) nor a strict one
  (0277, which would leave it unwritable) decides it.
- An existing directory must be owned by meshca's user and writable by nobody else
  (another user who may write in it can plant or swap files): writable by them is
  refused, because what they may have put there cannot be known. Read or search access
  for group or others (0755, as earlier meshca versions created it) is removed, with a
  warning, if the directory holds only meshca's files; otherwise only the warning.
- Every directory above it must be owned by root or meshca's user and be writable by
  nobody else, unless it has the sticky bit (as ``/tmp`` has): whoever may write in a
  parent may rename the state directory away and put their own in its place, whatever
  its own mode (the rule of OpenSSH's StrictModes). The directories on the path as
  given and on the path with symbolic links resolved are both checked, since a link's
  directory decides where it points.
- A private file (the database, its ``-wal``, ``-shm``, ``-journal`` and write-lock
  files) is created with mode 0600; an existing one must be a regular file, not a
  symbolic link, owned by meshca's user. Group and other bits are removed, with a
  warning.

Checks and mode changes use descriptors (``fstat``/``fchmod``), so what is checked is
what was opened. Every refusal names the path, what is wrong and the command that fixes
it; the error class is the caller's (StoreError for the database, SignerError for the
key), so the CLI reports it like any other.
"""

from __future__ import annotations

import logging
import os
import pwd
import stat
from pathlib import Path

from meshca.errors import MeshcaError

log = logging.getLogger(__name__)

PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
_PARENT_DIR_MODE = 0o755
_GROUP_OTHER = 0o077
_GROUP_OTHER_WRITE = 0o022
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
MESHCA_NAMES = ("meshca.db", "root-key.pem", ".root-key.pem.")
"""How the names of the files meshca keeps in its state directory begin."""


def user_name(uid: int) -> str:
    """``uid 0 (root)``, or ``uid 1234`` when the user database has no name for it."""
    name = _login(uid)
    return f"uid {uid} ({name})" if name != str(uid) else f"uid {uid}"


def _login(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def check_owner(
    path: Path, info: os.stat_result, *, error: type[MeshcaError], what: str, reason: str
) -> None:
    """Raise ``error`` unless ``info`` (a stat of ``path``) is owned by meshca's user.

    A file or directory another user owns may have been planted or may be replaced by
    them (a ``root-key.pem`` owned by ``nobody`` would make nobody the CA)."""
    me = os.geteuid()
    if info.st_uid == me:
        return
    raise error(
        f"{what} {path} is owned by {user_name(info.st_uid)}, not by {user_name(me)} that "
        "meshca runs as, so another user controls it. If that user is meshca's service "
        f"user, run meshca as it; if it should be this user's, run 'chown {_login(me)} {path}' "
        "as root; otherwise remove it or configure another path",
        reason=reason,
    )


def make_private_dirs(path: Path) -> None:
    """Create ``path`` with mode 0700 and any missing parents with 0755, whatever the umask.

    Directories that already exist are left alone (:func:`ensure_private_dir` checks
    the state directory itself). A concurrent creator is not an error.
    """
    path = Path(os.path.abspath(path))
    missing: list[Path] = []
    current = path
    while not os.path.lexists(current):
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    for directory in reversed(missing):
        mode = PRIVATE_DIR_MODE if directory == path else _PARENT_DIR_MODE
        try:
            os.mkdir(directory, mode)
        except FileExistsError:
            continue  # created by a concurrent process: the checks that follow decide
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | _CLOEXEC)
        try:
            os.fchmod(fd, mode)  # the umask may have taken bits away (or 0777 asked)
        finally:
            os.close(fd)


def check_parents(path: Path, *, error: type[MeshcaError], what: str) -> None:
    """Raise ``error`` if another user may replace ``path`` through a directory above it.

    Each existing parent, on the path as given and with symbolic links resolved, must be
    owned by root or meshca's user, and must not be writable by group or others unless
    its sticky bit is set (then others may not rename or remove what is not theirs).
    Parents that do not exist yet are meshca's to create (0755).
    """
    me = os.geteuid()
    given = Path(os.path.abspath(path))
    checked: set[Path] = set()
    for parent in (*given.parents, *Path(os.path.realpath(path)).parents):
        if parent in checked:
            continue
        checked.add(parent)
        try:
            info = os.stat(parent)
        except OSError:
            continue  # missing: created by meshca; unreadable: the open that follows says so
        if info.st_uid not in (0, me):
            raise error(
                f"{what} {path} lies under {parent}, which is owned by "
                f"{user_name(info.st_uid)}, who may rename {path} away and put another in "
                f"its place; allowed owners of the directories above it: root or "
                f"{user_name(me)}. Move the {what} elsewhere, or run "
                f"'chown {_login(me)} {parent}' as root",
                reason="unsafe_parent",
            )
        mode = stat.S_IMODE(info.st_mode)
        if mode & _GROUP_OTHER_WRITE and not mode & stat.S_ISVTX:
            raise error(
                f"{what} {path} lies under {parent}, which has mode {mode:04o}, so "
                f"other users may rename {path} away and put another in its place; allowed: "
                f"not writable by group or others, or the sticky bit set (as /tmp has). "
                f"Run 'chmod go-w {parent}' or move the {what} elsewhere",
                reason="unsafe_parent",
            )


def ensure_private_dir(
    path: Path,
    *,
    error: type[MeshcaError],
    what: str = "state directory",
    own_names: tuple[str, ...] = MESHCA_NAMES,
) -> None:
    """Create ``path`` (mode 0700), or check an existing one; see the module docstring.

    An existing directory that others may read is tightened only when it holds nothing
    but meshca's files (names starting with one of ``own_names``): a database URL such
    as ``sqlite:///meshca.db`` must not make meshca chmod a home directory. Otherwise
    the warning names the ``chmod``. Raises ``error`` naming the path and the fix when
    the directory is not a directory, is owned by another user, may be written by group
    or others, or cannot be written by meshca's user.
    """
    path = Path(path)
    check_parents(path, error=error, what=what)
    try:
        make_private_dirs(path)
        # The final component may be a symbolic link an administrator made (the checks
        # apply to the directory it names, which must be meshca's).
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | _CLOEXEC)
    except NotADirectoryError:
        raise error(
            f"{what} {path} is not a directory (or a parent of it is a file); "
            "configure a directory path",
            reason="not_a_directory",
        ) from None
    except OSError as exc:
        raise error(
            f"cannot create or open {what} {path}: {exc.strerror or exc}; "
            f"meshca runs as {user_name(os.geteuid())}: check that it may create and enter "
            "it, or configure another path",
            reason="state_dir_unusable",
        ) from None
    try:
        info = os.fstat(fd)
        check_owner(path, info, error=error, what=what, reason="unsafe_owner")
        mode = stat.S_IMODE(info.st_mode)
        if mode & _GROUP_OTHER_WRITE:
            raise error(
                f"{what} {path} has mode {mode:04o}, so other users may add or replace "
                f"files in it; allowed: 0700 (owner only). Check its contents, then run "
                f"'chmod 700 {path}'",
                reason="unsafe_permissions",
            )
        if mode & _GROUP_OTHER:
            mode = _tighten_dir(path, fd, mode, what, own_names)
    finally:
        os.close(fd)
    if not os.access(path, os.W_OK | os.X_OK):
        raise error(
            f"{what} {path} (mode {mode:04o}) is not writable by "
            f"{user_name(os.geteuid())}, and meshca creates its files there; "
            f"run 'chmod 700 {path}' (or mount it read-write)",
            reason="state_dir_unwritable",
        )


def _tighten_dir(path: Path, fd: int, mode: int, what: str, own_names: tuple[str, ...]) -> int:
    """Remove group and other bits from the open directory if it is meshca's alone;
    return its mode afterwards."""
    tight = mode & ~_GROUP_OTHER
    if all(name.startswith(own_names) for name in os.listdir(fd)):
        os.fchmod(fd, tight)
        log.warning(
            "%s %s had mode %04o, readable by other users; changed it to %04o",
            what,
            path,
            mode,
            tight,
        )
        return tight
    log.warning(
        "%s %s has mode %04o, so other users may list it (meshca's files in it are 0600); "
        "it holds other files too, so meshca leaves its mode alone: run 'chmod 700 %s' if "
        "that is safe, or give meshca a directory of its own",
        what,
        path,
        mode,
        path,
    )
    return mode


def ensure_private_file(
    path: Path, *, error: type[MeshcaError], what: str, create: bool = True
) -> bool:
    """Create ``path`` empty with mode 0600 (``create``), or check and tighten it.

    Returns True if the file exists afterwards. An existing file must be a regular file
    (not a symbolic link) owned by meshca's user; group and other bits are removed with
    a warning. Raises ``error`` naming the path and the fix otherwise.
    """
    path = Path(path)
    if create:
        try:
            fd = os.open(
                path,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | _CLOEXEC,
                PRIVATE_FILE_MODE,
            )
        except FileExistsError:
            pass
        except OSError as exc:
            raise error(
                f"cannot create {what} {path}: {exc.strerror or exc}; meshca runs as "
                f"{user_name(os.geteuid())}: make {path.parent} writable by it "
                f"('chmod 700 {path.parent}') or configure another path",
                reason="state_file_unwritable",
            ) from None
        else:
            try:
                os.fchmod(fd, PRIVATE_FILE_MODE)  # a strict umask may have taken bits away
            finally:
                os.close(fd)
            return True
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return False
    if stat.S_ISLNK(info.st_mode):
        raise error(
            f"{what} {path} is a symbolic link; meshca opens its private files only "
            "directly: replace the link with the file it points to",
            reason="unsafe_file_type",
        )
    if not stat.S_ISREG(info.st_mode):
        raise error(f"{what} {path} is not a regular file", reason="unsafe_file_type")
    check_owner(path, info, error=error, what=what, reason="unsafe_owner")
    mode = stat.S_IMODE(info.st_mode)
    if mode & _GROUP_OTHER:
        _tighten_file(path, info, mode, error=error, what=what)
    if not os.access(path, os.R_OK | os.W_OK):
        raise error(
            f"{what} {path} (mode {mode & ~_GROUP_OTHER:04o}) is not readable and writable by "
            f"{user_name(os.geteuid())}; run 'chmod 600 {path}'",
            reason="state_file_unwritable",
        )
    return True


def _tighten_file(
    path: Path, seen: os.stat_result, mode: int, *, error: type[MeshcaError], what: str
) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | _CLOEXEC)
    except OSError as exc:
        raise error(
            f"{what} {path} has mode {mode:04o} and cannot be opened to fix it "
            f"({exc.strerror or exc}); run 'chmod 600 {path}'",
            reason="unsafe_permissions",
        ) from None
    try:
        info = os.fstat(fd)
        if (info.st_dev, info.st_ino) != (seen.st_dev, seen.st_ino):
            raise error(
                f"{what} {path} was replaced while meshca checked it; retry",
                reason="unsafe_file_type",
            )
        os.fchmod(fd, mode & ~_GROUP_OTHER)
    finally:
        os.close(fd)
    log.warning(
        "%s %s had mode %04o, readable by other users; changed it to %04o",
        what,
        path,
        mode,
        mode & ~_GROUP_OTHER,
    )
