"""Who may read and replace meshca's state: the directory 0700, the SQLite files 0600,
all owned by the user meshca runs as, whatever the umask (see meshca.statedir).

Some tests hand files to ``nobody`` with ``os.chown`` (root only) or run the CLI as
``nobody`` (root writes through any permission bits, so "not writable" is only
observable as another user); those skip, saying so, when the suite does not run as root.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import sqlite3
import stat
import tempfile
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy.exc import OperationalError

import meshca
from meshca.cli.main import main
from meshca.errors import SignerError, StoreError
from meshca.statedir import user_name
from meshca.store import Store
from meshca.store.engine import parse_url, wrap_error

NOBODY = 65534
needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="handing files to another user (chown, setuid) needs root"
)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


@pytest.fixture
def umask() -> Iterator[None]:
    """Restore the process umask whatever the test set it to."""
    old = os.umask(0o022)
    os.umask(old)
    try:
        yield
    finally:
        os.umask(old)


def open_and_write(database: Path) -> Store:
    """A migrated Store on ``database`` with the WAL in use (left open for the caller)."""
    store = Store.open(f"sqlite:///{database}")
    store.ping()
    return store


# -- a fresh start ----------------------------------------------------------------------


@pytest.mark.parametrize("loose_or_strict", [0o000, 0o277])
def test_a_fresh_state_dir_is_private_whatever_the_umask(
    tmp_path: Path, umask: None, loose_or_strict: int
) -> None:
    """umask 000 once gave a 0777 directory and a 0666 database; 0277 an unwritable one."""
    state = tmp_path / "var" / "state"
    os.umask(loose_or_strict)
    result = CliRunner().invoke(main, ["admin", "root", "create", "--state-dir", str(state)])
    assert result.exit_code == 0, result.output
    assert mode(state) == 0o700
    assert mode(state.parent) == 0o755  # a missing parent: usable, writable by no one else
    assert mode(state / "meshca.db") == 0o600
    assert mode(state / "meshca.db.write-lock") == 0o600
    assert mode(state / "root-key.pem") in (0o600, 0o400)
    store = open_and_write(state / "meshca.db")
    try:
        # SQLite gives the WAL and shared-memory files the database file's mode.
        assert mode(state / "meshca.db-wal") == 0o600
        assert mode(state / "meshca.db-shm") == 0o600
    finally:
        store.close()


# -- an existing directory ----------------------------------------------------------------


def test_a_readable_state_dir_of_ours_is_tightened_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(0o755)  # what earlier meshca versions created
    with caplog.at_level(logging.WARNING, logger="meshca.statedir"):
        open_and_write(state / "meshca.db").close()
    assert mode(state) == 0o700
    assert f"{state} had mode 0755, readable by other users; changed it to 0700" in caplog.text


def test_a_readable_directory_holding_other_files_is_left_alone_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``sqlite:///meshca.db`` run from a home directory must not chmod the home."""
    home = tmp_path / "home"
    home.mkdir()
    home.chmod(0o755)
    (home / "notes.txt").write_text("not meshca's")
    with caplog.at_level(logging.WARNING, logger="meshca.statedir"):
        open_and_write(home / "meshca.db").close()
    assert mode(home) == 0o755
    assert mode(home / "meshca.db") == 0o600
    assert f"run 'chmod 700 {home}' if that is safe" in caplog.text


def test_sqlite_unable_to_open_names_the_directory_and_the_user(tmp_path: Path) -> None:
    """What SQLite says when it cannot create a file the checks did not foresee."""
    url = parse_url(f"sqlite:///{tmp_path / 'meshca.db'}")
    cause = sqlite3.OperationalError("unable to open database file")
    error = wrap_error("upgrading", OperationalError("PRAGMA", {}, cause), url)
    assert "unable to open database file (check that " in error.message
    assert f"{tmp_path} and the meshca.db* files in it are owned, readable and writable" in (
        error.message
    )
    assert f"by {user_name(os.geteuid())}, which meshca runs as" in error.message


@pytest.mark.parametrize("writable", [0o777, 0o770, 0o1777])
def test_a_state_dir_others_may_write_is_refused(tmp_path: Path, writable: int) -> None:
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(writable)
    with pytest.raises(StoreError) as info:
        Store.open(f"sqlite:///{state / 'meshca.db'}")
    assert info.value.reason == "unsafe_permissions"
    assert f"{state} has mode {writable:04o}" in info.value.message
    assert f"chmod 700 {state}" in info.value.message
    assert mode(state) == writable  # refused, not changed
    assert not (state / "meshca.db").exists()


@needs_root
def test_a_state_dir_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    os.chown(state, NOBODY, NOBODY)
    result = CliRunner().invoke(main, ["admin", "db", "upgrade", "--state-dir", str(state)])
    assert result.exit_code == 1
    assert f"database directory {state} is owned by uid {NOBODY} (nobody)" in result.output
    assert f"chown root {state}" in result.output
    assert not (state / "meshca.db").exists()


@needs_root
def test_the_file_signer_refuses_a_state_dir_owned_by_another_user(tmp_path: Path) -> None:
    """With PostgreSQL, the key is the only thing in the state directory: same rule."""
    from meshca.config import FileSignerConfig
    from meshca.signers.factory import open_signer

    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    os.chown(state, NOBODY, NOBODY)
    with pytest.raises(SignerError) as info:
        open_signer(FileSignerConfig(), state_dir=state, create=True)
    assert info.value.reason == "unsafe_owner"
    assert f"state directory {state} is owned by uid {NOBODY} (nobody)" in info.value.message
    assert not (state / "root-key.pem").exists()


# -- the directories above it ------------------------------------------------------------


@pytest.mark.parametrize("loose", [0o777, 0o775, 0o757])
def test_a_parent_others_may_write_is_refused(tmp_path: Path, loose: int) -> None:
    """Whoever may write in a parent may rename the state directory away and put their own
    in its place, whatever the state directory's own mode."""
    parent = tmp_path / "shared"
    parent.mkdir()
    parent.chmod(loose)
    state = parent / "state"
    with pytest.raises(StoreError) as info:
        Store.open(f"sqlite:///{state / 'meshca.db'}")
    assert info.value.reason == "unsafe_parent"
    assert f"lies under {parent}, which has mode {loose:04o}" in info.value.message
    assert f"chmod go-w {parent}" in info.value.message
    assert not state.exists()


def test_a_sticky_parent_others_may_write_is_accepted(tmp_path: Path) -> None:
    """Like /tmp: with the sticky bit, others may not rename or remove what is ours."""
    parent = tmp_path / "sticky"
    parent.mkdir()
    parent.chmod(0o1777)
    open_and_write(parent / "state" / "meshca.db").close()
    assert mode(parent / "state") == 0o700


def test_a_parent_reached_through_a_symbolic_link_is_checked_too(tmp_path: Path) -> None:
    """The link lives in the loose directory: whoever may write there may point it
    elsewhere, although the directory it names now is safe."""
    safe = tmp_path / "safe"
    (safe / "state").mkdir(parents=True, mode=0o700)
    loose = tmp_path / "loose"
    loose.mkdir()
    loose.chmod(0o777)
    (loose / "link").symlink_to(safe)
    with pytest.raises(StoreError) as info:
        Store.open(f"sqlite:///{loose / 'link' / 'state' / 'meshca.db'}")
    assert info.value.reason == "unsafe_parent"
    assert f"lies under {loose}, which has mode 0777" in info.value.message


@needs_root
def test_a_parent_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    parent = tmp_path / "theirs"
    parent.mkdir(mode=0o755)
    os.chown(parent, NOBODY, NOBODY)
    (parent / "state").mkdir(mode=0o700)
    with pytest.raises(SignerError) as info:
        from meshca.config import FileSignerConfig
        from meshca.signers.factory import open_signer

        open_signer(FileSignerConfig(), state_dir=parent / "state", create=True)
    assert info.value.reason == "unsafe_parent"
    assert f"lies under {parent}, which is owned by uid {NOBODY} (nobody)" in info.value.message
    assert not (parent / "state" / "root-key.pem").exists()


# -- the database files -----------------------------------------------------------------


def test_a_readable_database_of_ours_is_tightened(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    database = tmp_path / "meshca.db"
    open_and_write(database).close()
    database.chmod(0o644)  # what SQLite made under the usual umask before
    with caplog.at_level(logging.WARNING, logger="meshca.statedir"):
        open_and_write(database).close()
    assert mode(database) == 0o600
    assert f"database file {database} had mode 0644" in caplog.text


@needs_root
@pytest.mark.parametrize("name", ["meshca.db", "meshca.db-wal", "meshca.db-shm"])
def test_database_files_owned_by_another_user_are_refused(tmp_path: Path, name: str) -> None:
    database = tmp_path / "meshca.db"
    open_and_write(database).close()
    planted = tmp_path / name
    planted.touch(mode=0o600)
    os.chown(planted, NOBODY, NOBODY)
    with pytest.raises(StoreError) as info:
        Store.open(f"sqlite:///{database}")
    assert info.value.reason == "unsafe_owner"
    assert f"database file {planted} is owned by uid {NOBODY} (nobody)" in info.value.message
    assert f"chown root {planted}" in info.value.message


def test_a_database_that_is_a_symbolic_link_is_refused(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere.db"
    open_and_write(elsewhere).close()
    (tmp_path / "state").mkdir(mode=0o700)
    link = tmp_path / "state" / "meshca.db"
    link.symlink_to(elsewhere)
    with pytest.raises(StoreError) as info:
        Store.open(f"sqlite:///{link}")
    assert info.value.reason == "unsafe_file_type"
    assert f"database file {link} is a symbolic link" in info.value.message


# -- an unwritable state directory, seen by a user without root's override ---------------


@pytest.fixture
def shared_base() -> Iterator[Path]:
    """A directory ``nobody`` may enter (pytest's tmp_path is root's alone)."""
    base = Path(tempfile.mkdtemp(prefix="meshca-perm-"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base)


def _invoke_as_nobody(args: list[str], answer: Connection) -> None:
    os.setgroups([])
    os.setresgid(NOBODY, NOBODY, NOBODY)
    os.setresuid(NOBODY, NOBODY, NOBODY)
    result = CliRunner().invoke(main, args)
    answer.send((result.exit_code, result.output))


def run_as_nobody(*args: str) -> tuple[int, str]:
    """``meshca *args`` in a forked child that has dropped root for ``nobody``: the exit
    code and what it printed. (Forked rather than exec-ed: the virtualenv's interpreter
    lives under /root, which nobody may not enter.)"""
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_invoke_as_nobody, args=(list(args), send))
    child.start()
    try:
        assert receive.poll(60), "the CLI running as nobody did not answer within 60 s"
        code, output = receive.recv()
        return int(code), str(output)
    finally:
        child.join(10)
        if child.is_alive():
            child.kill()
            child.join()


@needs_root
def test_an_unwritable_state_dir_is_named_with_its_mode_and_the_fix(shared_base: Path) -> None:
    state = shared_base / "state"
    state.mkdir(mode=0o500)
    os.chown(state, NOBODY, NOBODY)
    code, output = run_as_nobody("admin", "db", "upgrade", "--state-dir", str(state))
    assert code == 1, output
    assert "unable to open database file" not in output
    assert (
        f"database directory {state} (mode 0500) is not writable by uid {NOBODY} (nobody)" in output
    )
    assert f"chmod 700 {state}" in output


@needs_root
def test_a_state_dir_that_cannot_be_created_names_the_user(shared_base: Path) -> None:
    state = shared_base / "state"  # shared_base is root's: nobody may not create in it
    code, output = run_as_nobody("admin", "db", "upgrade", "--state-dir", str(state))
    assert code == 1, output
    assert f"cannot create or open database directory {state}: Permission denied" in output
    assert f"meshca runs as uid {NOBODY} (nobody)" in output


@needs_root
def test_a_read_only_database_file_is_named_with_its_mode_and_the_fix(shared_base: Path) -> None:
    state = shared_base / "state"
    open_and_write(state / "meshca.db").close()
    for path in (state, *state.iterdir()):
        os.chown(path, NOBODY, NOBODY)
    (state / "meshca.db").chmod(0o400)
    code, output = run_as_nobody("admin", "db", "upgrade", "--state-dir", str(state))
    assert code == 1, output
    assert (
        f"database file {state / 'meshca.db'} (mode 0400) is not readable and writable "
        f"by uid {NOBODY} (nobody)" in output
    )
    assert f"chmod 600 {state / 'meshca.db'}" in output


def _others_may_read(path: Path) -> bool:
    """Whether a user with no claim on ``path`` (nobody) may read it: every directory
    above it searchable by others, and it readable and searchable."""
    if not path.stat().st_mode & stat.S_IROTH:
        return False
    return all(parent.stat().st_mode & stat.S_IXOTH for parent in (path, *path.parents))


@needs_root
@pytest.mark.skipif(
    not _others_may_read(Path(meshca.__file__).parent / "store" / "migrations" / "versions"),
    reason="meshca's migrations lie in a directory nobody may not read (a checkout under a "
    "0700 directory); the server cannot be started as nobody from it",
)
@pytest.mark.parametrize(
    "args", [["admin", "status"], ["admin", "ledger", "verify"]], ids=["status", "verify"]
)
def test_a_read_only_command_as_root_leaves_the_server_able_to_start(
    shared_base: Path, args: list[str]
) -> None:
    """meshca runs as its own user (here nobody); root audits while it is stopped. SQLite
    needs the WAL's -shm (and -wal) even to read, and creates them: as root it gives them
    the database's owner, so meshca does not find root's files in its directory and refuse
    to start."""
    state = shared_base / "state"
    state.mkdir(mode=0o700)
    os.chown(state, NOBODY, NOBODY)
    code, output = run_as_nobody("admin", "db", "upgrade", "--state-dir", str(state))
    assert code == 0, output
    assert not (state / "meshca.db-shm").exists()  # a clean close removes them

    result = CliRunner().invoke(main, [*args, "--state-dir", str(state)])
    assert result.exit_code == 0, result.output
    assert (state / "meshca.db-shm").exists()  # made by root's read-only open
    for path in state.iterdir():
        assert path.stat().st_uid == NOBODY, path
        assert mode(path) & 0o077 == 0, path
    code, output = run_as_nobody("admin", "db", "upgrade", "--state-dir", str(state))
    assert code == 0, output
