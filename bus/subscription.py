"""A subscription as a trio async iterator over a bounded channel.

nats-py delivers each message to a callback on its asyncio loop; the callback
only decodes and hands the message to a trio memory channel (no crossing per
message). What happens when the reader is slower than the publishers is the
subscriber's explicit choice (`Overflow`).
"""

from __future__ import annotations

import enum
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import trio

from mesh.messages import Message, MessageError, MessageTooLarge, decode

log = logging.getLogger("mesh.bus")


class Overflow(enum.Enum):
    DROP_NEWEST = "drop-newest"  # keep what is queued; lose the new message
    DROP_OLDEST = "drop-oldest"  # make room by losing the oldest queued message


T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Delivery(Generic[T]):
    """One received message: the subject it came on, where to reply, the body."""

    subject: str
    reply: str
    body: T
    headers: dict[str, str] | None = None


class Subscription(Generic[T]):
    """Async iterator of `Delivery`; created by `Bus.subscribe`."""

    def __init__(
        self,
        subject: str,
        capacity: int,
        overflow: Overflow,
        decoder: Callable[[bytes], T],
        drops: Counter[str],
    ) -> None:
        self.subject = subject
        self._send, self._recv = trio.open_memory_channel[Delivery[T]](capacity)
        self._overflow = overflow
        self._decoder = decoder
        self.drops = drops  # shared with the Bus so totals are visible in one place
        self.received = 0
        self.nats_sub: Any = None

    def deliver(self, subject: str, reply: str, data: bytes, headers: Any) -> None:
        """Called from nats-py's callback (asyncio side, same thread)."""
        try:
            body = self._decoder(data)
        except MessageTooLarge as exc:
            self.drops["oversized"] += 1
            log.warning("dropped a message on %s: %s", subject, exc)
            return
        except MessageError as exc:
            self.drops["undecodable"] += 1
            log.warning("dropped a message on %s: %s", subject, exc)
            return
        item = Delivery(subject, reply, body, headers)
        try:
            self._send.send_nowait(item)
        except trio.WouldBlock:
            self.drops["overflow"] += 1
            if self._overflow is Overflow.DROP_OLDEST:
                try:
                    self._recv.receive_nowait()
                except trio.WouldBlock:
                    pass
                try:
                    self._send.send_nowait(item)
                except trio.WouldBlock:
                    pass
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass
        else:
            self.received += 1

    def close(self) -> None:
        self._send.close()

    def __aiter__(self) -> Subscription[T]:
        return self

    async def __anext__(self) -> Delivery[T]:
        try:
            return await self._recv.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

    async def receive(self) -> Delivery[T]:
        return await self._recv.receive()


def message_decoder(max_bytes: int) -> Callable[[bytes], Message]:
    return lambda data: decode(data, max_bytes)


def raw_decoder(max_bytes: int) -> Callable[[bytes], bytes]:
    def check(data: bytes) -> bytes:
        if len(data) > max_bytes:
            raise MessageTooLarge(
                f"message of {len(data)} bytes is over the limit of {max_bytes} bytes"
            )
        return data

    return check
