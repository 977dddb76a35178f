"""Wire checks: Duration rules agree with protobuf's own, and bodies that do not decode."""

from __future__ import annotations

from datetime import timedelta

import pytest
from google.protobuf import duration_pb2
from hypothesis import given
from hypothesis import strategies as st

from meshca.api._proto import istioca_pb2
from meshca.api.wire import (
    MAX_DURATION_SECONDS,
    InvalidDurationError,
    Undecodable,
    duration_to_timedelta,
    tolerant_deserializer,
)

INT64 = st.integers(-(2**63), 2**63 - 1)
INT32 = st.integers(-(2**31), 2**31 - 1)
NEAR_LIMITS = st.integers(-MAX_DURATION_SECONDS - 2, MAX_DURATION_SECONDS + 2)


@given(st.one_of(INT64, NEAR_LIMITS, st.integers(-3, 3)), st.one_of(INT32, st.integers(-3, 3)))
def test_duration_rules_agree_with_protobuf(seconds: int, nanos: int) -> None:
    """Accepted exactly when protobuf's own JSON encoder accepts it; same value then."""
    value = duration_pb2.Duration(seconds=seconds, nanos=nanos)
    try:
        value.ToJsonString()  # validates by the rules in duration.proto
    except ValueError:
        with pytest.raises(InvalidDurationError, match=r"^validity is not a valid"):
            duration_to_timedelta(value, "validity")
    else:
        assert duration_to_timedelta(value, "validity") == value.ToTimedelta()


def test_sub_microsecond_nanos_round_toward_zero() -> None:
    assert duration_to_timedelta(duration_pb2.Duration(nanos=1999), "v") == timedelta(
        microseconds=1
    )
    assert duration_to_timedelta(duration_pb2.Duration(nanos=-1999), "v") == timedelta(
        microseconds=-1
    )


@given(st.binary(max_size=512))
def test_any_body_decodes_or_is_undecodable(data: bytes) -> None:
    decode = tolerant_deserializer(
        istioca_pb2.IstioCertificateRequest, "istio.v1.auth.IstioCertificateRequest"
    )
    result = decode(data)
    if isinstance(result, Undecodable):
        assert result.message.startswith(
            "request is not a valid istio.v1.auth.IstioCertificateRequest: "
        )
    else:
        assert isinstance(result, istioca_pb2.IstioCertificateRequest)
