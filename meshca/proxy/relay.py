"""The byte pump between the two legs of a proxied connection.

Each leg is an :class:`asyncio.Protocol` on one transport; what it receives is written to
the other leg's transport as it came (no copy, no per-byte work). Flow control: when a
transport's write buffer passes its high-water mark, the leg feeding it stops reading
until the buffer drains. When either side ends (EOF, close, error), the other is closed
after its buffered bytes are flushed: TLS offers no half-close in asyncio, so a TCP
half-close on the plain side is not carried through.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol, cast

WRITE_HIGH_WATER = 1024 * 1024
HOLD_LIMIT = 256 * 1024  # bytes read from a side before the other side is connected


class Owner(Protocol):
    """The connection a leg belongs to."""

    def leg_lost(self, leg: Leg, exc: Exception | None) -> None: ...


class Leg(asyncio.Protocol):
    """One side of a proxied connection."""

    __slots__ = (
        "active",
        "closed",
        "discard",
        "held",
        "held_bytes",
        "observer",
        "other",
        "owner",
        "received",
        "transport",
    )

    def __init__(self, owner: Owner) -> None:
        self.owner = owner
        self.transport: asyncio.Transport | None = None
        self.other: Leg | None = None
        self.held: list[bytes] = []
        self.held_bytes = 0
        self.received = 0  # bytes read from this side and relayed to the other
        self.active = False
        self.closed = False
        self.discard = False
        self.observer: Callable[[bytes], None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def attach(self, transport: asyncio.Transport) -> None:
        """Use ``transport`` (the TLS transport that replaces the plain one after start_tls)."""
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)

    def join(self, other: Leg) -> None:
        """Start pumping both ways; bytes held while the other side was not ready go first."""
        self.other, other.other = other, self
        for leg in (self, other):
            assert leg.transport is not None
            leg.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        for leg in (self, other):
            held, leg.held, leg.held_bytes = leg.held, [], 0
            for chunk in held:
                leg.forward(chunk)
        for leg in (self, other):
            assert leg.transport is not None
            if not leg.closed:
                leg.transport.resume_reading()

    def forward(self, data: bytes) -> None:
        self.received += len(data)
        if self.observer is not None:
            self.observer(data)
        assert self.other is not None and self.other.transport is not None
        self.other.transport.write(data)

    def data_received(self, data: bytes) -> None:
        if self.discard:
            return
        self.active = True
        if self.other is None:  # not relayed yet: hold a little, then stop reading
            self.held.append(data)
            self.held_bytes += len(data)
            if self.held_bytes > HOLD_LIMIT and self.transport is not None:
                self.transport.pause_reading()
            return
        self.received += len(data)
        if self.observer is not None:
            self.observer(data)
        self.other.transport.write(data)  # type: ignore[union-attr]

    def eof_received(self) -> bool:
        if self.other is not None:
            self.other.close()
        return False

    def pause_writing(self) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.other is not None and self.other.transport is not None and not self.other.closed:
            self.other.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.other is not None:
            self.other.close()
        self.owner.leg_lost(self, exc)

    def shut(self, linger: float, grace: float) -> None:
        """Close cleanly a leg that is not relayed: FIN (plain TCP) or close_notify, after
        reading and dropping what the peer already sent for ``linger`` seconds, so the
        kernel sends no reset; see :meth:`close_within` for ``grace``."""
        transport = self.transport
        if transport is None or self.closed:
            return
        self.discard = True
        self.held.clear()
        self.held_bytes = 0
        if transport.can_write_eof():
            transport.write_eof()
        transport.resume_reading()
        asyncio.get_running_loop().call_later(linger, self.close_within, grace)

    def close(self) -> None:
        """Close once: asyncio's TLS transport, closed a second time, forgets its protocol
        and a later :meth:`abort` does nothing."""
        if self.transport is not None and not self.closed and not self.transport.is_closing():
            self.transport.close()

    def close_within(self, grace: float) -> None:
        """Close, and drop the connection if it is still open ``grace`` seconds later.

        Closing a TLS transport sends close_notify and waits for the peer's, for up to
        asyncio's TLS shutdown timeout (30 seconds): a peer that never answers would hold
        the connection, and its slot under the connection limit, that long. For the
        connections the proxy ends on its own (refused, idle) nothing is left to deliver,
        so a short wait is enough.
        """
        if self.transport is None or self.closed:
            return
        self.close()
        asyncio.get_running_loop().call_later(grace, self.abort)

    def abort(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.abort()
