"""Config errors in words an operator can act on: one line per problem, naming the
setting, with a did-you-mean for a mistyped key, and the place of a syntax error."""

from __future__ import annotations

import difflib
import tomllib
import types
import typing
from collections.abc import Sequence
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from meshca.errors import ConfigError

_ALLOWED_SHOWN = 12
"""A model with at most this many fields lists them all when a key matches none."""


def describe(err: Any, model: type[BaseModel], env_prefix: str) -> str:
    """One problem from a pydantic ValidationError, ``path: what is wrong``."""
    loc: Sequence[str | int] = err["loc"]
    where = ".".join(str(p) for p in loc) or "config"
    if err["type"] == "missing" and len(loc) == 1:
        return f"{where}: required (set --{where.replace('_', '-')} or {env_prefix}{where.upper()})"
    if err["type"] == "extra_forbidden" and loc:
        return f"{where}: unknown setting{_suggestion(str(loc[-1]), fields_at(model, loc[:-1]))}"
    return f"{where}: {str(err['msg']).removeprefix('Value error, ')}"


def _suggestion(key: str, fields: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, fields, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {close[0]!r}?"
    if fields and len(fields) <= _ALLOWED_SHOWN:
        return "; allowed: " + ", ".join(fields)
    return ""


def fields_at(model: type[BaseModel], path: Sequence[str | int]) -> list[str]:
    """The field names of the model found by following ``path`` (a pydantic error
    location: field names, list indexes, and union tags such as ``pkcs11``) from
    ``model``; empty when the path leads elsewhere."""
    annotation: Any = model
    for part in path:
        annotation = _step(annotation, part)
        if annotation is None:
            return []
    annotation = _unwrap(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return list(annotation.model_fields)
    return []


def _unwrap(annotation: Any) -> Any:
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation


def _step(annotation: Any, part: str | int) -> Any:
    annotation = _unwrap(annotation)
    origin = typing.get_origin(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        field = annotation.model_fields.get(str(part))
        return None if field is None else field.annotation
    if origin in (list, tuple, Sequence) and isinstance(part, int):
        return typing.get_args(annotation)[0]
    if origin in (typing.Union, types.UnionType):
        for member in map(_unwrap, typing.get_args(annotation)):
            if _is_tagged(member, str(part)):
                return member
    return None


def _is_tagged(member: Any, tag: str) -> bool:
    """Whether ``member`` is the model of a tagged union whose tag field is ``tag``."""
    if not (isinstance(member, type) and issubclass(member, BaseModel)):
        return False
    for field in member.model_fields.values():
        if typing.get_origin(field.annotation) is Literal and typing.get_args(field.annotation) == (
            tag,
        ):
            return True
    return False


def syntax_error(config_file: Path, exc: Exception) -> ConfigError:
    """``config file X: YAML syntax error at line L, column C: problem``, one line, for a
    YAML or TOML parser's error."""
    if isinstance(exc, tomllib.TOMLDecodeError):
        return ConfigError(f"config file {config_file}: TOML syntax error: {exc}")
    import yaml  # loaded already: the error came from it

    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        problem = exc.problem or exc.context or "cannot be parsed"
        return ConfigError(
            f"config file {config_file}: YAML syntax error at line {mark.line + 1}, "
            f"column {mark.column + 1}: {problem}"
        )
    return ConfigError(f"config file {config_file}: YAML error: {' '.join(str(exc).split())}")


def read_config_file(path: Path) -> dict[str, Any]:
    """The settings in a YAML or TOML config file (by its suffix), as the file sources
    of pydantic-settings read them, with the same refusals as :class:`meshca.config.
    YamlSource`: for a settings model that does without pydantic-settings (the agent's).
    A YAML or TOML syntax error is raised as the parser's own (see :func:`syntax_error`)."""
    data: object
    if path.suffix.lower() == ".toml":
        with path.open("rb") as toml_file:
            data = tomllib.load(toml_file)
    else:
        import yaml  # only a YAML config file needs the parser

        try:
            with path.open(encoding="utf-8") as yaml_file:
                data = yaml.safe_load(yaml_file) or {}
        except UnicodeDecodeError as exc:
            raise not_utf8(path, exc) from None
    return settings_mapping(data, path)


def not_utf8(path: Path | Traversable, exc: UnicodeDecodeError) -> ConfigError:
    return ConfigError(
        f"config file {path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} "
        f"at offset {exc.start})"
    )


def settings_mapping(data: object, path: Path | Traversable) -> dict[str, Any]:
    """``data`` when it is a mapping of settings; ConfigError naming what it is instead."""
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path}: the top level is a {_yaml_kind(data)}; it must be "
            "a mapping of settings, one 'name: value' per line"
        )
    return data


def _yaml_kind(data: object) -> str:
    if isinstance(data, list):
        return "list"
    if isinstance(data, str):
        return "string"
    return type(data).__name__
