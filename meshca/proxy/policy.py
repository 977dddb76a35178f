"""Who may call whom: allow and deny lists of SPIFFE IDs per inbound listener.

The policy file (YAML, or JSON which YAML reads too)::

    listeners:
      "127.0.0.1:8443":                     # an inbound LISTEN address, as given to --inbound
        allow: ["spiffe://cluster.local/ns/payments/sa/*"]
        deny:  ["spiffe://cluster.local/ns/payments/sa/legacy"]

A pattern is a SPIFFE ID in which a path segment may be ``*``: exactly one whole,
non-empty segment, any value (``/`` never; there is no wildcard for several segments,
for part of a segment, or for the trust domain). Patterns and IDs follow the SPIFFE ID
rules of :mod:`meshca.spiffe` and are compared exactly: a lowercase trust domain, no
percent-encoding, no ``.``/``..`` or empty segments, no trailing ``/``, query, fragment,
port or user info (a pattern breaking a rule is refused, and so is a peer whose ID does).
A pattern needs a path: ``spiffe://td`` alone would match no workload.

Deny wins over allow. Once a policy file is given, whatever it does not allow is refused:
a listener missing from the file refuses everyone ("default deny"). Without a policy
file every SPIFFE ID of the trust domain is allowed (the mTLS checks still apply). A key
given twice is refused (YAML would keep the last and silently drop the first's rules).

The file is read once a second (at most :data:`MAX_POLICY_BYTES`) and its content, not
its time stamp, tells a change. A policy that cannot be read or does not parse (the file
removed, emptied, half-written or wrong) leaves the policy read last in force, never
"no policy": the proxy fails neither open nor shut on a bad edit. The error is logged
once per distinct failure. Write a new policy to a temporary file and rename it over
the old one, so that the proxy never reads half of it. Decisions are taken at connection
time, so a reload never touches established connections.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

from meshca.errors import ConfigError, SpiffeIdError
from meshca.spiffe import SpiffeId

log = logging.getLogger(__name__)

ALLOW = "allow"
DENY = "deny"
NO_POLICY_RULE = "no policy file: any SPIFFE ID of the trust domain"
MAX_POLICY_BYTES = 1024 * 1024


class _DuplicateKeyError(Exception):
    def __init__(self, key: object, first: int, second: int) -> None:
        super().__init__(key)
        self.key, self.first, self.second = key, first, second


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a mapping that gives a key twice."""

    def construct_mapping(
        self, node: yaml.MappingNode, deep: bool = False
    ) -> dict[Hashable, object]:
        seen: dict[object, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                continue  # the safe loader refuses it below
            line = key_node.start_mark.line + 1
            if key in seen:
                raise _DuplicateKeyError(key, seen[key], line)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


@dataclass(frozen=True, slots=True)
class IdPattern:
    """A SPIFFE ID whose path segments may be ``*`` (one segment, any value)."""

    text: str
    trust_domain: str
    segments: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> IdPattern:
        """Parse a pattern; ConfigError naming the defect."""
        td, slash, path = text.removeprefix("spiffe://").partition("/")
        concrete = "/".join("x" if part == "*" else part for part in path.split("/"))
        try:
            if not text.startswith("spiffe://"):
                SpiffeId.parse(text)  # raises, naming the scheme
            sid = SpiffeId.parse(f"spiffe://{td}{slash}{concrete}")
        except SpiffeIdError as exc:
            raise ConfigError(
                f"{text!r} is not a SPIFFE ID pattern: {exc} "
                "('*' stands for exactly one whole path segment)"
            ) from None
        if not sid.path:
            raise ConfigError(
                f"{text!r} has no path, so it matches no workload (an X509-SVID's SPIFFE ID "
                "has one); name the IDs, e.g. spiffe://example.org/ns/*/sa/*"
            )
        return cls(text, sid.trust_domain.name, tuple(path.split("/")))

    def matches(self, spiffe_id: SpiffeId) -> bool:
        if spiffe_id.trust_domain.name != self.trust_domain:
            return False
        parts = spiffe_id.path.split("/")[1:] if spiffe_id.path else []
        if len(parts) != len(self.segments):
            return False
        return all(p == "*" or p == s for p, s in zip(self.segments, parts, strict=True))

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True, slots=True)
class Decision:
    """``allowed`` and the rule that decided, as the access log shows it."""

    allowed: bool
    rule: str


@dataclass(frozen=True, slots=True)
class ListenerRules:
    allow: tuple[IdPattern, ...]
    deny: tuple[IdPattern, ...]


@dataclass(frozen=True, slots=True)
class Policy:
    """The rules of every inbound listener; ``None`` rules mean "no policy file"."""

    listeners: Mapping[str, ListenerRules] | None

    def decide(self, listener: str, spiffe_id: SpiffeId) -> Decision:
        if self.listeners is None:
            return Decision(True, NO_POLICY_RULE)
        rules = self.listeners.get(listener)
        if rules is None:
            return Decision(False, f"default deny: the policy has no entry for {listener}")
        for pattern in rules.deny:
            if pattern.matches(spiffe_id):
                return Decision(False, f"deny {pattern}")
        for pattern in rules.allow:
            if pattern.matches(spiffe_id):
                return Decision(True, f"allow {pattern}")
        return Decision(False, f"default deny: no allow rule of {listener} matches")

    @classmethod
    def parse(cls, text: str, source: str) -> Policy:
        """A policy from YAML or JSON text; ConfigError naming ``source`` and the defect."""
        try:
            doc = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader
        except yaml.YAMLError as exc:
            raise ConfigError(f"policy {source} is not YAML or JSON: {exc}") from None
        except _DuplicateKeyError as exc:
            raise ConfigError(
                f"policy {source}: {exc.key!r} appears twice (lines {exc.first} and "
                f"{exc.second}); merge the two, or the second would replace the first"
            ) from None
        if not isinstance(doc, dict) or set(doc) - {"listeners"}:
            raise ConfigError(f"policy {source} must be a mapping with one key, 'listeners'")
        entries = doc.get("listeners") or {}
        if not isinstance(entries, dict):
            raise ConfigError(f"policy {source}: 'listeners' must map LISTEN addresses to rules")
        listeners: dict[str, ListenerRules] = {}
        for name, rules in entries.items():
            if not isinstance(rules, dict) or set(rules) - {ALLOW, DENY}:
                raise ConfigError(
                    f"policy {source}: listener {name!r} must be a mapping of "
                    "'allow' and 'deny' lists"
                )
            lists: dict[str, tuple[IdPattern, ...]] = {}
            for key in (ALLOW, DENY):
                items = rules.get(key) or []
                if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
                    raise ConfigError(
                        f"policy {source}: {name!r} {key} must be a list of SPIFFE IDs"
                    )
                try:
                    lists[key] = tuple(IdPattern.parse(i) for i in items)
                except ConfigError as exc:
                    raise ConfigError(f"policy {source}: {name!r} {key}: {exc}") from None
            listeners[str(name)] = ListenerRules(lists[ALLOW], lists[DENY])
        return cls(listeners)


class PolicyFile:
    """A policy file and the policy it held when last read successfully."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._seen: bytes | None = None  # the content read last, good or bad
        self._error: str | None = None  # the failure logged last
        self.policy = Policy(None)
        self.reloads = 0
        if path is not None:
            data = self._read()
            self.policy = Policy.parse(self._text(data), str(path))
            self._seen = data

    def _read(self) -> bytes:
        """The file's bytes; ConfigError if it cannot be read, is not a regular file (a
        FIFO would block the proxy) or is larger than :data:`MAX_POLICY_BYTES`."""
        assert self.path is not None
        try:
            with open(self.path, "rb", opener=_open_nonblocking) as file:
                if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
                    raise ConfigError(f"the policy {self.path} is not a regular file")
                data = file.read(MAX_POLICY_BYTES + 1)
        except OSError as exc:
            raise ConfigError(
                f"cannot read the policy {self.path}: {exc.strerror or exc}"
            ) from None
        if len(data) > MAX_POLICY_BYTES:
            raise ConfigError(f"the policy {self.path} is larger than {MAX_POLICY_BYTES} bytes")
        return data

    def _text(self, data: bytes) -> str:
        try:
            return data.decode()
        except UnicodeDecodeError as exc:
            raise ConfigError(f"the policy {self.path} is not UTF-8: {exc.reason}") from None

    def check(self) -> bool:
        """Re-read the file; True when a new policy is in force. A failure keeps the policy
        in force and is logged once (until the failure or the content changes)."""
        if self.path is None:
            return False
        try:
            data = self._read()
            if data == self._seen:
                if self._error is not None:
                    log.info("policy %s readable again, unchanged", self.path)
                    self._error = None
                return False
            self._seen = data
            policy = Policy.parse(self._text(data), str(self.path))
        except ConfigError as exc:
            if exc.message != self._error:
                self._error = exc.message
                log.error("%s; keeping the policy read last", exc.message)
            return False
        self.policy = policy
        self._error = None
        self.reloads += 1
        log.info("policy %s reloaded", self.path)
        return True

    def decide(self, listener: str, spiffe_id: SpiffeId) -> Decision:
        return self.policy.decide(listener, spiffe_id)


def _open_nonblocking(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NONBLOCK)
