"""Which SPIFFE ID a GCE VM gets: the identity mapping rules, checked once at start.

A rule names a project (exactly), a zone and an instance name (shell-style globs,
``fnmatch`` rules, case-sensitive), optionally the VM's service-account email, and the
SPIFFE ID to issue: a path (``/ns/vms/sa/web``) in this CA's trust domain, or a
template (``spiffe://{trust_domain}/gce/{project_id}/{instance_name}``) whose
placeholders are filled from the verified token. The first rule that matches wins.

Templates are parsed here, not handed to ``str.format``: only the placeholders in
:data:`PLACEHOLDERS` exist, with no attribute access, indexing, conversion or format
spec, and every value filled in must be one SPIFFE ID path segment's worth of
characters, so a claim can never add a segment or leave the trust domain.
"""

from __future__ import annotations

import fnmatch
import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from meshca.errors import ConfigError, SpiffeIdError
from meshca.spiffe import SpiffeId, TrustDomain

PLACEHOLDERS = (
    "trust_domain",
    "project_id",
    "project_number",
    "zone",
    "instance_id",
    "instance_name",
    "service_account_name",
)
"""What a ``spiffe_id`` template may name; ``service_account_name`` is the part of the
VM's service-account email before the ``@``."""

_SEGMENT_VALUE = re.compile(r"[A-Za-z0-9._-]+")
"""A value that fits inside one SPIFFE ID path segment (SPIFFE-ID spec, section 2.2)."""

_EMAIL = re.compile(r"[a-z0-9][a-z0-9._+-]*@[a-z0-9][a-z0-9.-]*[a-z0-9]")
_GLOB_CHARS = re.compile(r"[A-Za-z0-9.*?\[\]!_-]+")

_SAMPLE = {
    "project_id": "sample-project",
    "project_number": "123456789012",
    "zone": "us-central1-a",
    "instance_id": "1234567890123456789",
    "instance_name": "sample-instance",
    "service_account_name": "sample-sa",
}


@dataclass(frozen=True, slots=True)
class GceInstance:
    """What a verified ``format=full`` instance identity token says about its VM."""

    project_id: str
    project_number: str
    zone: str
    instance_id: str
    instance_name: str
    created_at: datetime
    service_account: str | None = None
    """The VM's service-account email, when the token carries a verified one."""

    def describe(self) -> str:
        """``instance 'web-1' (id 42, zone z) in project 'p'``, for refusal messages."""
        return (
            f"instance {self.instance_name!r} (id {self.instance_id}, zone {self.zone}) "
            f"in project {self.project_id!r}"
        )


class RuleSpec(Protocol):
    """One rule as the config file gives it (``meshca.config.GceRule``)."""

    @property
    def project(self) -> str: ...
    @property
    def zone(self) -> str: ...
    @property
    def instance_name(self) -> str: ...
    @property
    def service_account(self) -> str | None: ...
    @property
    def spiffe_id(self) -> str: ...


@dataclass(frozen=True, slots=True)
class IdentityTemplate:
    """A parsed ``spiffe_id``: literal text and placeholder names, in order."""

    text: str
    pieces: tuple[tuple[str, str | None], ...]

    @classmethod
    def parse(cls, text: str) -> IdentityTemplate:
        """Parse ``text``; ValueError naming the problem and what is allowed."""
        if not text.startswith(("/", "spiffe://")):
            raise ValueError(
                f"spiffe_id {text!r} must be a path in the trust domain (/ns/vms/sa/web) "
                "or a template starting with spiffe://{trust_domain}/"
            )
        pieces: list[tuple[str, str | None]] = []
        try:
            parsed = list(string.Formatter().parse(text))
        except ValueError as exc:
            raise ValueError(f"spiffe_id {text!r} is not a valid template: {exc}") from None
        for literal, name, spec, conversion in parsed:
            if name is not None and (name not in PLACEHOLDERS or spec or conversion):
                raise ValueError(
                    f"spiffe_id {text!r} has the placeholder {{{name}"
                    f"{'!' + conversion if conversion else ''}{':' + spec if spec else ''}}}; "
                    f"allowed: {', '.join('{' + p + '}' for p in PLACEHOLDERS)}"
                )
            pieces.append((literal, name))
        return cls(text, tuple(pieces))

    @property
    def names(self) -> frozenset[str]:
        return frozenset(name for _, name in self.pieces if name is not None)

    def render(self, trust_domain: TrustDomain, values: Mapping[str, str]) -> SpiffeId:
        """The SPIFFE ID for ``values``; ValueError if a value cannot be a path segment."""
        out: list[str] = []
        for literal, name in self.pieces:
            out.append(literal)
            if name is None:
                continue
            value = trust_domain.name if name == "trust_domain" else values[name]
            if name != "trust_domain" and (
                not _SEGMENT_VALUE.fullmatch(value) or value in (".", "..")
            ):
                raise ValueError(
                    f"{{{name}}} would be {value[:80]!r}, which cannot be part of a SPIFFE "
                    "ID path segment (allowed: letters, digits, '.', '-', '_')"
                )
            out.append(value)
        text = "".join(out)
        if text.startswith("/"):
            return SpiffeId(trust_domain, text)
        return SpiffeId.parse(text)


@dataclass(frozen=True, slots=True)
class MappingRule:
    """A validated rule; :meth:`matches` and :meth:`spiffe_id` apply it to a VM."""

    index: int
    project: str
    zone: str
    instance_name: str
    service_account: str | None
    template: IdentityTemplate

    def describe(self) -> str:
        sa = f", service_account {self.service_account!r}" if self.service_account else ""
        return (
            f"gce_rules[{self.index}] (project {self.project!r}, zone {self.zone!r}, "
            f"instance_name {self.instance_name!r}{sa})"
        )

    def matches(self, vm: GceInstance) -> bool:
        if vm.project_id != self.project:
            return False
        if not fnmatch.fnmatchcase(vm.zone, self.zone):
            return False
        if not fnmatch.fnmatchcase(vm.instance_name, self.instance_name):
            return False
        if self.service_account is not None and vm.service_account != self.service_account:
            return False
        # A template that names the service account needs one to fill it in.
        return "service_account_name" not in self.template.names or vm.service_account is not None

    def spiffe_id(self, trust_domain: TrustDomain, vm: GceInstance) -> SpiffeId:
        """The SPIFFE ID for ``vm`` (which :meth:`matches`); ValueError if unrenderable."""
        values = {
            "project_id": vm.project_id,
            "project_number": vm.project_number,
            "zone": vm.zone,
            "instance_id": vm.instance_id,
            "instance_name": vm.instance_name,
            "service_account_name": (vm.service_account or "").partition("@")[0],
        }
        return self.template.render(trust_domain, values)


def check_glob(what: str, pattern: str) -> str:
    """A zone or instance-name glob; ValueError if empty or not made of name characters."""
    if not pattern or not _GLOB_CHARS.fullmatch(pattern):
        raise ValueError(
            f"{what} {pattern!r} must be a glob of letters, digits, '-', '_', '.' and the "
            "wildcards * ? [...]"
        )
    return pattern


def check_email(value: str) -> str:
    """A service-account email, lowercased (Google's are); ValueError if not one."""
    email = value.strip().lower()
    if not _EMAIL.fullmatch(email):
        raise ValueError(
            f"service_account {value!r} must be an email, e.g. "
            "web@my-project.iam.gserviceaccount.com"
        )
    return email


def compile_rules(
    rules: Sequence[RuleSpec], trust_domain: TrustDomain, projects: Sequence[str]
) -> tuple[MappingRule, ...]:
    """Validate every rule against the trust domain and the project allow-list.

    Raises ConfigError naming the first bad rule (by index, project and patterns) and
    what is wrong with it.
    """
    compiled: list[MappingRule] = []
    for index, spec in enumerate(rules):
        try:
            rule = MappingRule(
                index=index,
                project=spec.project,
                zone=check_glob("zone", spec.zone),
                instance_name=check_glob("instance_name", spec.instance_name),
                service_account=(
                    check_email(spec.service_account) if spec.service_account is not None else None
                ),
                template=IdentityTemplate.parse(spec.spiffe_id),
            )
        except ValueError as exc:
            raise ConfigError(f"gce_rules[{index}] (project {spec.project!r}): {exc}") from None
        if rule.project not in projects:
            raise ConfigError(
                f"{rule.describe()}: project {rule.project!r} is not in gce_projects "
                f"({', '.join(projects) or 'empty'}), so the rule could never match"
            )
        try:
            sample = rule.template.render(trust_domain, _SAMPLE)
        except (ValueError, SpiffeIdError) as exc:
            raise ConfigError(
                f"{rule.describe()}: spiffe_id {rule.template.text!r} does not make a "
                f"SPIFFE ID: {exc}"
            ) from None
        if not sample.member_of(trust_domain):
            raise ConfigError(
                f"{rule.describe()}: spiffe_id {rule.template.text!r} is outside trust "
                f"domain {trust_domain}; this CA issues only there"
            )
        if sample.is_trust_domain_id:
            raise ConfigError(
                f"{rule.describe()}: spiffe_id {rule.template.text!r} has no path; a "
                "workload's SPIFFE ID needs one (X509-SVID spec, section 2)"
            )
        compiled.append(rule)
    return tuple(compiled)
