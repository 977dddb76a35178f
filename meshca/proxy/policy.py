"""Who may call whom: allow and deny lists of SPIFFE IDs per inbound listener.

The policy file (YAML, or JSON which YAML reads too)::

    listeners:
      "127.0.0.1:8443":                     # an inbound LISTEN address, as given to --inbound
        allow: ["spiffe://cluster.local/ns/payments/sa/*"]
        deny:  ["spiffe://cluster.local/ns/payments/sa/legacy"]

A pattern is a SPIFFE ID in which a path segment may be ``*`` (exactly one segment, any
value). Deny wins over allow. Once a policy file is given, whatever it does not allow is
refused: a listener missing from the file refuses everyone ("default deny"). Without a
policy file every SPIFFE ID of the trust domain is allowed (the mTLS checks still apply).

The file is re-read when its modification time, size or inode change; a file that does
not parse keeps the previous policy in force and the error is logged. Decisions are taken
at connection time, so a reload never touches established connections.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

from meshca.errors import ConfigError, SpiffeIdError
from meshca.spiffe import SpiffeId

log = logging.getLogger(__name__)

ALLOW = "allow"
DENY = "deny"
NO_POLICY_RULE = "no policy file: any SPIFFE ID of the trust domain"


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
        return cls(text, sid.trust_domain.name, tuple(path.split("/")) if sid.path else ())

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
            doc = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"policy {source} is not YAML or JSON: {exc}") from None
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
        self._stamp: tuple[int, int, int] | None = None
        self.policy = Policy(None)
        self.reloads = 0
        if path is not None:
            self.policy = self._read()

    def _read(self) -> Policy:
        assert self.path is not None
        try:
            st = os.stat(self.path)
            text = self.path.read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read the policy {self.path}: {exc.strerror}") from None
        policy = Policy.parse(text, str(self.path))
        self._stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        return policy

    def check(self) -> bool:
        """Re-read the file if it changed; True when a new policy is in force."""
        if self.path is None:
            return False
        try:
            st = os.stat(self.path)
        except OSError as exc:
            log.error("policy %s: %s; keeping the previous policy", self.path, exc.strerror)
            return False
        if (st.st_mtime_ns, st.st_size, st.st_ino) == self._stamp:
            return False
        try:
            self.policy = self._read()
        except ConfigError as exc:
            self._stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            log.error("%s; keeping the previous policy", exc.message)
            return False
        self.reloads += 1
        log.info("policy %s reloaded", self.path)
        return True

    def decide(self, listener: str, spiffe_id: SpiffeId) -> Decision:
        return self.policy.decide(listener, spiffe_id)
