"""The file sink: modes, contents, atomic switching, reload by command or signal, refusals."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meshca.agent.credentials import CredentialStore, X509Credentials
from meshca.agent.filesink import CURRENT_LINK, VERSION_PREFIX, FileSink
from meshca.errors import ConfigError
from tests.agent.support import WEB, LocalCA

WAIT = 10.0  # seconds any single wait may take before the test fails


@pytest.fixture
def out(tmp_path: Path) -> Path:
    directory = tmp_path / "out"
    directory.mkdir()
    directory.chmod(0o755)  # whatever the umask: the sink refuses group-writable dirs
    return directory


@pytest.fixture
def ca() -> LocalCA:
    return LocalCA()


@pytest.fixture
async def sinks() -> AsyncIterator[list[FileSink]]:
    started: list[FileSink] = []
    yield started
    for sink in started:
        await sink.stop()


@pytest.fixture
def start(sinks: list[FileSink]) -> Callable[..., FileSink]:
    """Build a FileSink; the test starts it with ``await sink.start(store)``."""

    def build(directory: Path, **options: object) -> FileSink:
        sink = FileSink(directory, **options)  # type: ignore[arg-type]
        sinks.append(sink)
        return sink

    return build


async def handled(sink: FileSink, creds: X509Credentials) -> bool:
    return await asyncio.wait_for(sink.wait_handled(creds.version), WAIT)


def script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def public_der(key_or_cert: object) -> bytes:
    public_key = key_or_cert.public_key()  # type: ignore[attr-defined]
    return bytes(
        public_key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def assert_files_hold(sink: FileSink, creds: X509Credentials) -> None:
    key = serialization.load_pem_private_key(sink.key_path.read_bytes(), password=None)
    chain = x509.load_pem_x509_certificates(sink.cert_path.read_bytes())
    bundle = x509.load_pem_x509_certificates(sink.bundle_path.read_bytes())
    assert tuple(chain) == creds.chain
    assert tuple(bundle) == creds.bundle
    assert public_der(key) == public_der(chain[0])


def version_dirs(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(VERSION_PREFIX))


async def test_files_have_their_modes_and_hold_the_published_credentials(
    out: Path, ca: LocalCA, start: Callable[..., FileSink]
) -> None:
    store = CredentialStore()
    creds = await ca.publish(store)
    sink = start(out)
    await sink.start(store)
    assert await handled(sink, creds)

    assert stat.S_IMODE(sink.key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(sink.cert_path.stat().st_mode) == 0o644
    assert stat.S_IMODE(sink.bundle_path.stat().st_mode) == 0o644
    assert_files_hold(sink, creds)
    assert x509.load_pem_x509_certificates(sink.bundle_path.read_bytes()) == [ca.root]
    # the documented layout: each name is a symlink through the one switch
    for path in (sink.key_path, sink.cert_path, sink.bundle_path):
        assert os.readlink(path) == f"{CURRENT_LINK}/{path.name}"
    assert sink.written_version == creds.version


async def test_custom_file_names_and_replacing_regular_files(
    out: Path, ca: LocalCA, start: Callable[..., FileSink]
) -> None:
    (out / "tls.crt").write_text("left by another tool\n")
    store = CredentialStore()
    creds = await ca.publish(store)
    sink = start(out, cert_file="tls.crt", key_file="tls.key", bundle_file="ca.crt")
    await sink.start(store)
    assert await handled(sink, creds)
    assert sink.cert_path == out / "tls.crt"
    assert_files_hold(sink, creds)


async def test_rotation_writes_new_files_and_keeps_only_the_previous_version(
    out: Path, ca: LocalCA, start: Callable[..., FileSink]
) -> None:
    store = CredentialStore()
    sink = start(out)
    await sink.start(store)
    keys = set()
    for _ in range(4):
        creds = await ca.publish(store)
        assert await handled(sink, creds)
        assert_files_hold(sink, creds)
        keys.add(sink.key_path.read_bytes())
        assert len(version_dirs(out)) <= 2
    assert len(keys) == 4
    assert sink.stats.writes == 4
    assert [p.name for p in out.iterdir() if p.name.startswith(".meshca-tmp")] == []


async def test_a_bundle_only_update_rewrites_the_bundle(
    out: Path, ca: LocalCA, start: Callable[..., FileSink]
) -> None:
    store = CredentialStore()
    await ca.publish(store)
    sink = start(out)
    await sink.start(store)
    new_root = LocalCA().root
    creds = await store.publish_bundle((ca.root, new_root))
    assert creds is not None
    assert await handled(sink, creds)
    assert x509.load_pem_x509_certificates(sink.bundle_path.read_bytes()) == [ca.root, new_root]
    assert_files_hold(sink, creds)


async def test_readers_never_see_a_partial_file_or_a_key_beside_another_cert(
    out: Path, ca: LocalCA, start: Callable[..., FileSink]
) -> None:
    """A reader loop races 30 rotations.

    Every read parses (no partial PEM), and whenever the key is the same before and after
    reading the chain (no switch in between), the chain's leaf is that key's certificate.
    A layout that renamed key and chain one after the other would fail the second check.
    """
    store = CredentialStore()
    sink = start(out)
    await sink.start(store)
    assert await handled(sink, await ca.publish(store))

    done = threading.Event()
    problems: list[str] = []
    checked = 0

    def reader() -> None:
        nonlocal checked
        for _ in range(200_000):  # bounded; ends early when the writer is done
            if done.is_set():
                return
            try:
                key_before = sink.key_path.read_bytes()
                chain_pem = sink.cert_path.read_bytes()
                key_after = sink.key_path.read_bytes()
                bundle_pem = sink.bundle_path.read_bytes()
                key = serialization.load_pem_private_key(key_before, password=None)
                chain = x509.load_pem_x509_certificates(chain_pem)
                x509.load_pem_x509_certificates(bundle_pem)
            except (OSError, ValueError) as exc:
                problems.append(f"unreadable: {exc!r}")
                return
            if len(chain) != 2:
                problems.append(f"chain of {len(chain)} certificates")
            if key_before == key_after:
                checked += 1
                if public_der(key) != public_der(chain[0]):
                    problems.append("key does not match the certificate beside it")
                    return

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for _ in range(30):
            assert await handled(sink, await ca.publish(store))
    finally:
        done.set()
        await asyncio.to_thread(thread.join, WAIT)
    assert problems == []
    assert checked > 0


async def test_reload_command_runs_after_each_write_with_the_environment(
    out: Path,
    ca: LocalCA,
    start: Callable[..., FileSink],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MESHCA_TEST_INHERITED", "from-agent")
    log_file, copies = tmp_path / "reload.log", tmp_path / "copies"
    copies.mkdir()
    reload = script(
        tmp_path / "reload.sh",
        'echo "$MESHCA_CREDENTIALS_VERSION $MESHCA_SPIFFE_ID $MESHCA_KEY_FILE '
        '$MESHCA_BUNDLE_FILE $MESHCA_TEST_INHERITED $MESHCA_NOT_AFTER" >> "$1"\n'
        'cp "$MESHCA_CERT_FILE" "$2/cert-$MESHCA_CREDENTIALS_VERSION.pem"\n',
    )
    store = CredentialStore()
    sink = start(out, reload_command=[str(reload), str(log_file), str(copies)])
    await sink.start(store)
    published = []
    for _ in range(2):
        creds = await ca.publish(store)
        assert await handled(sink, creds)
        published.append(creds)

    lines = log_file.read_text().splitlines()
    assert lines == [
        f"{c.version} {WEB} {sink.key_path} {sink.bundle_path} from-agent {c.not_after.isoformat()}"
        for c in published
    ]
    for creds in published:  # the command saw the new files, already in place
        assert (copies / f"cert-{creds.version}.pem").read_bytes() == creds.chain_pem()
    assert (sink.stats.reloads, sink.stats.reload_failures) == (2, 0)


async def test_a_failing_reload_command_is_logged_and_the_sink_keeps_working(
    out: Path,
    ca: LocalCA,
    start: Callable[..., FileSink],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    reload = script(
        tmp_path / "reload.sh", 'echo "reloading"\necho "[emerg] no such file" >&2\nexit 3\n'
    )
    store = CredentialStore()
    sink = start(out, reload_command=[str(reload)])
    await sink.start(store)
    with caplog.at_level(logging.ERROR, logger="meshca.agent.filesink"):
        first = await ca.publish(store)
        assert await handled(sink, first)
    assert "exit code 3" in caplog.text
    assert "[emerg] no such file" in caplog.text
    assert "reloading" in caplog.text

    second = await ca.publish(store)
    assert await handled(sink, second)
    assert_files_hold(sink, second)
    assert (sink.stats.writes, sink.stats.reload_failures, sink.stats.reloads) == (2, 2, 0)


async def test_a_hanging_reload_command_is_killed_at_the_timeout(
    out: Path,
    ca: LocalCA,
    start: Callable[..., FileSink],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    pid_file = tmp_path / "hang.pid"
    reload = script(tmp_path / "hang.sh", f'echo $$ > "{pid_file}"\nexec sleep 30\n')
    store = CredentialStore()
    sink = start(out, reload_command=[str(reload)], reload_timeout=0.5)
    await sink.start(store)
    with caplog.at_level(logging.ERROR, logger="meshca.agent.filesink"):
        assert await handled(sink, await ca.publish(store))
    assert "did not finish within 0.5s" in caplog.text
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)
    assert await handled(sink, await ca.publish(store))
    assert sink.stats.reload_failures == 2


@pytest.fixture
def hup_counter(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """A child process that appends a line to a file on every SIGHUP (as nginx reloads)."""
    log_file, ready = tmp_path / "hups.log", tmp_path / "ready"
    code = (
        "import signal, sys, time\n"
        "def hup(*_):\n"
        f"    open({str(log_file)!r}, 'a').write('hup\\n')\n"
        "signal.signal(signal.SIGHUP, hup)\n"
        f"open({str(ready)!r}, 'w').close()\n"
        "for _ in range(600):\n"
        "    time.sleep(0.05)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + WAIT
        while not ready.exists():
            assert time.monotonic() < deadline, "the SIGHUP counter did not start"
            time.sleep(0.02)
        yield proc, log_file
    finally:
        proc.kill()
        proc.wait(WAIT)


async def hups(log_file: Path, expected: int) -> int:
    deadline = time.monotonic() + WAIT
    while True:
        count = len(log_file.read_text().splitlines()) if log_file.exists() else 0
        if count >= expected or time.monotonic() > deadline:
            return count
        await asyncio.sleep(0.02)


async def test_reload_signal_goes_to_the_pid_in_the_pid_file(
    out: Path,
    ca: LocalCA,
    start: Callable[..., FileSink],
    tmp_path: Path,
    hup_counter: tuple[subprocess.Popen[bytes], Path],
) -> None:
    proc, log_file = hup_counter
    pid_file = tmp_path / "nginx.pid"
    pid_file.write_text(f"{proc.pid}\n")
    pid_file.chmod(0o644)
    store = CredentialStore()
    sink = start(out, reload_signal=signal.SIGHUP, reload_pid_file=pid_file)
    await sink.start(store)
    for expected in (1, 2):
        assert await handled(sink, await ca.publish(store))
        assert await hups(log_file, expected) == expected
    assert sink.stats.reloads == 2


async def test_no_pid_file_yet_is_skipped_and_a_stale_pid_is_a_logged_failure(
    out: Path,
    ca: LocalCA,
    start: Callable[..., FileSink],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    pid_file = tmp_path / "nginx.pid"
    store = CredentialStore()
    sink = start(out, reload_signal=signal.SIGHUP, reload_pid_file=pid_file)
    await sink.start(store)
    assert await handled(sink, await ca.publish(store))
    assert (sink.stats.reloads_skipped, sink.stats.reload_failures) == (1, 0)

    pid_file.write_text(f"{2**31 - 2}\n")  # above any pid_max: no such process
    with caplog.at_level(logging.ERROR, logger="meshca.agent.filesink"):
        creds = await ca.publish(store)
        assert await handled(sink, creds)
    assert "is stale" in caplog.text
    assert sink.stats.reload_failures == 1
    assert_files_hold(sink, creds)


async def test_a_failed_write_is_logged_and_the_next_version_succeeds(
    out: Path,
    ca: LocalCA,
    start: Callable[..., FileSink],
    caplog: pytest.LogCaptureFixture,
) -> None:
    blocker = out / CURRENT_LINK
    blocker.mkdir()  # a directory where the switch symlink must go: rename(2) fails
    store = CredentialStore()
    sink = start(out)
    await sink.start(store)
    with caplog.at_level(logging.ERROR, logger="meshca.agent.filesink"):
        assert not await handled(sink, await ca.publish(store))
    assert "could not write credentials version 1" in caplog.text
    assert version_dirs(out) == []  # the unpublished version was cleaned up
    assert sink.stats.write_failures == 1

    blocker.rmdir()
    creds = await ca.publish(store)
    assert await handled(sink, creds)
    assert_files_hold(sink, creds)


async def test_key_material_is_never_logged(
    out: Path,
    ca: LocalCA,
    start: Callable[..., FileSink],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    reload = script(tmp_path / "fail.sh", "exit 1\n")
    store = CredentialStore()
    sink = start(out, reload_command=[str(reload)])
    with caplog.at_level(logging.DEBUG):
        await sink.start(store)
        creds = await ca.publish(store)
        assert await handled(sink, creds)
    body = b"".join(creds.key_pem().splitlines()[1:-1]).decode()
    assert "wrote credentials version 1" in caplog.text
    assert "PRIVATE KEY" not in caplog.text
    assert body[:40] not in caplog.text.replace("\n", "")


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root")
async def test_owner_and_group_are_applied_when_running_as_root(
    out: Path, ca: LocalCA, start: Callable[..., FileSink]
) -> None:
    store = CredentialStore()
    creds = await ca.publish(store)
    sink = start(out, owner=65534, group=65534)
    await sink.start(store)
    assert await handled(sink, creds)
    for path in (sink.key_path, sink.cert_path, sink.bundle_path):
        st = path.stat()
        assert (st.st_uid, st.st_gid) == (65534, 65534)
    assert stat.S_IMODE(sink.key_path.stat().st_mode) == 0o600


@pytest.mark.parametrize(
    ("mode", "message"),
    [
        (0o775, "group- or world-writable (mode 0775)"),
        (0o757, "group- or world-writable (mode 0757)"),
    ],
)
async def test_refuses_a_directory_others_can_write(
    out: Path, start: Callable[..., FileSink], mode: int, message: str
) -> None:
    out.chmod(mode)
    with pytest.raises(ConfigError, match="another user could replace") as info:
        await start(out).start(CredentialStore())
    assert message in str(info.value)


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory to another user needs root")
async def test_refuses_a_directory_another_user_owns(
    out: Path, start: Callable[..., FileSink]
) -> None:
    os.chown(out, 65534, -1)  # nobody: the mode alone (0755) would let it through
    with pytest.raises(ConfigError, match="owned by uid 65534, who could replace") as info:
        await start(out).start(CredentialStore())
    assert info.value.reason == "output_dir_insecure"
    assert f"chown 0 {out}" in str(info.value)


async def test_a_missing_directory_is_created_0755_whatever_the_umask(
    tmp_path: Path, start: Callable[..., FileSink]
) -> None:
    out = tmp_path / "made" / "certs"
    previous = os.umask(0o002)  # would leave it group-writable, which the sink refuses
    try:
        sink = start(out)
        await sink.start(CredentialStore())
    finally:
        os.umask(previous)
    await sink.stop()
    for made in (out, out.parent):
        assert stat.S_IMODE(made.stat().st_mode) == 0o755


async def test_a_directory_that_cannot_be_made_is_named(
    tmp_path: Path, start: Callable[..., FileSink]
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match=f"cannot create the file sink directory {blocker}/out"):
        await start(blocker / "out").start(CredentialStore())


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"reload_command": ["/nonexistent/reload"]}, "is not an executable file"),
        ({"reload_command": "nginx -s reload"}, "argv list, not a shell string"),
        ({"reload_command": []}, "reload command is empty"),
        ({"reload_signal": signal.SIGHUP}, "needs a reload pid file"),
        (
            {"reload_command": ["true"], "reload_signal": 1, "reload_pid_file": Path("/x")},
            "not both",
        ),
        ({"key_file": "../key.pem"}, "is not allowed"),
        ({"key_file": ".meshca-current"}, "is not allowed"),
        ({"key_file": "same.pem", "cert_file": "same.pem"}, "must differ"),
        ({"reload_timeout": 0}, "must be positive"),
        ({"owner": "no-such-user-meshca"}, "is not a user"),
        ({"group": "no-such-group-meshca"}, "is not a group"),
    ],
)
def test_bad_settings_are_refused_with_a_clear_message(
    out: Path, options: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        FileSink(out, **options)  # type: ignore[arg-type]
