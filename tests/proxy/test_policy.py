"""Policy: wildcards, deny wins, default deny, bad files, and reload with connections open."""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshca.agent.credentials import CredentialStore
from meshca.errors import ConfigError
from meshca.proxy.policy import IdPattern, Policy, PolicyFile
from meshca.spiffe import SpiffeId
from tests.agent.support import LocalCA
from tests.proxy.conftest import Echo
from tests.proxy.support import (
    BACKEND,
    FRONTEND,
    INTRUDER,
    WAIT,
    client_context,
    config,
    identity_files,
    proxy,
    tls_exchange,
    wait_for_log,
)

LISTEN = "127.0.0.1:0"
PAYMENTS = "spiffe://td/ns/payments/sa/*"


def sid(text: str) -> SpiffeId:
    return SpiffeId.parse(text)


def policy(allow: list[str], deny: list[str] | None = None) -> Policy:
    doc = {"listeners": {LISTEN: {"allow": allow, "deny": deny or []}}}
    return Policy.parse(json.dumps(doc), "test")


def test_a_wildcard_stands_for_exactly_one_segment() -> None:
    rules = policy([PAYMENTS])
    assert rules.decide(LISTEN, sid("spiffe://td/ns/payments/sa/api")).allowed
    assert not rules.decide(LISTEN, sid("spiffe://td/ns/payments/sa/api/v2")).allowed
    assert not rules.decide(LISTEN, sid("spiffe://td/ns/payments/sa")).allowed
    assert not rules.decide(LISTEN, sid("spiffe://other/ns/payments/sa/api")).allowed


def test_deny_wins_and_names_the_rule() -> None:
    rules = policy([PAYMENTS], ["spiffe://td/ns/payments/sa/legacy"])
    decision = rules.decide(LISTEN, sid("spiffe://td/ns/payments/sa/legacy"))
    assert not decision.allowed
    assert decision.rule == "deny spiffe://td/ns/payments/sa/legacy"
    assert rules.decide(LISTEN, sid("spiffe://td/ns/payments/sa/api")).rule == f"allow {PAYMENTS}"


def test_default_deny_once_a_policy_exists() -> None:
    rules = policy([PAYMENTS])
    other = rules.decide("0.0.0.0:9443", sid("spiffe://td/ns/payments/sa/api"))
    assert not other.allowed
    assert other.rule == "default deny: the policy has no entry for 0.0.0.0:9443"
    assert Policy(None).decide(LISTEN, sid("spiffe://td/a")).allowed


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("listeners: [", "is not YAML or JSON"),
        ("allow: []", "must be a mapping with one key, 'listeners'"),
        ("listeners: {a: {allow: x}}", "'a' allow must be a list of SPIFFE IDs"),
        ("listeners: {a: {permit: []}}", "must be a mapping of 'allow' and 'deny' lists"),
        ("listeners: {a: {allow: ['spiffe://*/x']}}", "is not a SPIFFE ID pattern"),
        ("listeners: {a: {deny: ['spiffe://td/ns/pay*']}}", "path segment 'pay*'"),
        ("listeners: {a: {allow: ['spiffe://td']}}", "has no path, so it matches no workload"),
        ("listeners: {a: {allow: ['spiffe://td/*/']}}", "empty segment or a trailing '/'"),
        ("listeners: {a: {allow: ['spiffe://td/a%2Fb']}}", "path segment 'a%2Fb'"),
        ("listeners: {a: {allow: ['spiffe://TD/a']}}", "trust domain 'TD' has characters"),
        ("listeners: {a: {allow: ['spiffe://td/a?x=1']}}", "may not have a query"),
        (
            "listeners:\n  a: {deny: ['spiffe://td/x']}\n  a: {allow: ['spiffe://td/*']}\n",
            "'a' appears twice (lines 2 and 3)",
        ),
        ("listeners: {a: {deny: ['spiffe://td/x'], deny: []}}", "'deny' appears twice"),
    ],
)
def test_bad_policy_files_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match="policy test") as info:
        Policy.parse(text, "test")
    assert message in info.value.message


_segment = st.text(alphabet="abcxyz-_.0123456789", min_size=1, max_size=6).filter(
    lambda s: s not in (".", "..")
)


@given(st.lists(_segment, min_size=1, max_size=5), st.data())
def test_a_pattern_matches_every_id_that_agrees_outside_its_wildcards(
    path: list[str], data: st.DataObject
) -> None:
    stars = data.draw(st.lists(st.booleans(), min_size=len(path), max_size=len(path)))
    pattern = IdPattern.parse(
        "spiffe://td/"
        + "/".join("*" if star else seg for seg, star in zip(path, stars, strict=True))
    )
    assert pattern.matches(sid("spiffe://td/" + "/".join(path)))
    assert not pattern.matches(sid("spiffe://td/" + "/".join([*path, "extra"])))


def test_a_broken_edit_keeps_the_previous_policy(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(json.dumps({"listeners": {LISTEN: {"allow": [PAYMENTS]}}}))
    held = PolicyFile(path)
    for broken in ("listeners: [", "", "listeners: {x: {allow: [spiffe://td/a/]}}"):
        path.write_text(broken)
        assert held.check() is False
        assert held.decide(LISTEN, sid("spiffe://td/ns/payments/sa/api")).allowed


def test_an_edit_with_the_same_size_and_time_is_seen(tmp_path: Path) -> None:
    """File systems stamp times in ticks of a few milliseconds: two writes of the same
    size within one tick leave size, time and inode unchanged. The content decides."""
    import os

    path = tmp_path / "policy.yaml"
    path.write_text(json.dumps({"listeners": {LISTEN: {"allow": ["spiffe://td/ns/aa"]}}}))
    held = PolicyFile(path)
    before = os.stat(path)
    path.write_text(json.dumps({"listeners": {LISTEN: {"allow": ["spiffe://td/ns/bb"]}}}))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.stat(path).st_size == before.st_size
    assert held.check() is True
    assert not held.decide(LISTEN, sid("spiffe://td/ns/aa")).allowed


def test_a_removed_or_unreadable_policy_keeps_the_last_one_and_says_so_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import logging
    import os

    path = tmp_path / "policy.yaml"
    path.write_text(json.dumps({"listeners": {LISTEN: {"allow": [PAYMENTS]}}}))
    held = PolicyFile(path)
    path.unlink()
    with caplog.at_level(logging.ERROR, logger="meshca.proxy.policy"):
        for _ in range(3):  # the proxy checks once a second
            assert held.check() is False
    assert held.decide(LISTEN, sid("spiffe://td/ns/payments/sa/api")).allowed
    (record,) = caplog.records
    assert "keeping the policy read last" in record.getMessage()
    os.mkfifo(path)  # opening a FIFO to read would block the proxy until a writer came
    with caplog.at_level(logging.ERROR, logger="meshca.proxy.policy"):
        assert held.check() is False
    assert "is not a regular file" in caplog.records[-1].getMessage()
    assert held.decide(LISTEN, sid("spiffe://td/ns/payments/sa/api")).allowed


async def test_reload_applies_to_new_connections_and_keeps_open_ones(
    ca: LocalCA, echo: Echo, tmp_path: Path
) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(json.dumps({"listeners": {LISTEN: {"allow": [str(FRONTEND)]}}}))
    store = CredentialStore()
    await ca.publish(store, BACKEND)
    cfg = config(tmp_path, inbound=(f"{LISTEN}=127.0.0.1:{echo.port}",), policy=path)
    async with proxy(cfg, store) as running:
        await running.wait_ready()
        port = running.ports[LISTEN]
        front = identity_files(ca, tmp_path, FRONTEND)
        intruder = identity_files(ca, tmp_path, INTRUDER)
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client_context(front, front.roots), server_hostname="proxy"
        )
        writer.write(b"before")
        assert await asyncio.wait_for(reader.readexactly(6), WAIT) == b"before"
        assert await tls_exchange(port, client_context(intruder, intruder.roots)) == b""

        # Swap the lists: the intruder is now allowed and the frontend denied.
        path.write_text(
            json.dumps(
                {
                    "listeners": {
                        LISTEN: {
                            "allow": ["spiffe://cluster.local/ns/*/sa/*"],
                            "deny": [str(FRONTEND)],
                        }
                    }
                }
            )
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT
        while running.state.policy.reloads == 0:
            assert loop.time() < deadline, "the policy was not reloaded"
            await asyncio.sleep(0.05)

        writer.write(b"after")  # the connection opened before the reload goes on
        assert await asyncio.wait_for(reader.readexactly(5), WAIT) == b"after"
        assert await tls_exchange(port, client_context(intruder, intruder.roots)) == b"ping"
        assert await tls_exchange(port, client_context(front, front.roots)) == b""
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()
        lines = await wait_for_log(tmp_path / "access.log", lambda lines: len(lines) == 4, "4")
    by_outcome = [(line["peer_spiffe_id"], line["decision"], line["rule"]) for line in lines]
    assert (str(INTRUDER), "deny", f"default deny: no allow rule of {LISTEN} matches") in by_outcome
    assert (str(INTRUDER), "allow", "allow spiffe://cluster.local/ns/*/sa/*") in by_outcome
    assert (str(FRONTEND), "deny", f"deny {FRONTEND}") in by_outcome
    kept = next(
        line
        for line in lines
        if line["decision"] == "allow" and line["peer_spiffe_id"] == str(FRONTEND)
    )
    assert kept["bytes_received"] == len(b"beforeafter")
