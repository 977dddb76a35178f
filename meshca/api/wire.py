"""Wire-level checks on a request before it reaches the CA: protobuf decoding and the
rules of ``google.protobuf.Duration``.

grpcio decodes a request before the handler runs; a body protobuf refuses (a string
field that is not UTF-8, a truncated field) would end the call with UNKNOWN and no useful
message. The services are registered with :func:`tolerant_deserializer` instead, which
turns such a body into an :class:`Undecodable` the handler refuses with INVALID_ARGUMENT.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Protocol, TypeVar

from google.protobuf import duration_pb2
from google.protobuf.message import DecodeError

MAX_DURATION_SECONDS = 315_576_000_000
"""The range of ``google.protobuf.Duration.seconds`` (about 10,000 years either way)."""
MAX_DURATION_NANOS = 999_999_999


class _Decodable(Protocol):
    @classmethod
    def FromString(cls, data: bytes, /) -> _Decodable: ...  # noqa: N802 - protobuf's name


M = TypeVar("M", bound=_Decodable)


@dataclass(frozen=True, slots=True)
class Undecodable:
    """A request body that is not a valid encoding of the message ``type_name``."""

    type_name: str
    problem: str

    @property
    def message(self) -> str:
        return (
            f"request is not a valid {self.type_name}: {self.problem}; encode it with a "
            "protobuf library (string fields must be UTF-8)"
        )


def tolerant_deserializer(message: type[M], type_name: str) -> Callable[[bytes], M | Undecodable]:
    """A gRPC request deserializer that returns :class:`Undecodable` instead of raising."""

    def deserialize(data: bytes) -> M | Undecodable:
        try:
            return message.FromString(data)  # type: ignore[return-value]  # FromString -> cls
        except DecodeError as exc:
            # "Error parsing message with type 'x.Y': String field had bad UTF-8"
            problem = str(exc).rpartition("': ")[2] or "it does not parse"
            return Undecodable(type_name, problem[:200])

    return deserialize


class InvalidDurationError(ValueError):
    """A Duration breaking the rules in google/protobuf/duration.proto."""


def duration_to_timedelta(value: duration_pb2.Duration, field: str) -> timedelta:
    """``value`` as a timedelta, if it is a valid Duration.

    google/protobuf/duration.proto: ``seconds`` within +-315,576,000,000; ``nanos``
    within +-999,999,999; for a duration of a second or more, ``nanos`` has the sign of
    ``seconds`` (or is zero). Raises InvalidDurationError naming the rule that was broken.
    """
    seconds, nanos = value.seconds, value.nanos
    prefix = f"{field} is not a valid google.protobuf.Duration"
    if abs(seconds) > MAX_DURATION_SECONDS:
        raise InvalidDurationError(
            f"{prefix}: seconds is {seconds}; allowed: -{MAX_DURATION_SECONDS} to "
            f"{MAX_DURATION_SECONDS}"
        )
    if abs(nanos) > MAX_DURATION_NANOS:
        raise InvalidDurationError(
            f"{prefix}: nanos is {nanos}; allowed: -{MAX_DURATION_NANOS} to "
            f"{MAX_DURATION_NANOS} (carry whole seconds into seconds)"
        )
    if (seconds > 0 and nanos < 0) or (seconds < 0 and nanos > 0):
        raise InvalidDurationError(
            f"{prefix}: seconds ({seconds}) and nanos ({nanos}) have different signs; "
            "they must have the same sign, or one of them be zero"
        )
    return timedelta(seconds=seconds, microseconds=int(nanos / 1000))  # toward zero
