"""A trio-native NATS client: nats-py on a trio-asyncio loop, hidden behind trio calls.

Why this shape (figures in shared/FACTS.md): one trio->asyncio crossing costs
about 55 µs, so publishes go into a trio channel and one flusher task crosses
once per *batch*; incoming messages are handed from nats-py's callback to a
bounded trio channel without any crossing. Every error nats-py reports through a
callback is logged and counted, and the unexpected ones are raised in the bus's
nursery, so they reach the trio code that owns the bus instead of vanishing.
"""

from __future__ import annotations

import logging
import os
import random
import ssl
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import nats.errors
import trio
import trio_asyncio
from nats.aio.client import Client as NatsClient
from trio_asyncio import aio_as_trio

from bus.auth import CREDS_ENV, Credentials, is_nats_creds_file, load_credentials
from bus.errors import (
    BusClosed,
    BusConnectError,
    BusOutsideConnect,
    BusOverloaded,
    BusPermissionError,
    BusTimeout,
    NoResponders,
)
from bus.subscription import Delivery, Overflow, Subscription, message_decoder, raw_decoder
from mesh.concurrency import unwrap_single
from mesh.errors import BusError
from mesh.logthrottle import LogThrottle, held_note
from mesh.messages import MAX_MESSAGE_BYTES, Message, MessageTooLarge, decode_as, encode

log = logging.getLogger("mesh.bus")
# Every requester's replies come to an inbox: nats-py's default `_INBOX.` or the per-user
# `_INBOX.<user>.` prefix the mesh's NATS users are given (bus/auth.py).
REPLY_PREFIX = "_INBOX."
_log_throttle = LogThrottle()

M = TypeVar("M", bound=Message)
T = TypeVar("T")

# Publishes taken off the outbox in one crossing. Big enough to amortise the
# crossing, small enough that one batch does not hold the loop for long.
_MAX_BATCH = 4096
# Awaited publishes between full schedule points (see Bus.publish).
_YIELD_EVERY = 256


def redact_url(url: str) -> str:
    """nats://user:secret@host:4222 -> nats://***@host:4222"""
    scheme, sep, rest = url.partition("://")
    if sep and "@" in rest:
        return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
    return url


@dataclass(frozen=True)
class BusOptions:
    """How to reach NATS. `servers` is one URL or several (a cluster)."""

    servers: tuple[str, ...] = ("nats://127.0.0.1:4222",)
    name: str = "trio-mesh"
    user: str | None = None
    password: str | None = None
    token: str | None = None
    # A mesh credentials file (bus/auth.py) or a NATS .creds file. None and no user/token:
    # $MESH_NATS_CREDS if set (how `mesh up` hands each child its role), else anonymous.
    creds_file: str | None = None
    # Replies arrive under this subject prefix; a mesh credentials file sets it to the only
    # inbox subtree its user may subscribe to.
    inbox_prefix: str | None = None
    tls: ssl.SSLContext | None = None
    # Total time allowed for the *first* connection; afterwards the bus
    # reconnects forever with exponential backoff and jitter.
    connect_timeout: float = 5.0
    reconnect_base: float = 0.05
    reconnect_cap: float = 2.0
    max_message_bytes: int = MAX_MESSAGE_BYTES
    outbox_capacity: int = 65536

    @property
    def display_servers(self) -> str:
        """The server list for messages and logs, with any user:password@ removed."""
        return ", ".join(redact_url(u) for u in self.servers)

    @staticmethod
    def parse_servers(spec: str | Sequence[str]) -> tuple[str, ...]:
        items = [spec] if isinstance(spec, str) else list(spec)
        urls = tuple(u.strip() for item in items for u in item.split(",") if u.strip())
        for url in urls:
            if not url.startswith(("nats://", "tls://", "ws://", "wss://")):
                raise BusConnectError(
                    f"{redact_url(url)!r} is not a NATS URL: expected nats://HOST:PORT (or tls://)"
                )
        if not urls:
            raise BusConnectError("no NATS server URL given")
        return urls


@dataclass
class BusStats:
    published: int = 0
    publish_errors: int = 0
    reconnects: int = 0
    async_errors: int = 0
    replies_refused: int = 0  # requests whose reply subject was not an inbox
    drops: Counter[str] = field(default_factory=Counter)


class Bus:
    """Connected NATS client. Create with `async with connect(...) as bus`."""

    def __init__(self, options: BusOptions) -> None:
        self.options = options
        self.stats = BusStats()
        self._nc: Any = NatsClient()
        self._js: Any = None
        self._closing = False
        # True between connect() connecting and leaving its block: calls after it would
        # queue for a flusher that is gone, or cross into a closed loop.
        self._open = False
        self._outbox_send, self._outbox_recv = trio.open_memory_channel[
            tuple[str, bytes, dict[str, str] | None]
        ](options.outbox_capacity)
        self._enqueued = 0
        self._publish_calls = 0
        self._flushed = 0
        self._flush_waiters: list[tuple[int, trio.Event]] = []
        # Errors from nats-py callbacks, raised in the bus nursery by _raise_errors.
        self._errors_send, self._errors_recv = trio.open_memory_channel[BaseException](64)
        self._last_connect_error: BaseException | None = None
        self._connected_once = False
        self.credentials: Credentials | None = None  # set by _connect when a file was used
        self._auth_source = "no credentials"
        self._auth_failed = False
        # Permission violations the server reported (subject text), newest last, bounded.
        self.denied: list[str] = []
        self.denied_count = 0  # ever reported; `denied` keeps the last 64

    # -- connection -------------------------------------------------------

    @property
    def connected_url(self) -> str:
        """The server in use, without credentials (this string is logged and printed)."""
        url = self._nc.connected_url
        return f"{url.scheme}://{url.hostname}:{url.port}" if url else ""

    @property
    def is_connected(self) -> bool:
        return bool(self._nc.is_connected)

    def _pick_server(self, servers: list[Any], _info: dict[str, Any]) -> tuple[Any, float]:
        """nats-py reconnect hook: least-tried server, exponential backoff with jitter."""
        server = min(servers, key=lambda s: s.reconnects)
        o = self.options
        delay = min(o.reconnect_cap, o.reconnect_base * 2 ** min(server.reconnects, 16))
        return server, delay * random.uniform(0.5, 1.0)

    async def _on_error(self, exc: Exception) -> None:
        if not self._connected_once:
            self._last_connect_error = exc
            # Remembered apart: the server closes the socket after refusing, so the next
            # error (a reset) would hide why.
            self._auth_failed = self._auth_failed or _is_auth_error(exc)
            return
        self.stats.async_errors += 1
        if "permissions violation" in str(exc).lower():
            # The server refused one publish or subscription and keeps the connection open.
            self.stats.drops["permission"] += 1
            self.denied = [*self.denied[-63:], str(exc)]
            self.denied_count += 1
            logged, held = _log_throttle.allow(("perm", str(exc)[:200]))
            if logged:  # a misconfigured role would log every periodic publish
                log.warning("NATS refused (%s): %s%s", self._auth_source, exc, held_note(held))
            return
        if isinstance(exc, nats.errors.SlowConsumerError):
            self.stats.drops["slow-consumer"] += 1
        log.warning("NATS: %s: %s", type(exc).__name__, exc or "(no detail)")

    async def _on_disconnected(self) -> None:
        if not self._closing and self._connected_once:
            log.warning("NATS: disconnected, reconnecting")

    async def _on_reconnected(self) -> None:
        self.stats.reconnects += 1
        log.warning("NATS: reconnected to %s", self.connected_url)

    async def _on_closed(self) -> None:
        if not self._closing and self._connected_once:
            self._report(BusClosed("the NATS connection was closed by the client library"))

    def _report(self, exc: BaseException) -> None:
        try:
            self._errors_send.send_nowait(exc)
        except (trio.WouldBlock, trio.ClosedResourceError):
            log.error("bus error not reported (queue full): %r", exc)

    async def _connect(self) -> None:
        o = self.options
        kwargs: dict[str, Any] = dict(
            servers=list(o.servers),
            name=o.name,
            error_cb=self._on_error,
            disconnected_cb=self._on_disconnected,
            reconnected_cb=self._on_reconnected,
            closed_cb=self._on_closed,
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.2,
            reconnect_to_server_handler=self._pick_server,
            connect_timeout=max(1, min(2, int(o.connect_timeout))),
            ping_interval=5,
            max_outstanding_pings=3,
            tls=o.tls,
        )
        kwargs.update(self._auth_options())
        with trio.move_on_after(o.connect_timeout) as scope:
            try:
                await aio_as_trio(self._nc.connect)(**kwargs)
            except (OSError, nats.errors.Error) as exc:
                if _is_auth_error(exc) or self._auth_failed:
                    await self._close_quietly()
                    raise self._auth_refused() from None
                raise BusConnectError(
                    f"cannot connect to NATS at {o.display_servers}: {exc}"
                ) from None
        if scope.cancelled_caught:
            why = self._last_connect_error
            await self._close_quietly()
            if self._auth_failed:
                raise self._auth_refused()
            detail = f"{type(why).__name__}: {why}" if why else "no answer"
            raise BusConnectError(
                f"cannot reach NATS at {o.display_servers} within {o.connect_timeout:g} s "
                f"(last error: {detail}); is nats-server running? (`mesh nats` starts one)"
            )
        self._connected_once = True
        self._js = self._nc.jetstream(timeout=5)
        log.info("connected to NATS at %s", self.connected_url)

    def _auth_options(self) -> dict[str, Any]:
        """nats-py keyword arguments for the credentials in use. Explicit options win; then
        the file named by $MESH_NATS_CREDS; a URL's user:password@ is nats-py's own."""
        o = self.options
        out: dict[str, Any] = {}
        if o.inbox_prefix:
            out["inbox_prefix"] = o.inbox_prefix
        explicit = {k: getattr(o, k) for k in ("user", "password", "token") if getattr(o, k)}
        if explicit:
            self._auth_source = f"user {o.user!r}" if o.user else "a token"
            return {**out, **explicit}
        path = o.creds_file or os.environ.get(CREDS_ENV) or None
        if path is None:
            if any("@" in u for u in o.servers):
                self._auth_source = "the credentials in the URL"
            return out
        if is_nats_creds_file(Path(path)):
            self._auth_source = f"NATS credentials {path}"
            return {**out, "user_credentials": path}
        creds = load_credentials(path)
        self.credentials = creds
        self._auth_source = creds.describe()
        opts = creds.connect_options()
        if o.inbox_prefix:
            opts["inbox_prefix"] = o.inbox_prefix
        return {**out, **opts}

    def _auth_refused(self) -> BusConnectError:
        o = self.options
        if self._auth_source == "no credentials":
            hint = (
                "this server requires credentials: pass --creds FILE or set "
                f"{CREDS_ENV} (`mesh up` writes them under <state-dir>/nats-creds/)"
            )
        else:
            hint = f"it refused {self._auth_source}: wrong or outdated credentials?"
        return BusConnectError(f"NATS at {o.display_servers} refused the connection: {hint}")

    async def _close_quietly(self) -> None:
        self._closing = True
        with trio.CancelScope(shield=True), trio.move_on_after(2):
            try:
                await aio_as_trio(self._nc.close)()
            except Exception as exc:  # closing a half-open client: nothing left to save
                log.debug("closing NATS client: %r", exc)

    async def _drain_and_close(self) -> None:
        self._closing = True
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            if self._nc.is_connected:
                try:
                    await aio_as_trio(self._nc.drain)()
                    return
                except Exception as exc:
                    log.debug("draining NATS client: %r", exc)
        await self._close_quietly()

    def _crossing(self, fn: Callable[..., Any], what: str) -> Callable[..., Any]:
        """`aio_as_trio(fn)` for a public method, after checking that it can work here.

        trio-asyncio finds its loop in a context variable that a trio task copies from the
        task that started it; a task started outside the `connect()` block has none, and
        trio-asyncio would fail with an AttributeError on None."""
        if not self._open:
            raise self._closed_error(what)
        loop = trio_asyncio.current_loop.get()
        if loop is None or loop.is_closed():
            raise BusOutsideConnect(
                f"Bus.{what} called from a trio task started outside the `async with "
                f"connect(...)` block of this bus (NATS at {self.options.display_servers}): "
                "nats-py runs on the trio-asyncio loop that connect() opened, which only tasks "
                "started inside that block can reach; start this task from inside the block "
                "(publish and publish_nowait alone work from any task while the bus is open)")
        crossing: Callable[..., Any] = aio_as_trio(fn)
        return crossing

    # -- background tasks ------------------------------------------------

    async def _raise_errors(self) -> None:
        async for exc in self._errors_recv:
            raise exc

    async def _flusher(self) -> None:
        recv = self._outbox_recv
        async for first in recv:
            batch = [first]
            while len(batch) < _MAX_BATCH:
                try:
                    batch.append(recv.receive_nowait())
                except trio.WouldBlock:
                    break
            await aio_as_trio(self._publish_batch)(batch)
            self._flushed += len(batch)
            if self._flush_waiters:
                done = [w for w in self._flush_waiters if w[0] <= self._flushed]
                for w in done:
                    w[1].set()
                    self._flush_waiters.remove(w)

    async def _publish_batch(self, batch: list[tuple[str, bytes, dict[str, str] | None]]) -> None:
        # asyncio side: nc.publish only appends to nats-py's buffer.
        publish = self._nc.publish
        for subject, data, headers in batch:
            try:
                await publish(subject, data, headers=headers)
            except Exception as exc:  # one bad publish must not lose the rest of the batch
                self.stats.publish_errors += 1
                log.warning("publish to %s failed: %s: %s", subject, type(exc).__name__, exc)
            else:
                self.stats.published += 1

    # -- publish ----------------------------------------------------------

    def _payload(self, message: Message | bytes) -> bytes:
        limit = self.options.max_message_bytes
        if isinstance(message, Message):
            return encode(message, limit)
        if len(message) > limit:
            raise MessageTooLarge(
                f"message of {len(message)} bytes is over the limit of {limit} bytes"
            )
        return message

    def publish_nowait(
        self, subject: str, message: Message | bytes, headers: dict[str, str] | None = None
    ) -> None:
        """Queue a message; never blocks. Raises BusOverloaded if the outbox is full."""
        try:
            self._outbox_send.send_nowait((subject, self._payload(message), headers))
        except trio.WouldBlock:
            raise BusOverloaded(
                f"outgoing queue full ({self.options.outbox_capacity} messages) publishing to "
                f"{subject}: NATS is not keeping up"
            ) from None
        except trio.ClosedResourceError:  # connect() closes the outbox: no check per call
            raise self._closed_error(f"publish_nowait to {subject}") from None
        self._enqueued += 1

    async def publish(
        self, subject: str, message: Message | bytes, headers: dict[str, str] | None = None
    ) -> None:
        """Queue a message, waiting for room in the outbox if it is full.

        A full schedule point per publish would cost more than the publish
        (~20 µs), so this only checks for cancellation and yields to other
        tasks every `_YIELD_EVERY` calls; the flusher still sends batches.
        """
        item = (subject, self._payload(message), headers)
        self._publish_calls += 1
        if self._publish_calls % _YIELD_EVERY == 0:
            await trio.lowlevel.checkpoint()
        else:
            await trio.lowlevel.checkpoint_if_cancelled()
        try:
            try:
                self._outbox_send.send_nowait(item)
            except trio.WouldBlock:
                await self._outbox_send.send(item)
        except trio.ClosedResourceError:
            raise self._closed_error(f"publish to {subject}") from None
        self._enqueued += 1

    def _closed_error(self, what: str) -> BusClosed:
        return BusClosed(f"Bus.{what}: the bus to NATS at {self.options.display_servers} "
                         "was used after its `async with connect(...)` block ended")

    async def flush(self, timeout: float = 5.0) -> None:
        """Wait until everything published so far has been written to the server."""
        nc_flush = self._crossing(self._nc.flush, "flush()")
        with trio.move_on_after(timeout) as scope:
            if self._flushed < self._enqueued:
                event = trio.Event()
                self._flush_waiters.append((self._enqueued, event))
                await event.wait()
            try:
                await nc_flush(timeout=max(1, int(timeout)))
            except nats.errors.Error as exc:
                raise BusTimeout(f"NATS flush failed: {exc}") from None
        if scope.cancelled_caught:
            raise BusTimeout(f"NATS did not confirm published messages within {timeout:g} s")

    def reply(self, delivery: Delivery[Any], message: Message | bytes) -> None:
        """Answer a request on its reply subject, which must be an inbox.

        NATS does not check the reply subject a requester sets, so without this check a
        client allowed to send a request could have this connection's answer published
        anywhere this connection may publish (e.g. `$KV.mesh_ca.ca`, overwriting the sealed
        CA key, or another service's config subject)."""
        if not delivery.reply:
            return
        if not delivery.reply.startswith(REPLY_PREFIX):
            self.stats.replies_refused += 1
            logged, held = _log_throttle.allow("reply")
            if logged:
                log.warning("not answering a request on %s: its reply subject %r is not an "
                            "inbox (%s...)%s", delivery.subject, delivery.reply, REPLY_PREFIX,
                            held_note(held))
            return
        self.publish_nowait(delivery.reply, message)

    # -- subscribe --------------------------------------------------------

    @asynccontextmanager
    async def subscribe(
        self,
        subject: str,
        *,
        queue: str = "",
        capacity: int = 1024,
        overflow: Overflow = Overflow.DROP_NEWEST,
    ) -> AsyncIterator[Subscription[Message]]:
        """Subscribe to typed mesh messages; undecodable or oversized ones are dropped and counted."""
        sub = Subscription(
            subject,
            capacity,
            overflow,
            message_decoder(self.options.max_message_bytes),
            self.stats.drops,
        )
        async with self._subscribed(sub, queue):
            yield sub

    @asynccontextmanager
    async def subscribe_raw(
        self,
        subject: str,
        *,
        queue: str = "",
        capacity: int = 1024,
        overflow: Overflow = Overflow.DROP_NEWEST,
    ) -> AsyncIterator[Subscription[bytes]]:
        """Subscribe to raw payloads (size-checked, not decoded)."""
        sub = Subscription(
            subject,
            capacity,
            overflow,
            raw_decoder(self.options.max_message_bytes),
            self.stats.drops,
        )
        async with self._subscribed(sub, queue):
            yield sub

    @asynccontextmanager
    async def subscribe_decoded(
        self,
        subject: str,
        decode: Callable[[bytes], T],
        *,
        queue: str = "",
        capacity: int = 1024,
        overflow: Overflow = Overflow.DROP_NEWEST,
    ) -> AsyncIterator[Subscription[T]]:
        """Subscribe with a caller's decoder (size-checked first).

        The decoder signals bad input by raising `MessageError` (dropped and
        counted); any other exception is a bug and fails the bus.
        """
        check = raw_decoder(self.options.max_message_bytes)
        sub = Subscription(
            subject, capacity, overflow, lambda data: decode(check(data)), self.stats.drops
        )
        async with self._subscribed(sub, queue):
            yield sub

    @asynccontextmanager
    async def _subscribed(self, sub: Subscription[Any], queue: str) -> AsyncIterator[None]:
        report = self._report

        async def callback(msg: Any) -> None:
            try:
                sub.deliver(msg.subject, msg.reply, msg.data, msg.headers)
            except BaseException as exc:  # a bug in delivery must surface in trio, not in asyncio
                report(exc)

        nc_subscribe = self._crossing(self._nc.subscribe, f"subscribe({sub.subject!r})")
        denied_before = self.denied_count
        try:
            sub.nats_sub = await nc_subscribe(
                sub.subject, queue=queue, cb=callback
            )
        except nats.errors.Error as exc:
            raise BusError(f"cannot subscribe to {sub.subject}: {exc}") from None
        try:
            # Round trip so the server has the interest before the caller says it is ready.
            # A refused subscription is reported before the PONG, so it is known by now.
            try:
                await aio_as_trio(self._nc.flush)(timeout=5)
            except nats.errors.Error as exc:
                raise BusTimeout(
                    f"NATS did not confirm the subscription to {sub.subject}: {exc}"
                ) from None
            if self.was_denied("subscription", sub.subject, since=denied_before):
                raise self.permission_error(f"subscribe to {sub.subject}")
            yield
        finally:
            sub.close()
            if not self._closing:
                with trio.CancelScope(shield=True), trio.move_on_after(2):
                    try:
                        await aio_as_trio(sub.nats_sub.unsubscribe)()
                    except nats.errors.Error as exc:
                        log.debug("unsubscribe %s: %s", sub.subject, exc)

    # -- request / reply --------------------------------------------------

    async def request_raw(
        self, subject: str, message: Message | bytes, *, timeout: float = 2.0
    ) -> bytes:
        data = self._payload(message)
        nc_request = self._crossing(self._nc.request, f"request({subject!r})")
        with trio.move_on_after(timeout) as scope:
            try:
                reply = await nc_request(subject, data, timeout=timeout + 5)
            except nats.errors.NoRespondersError:
                raise NoResponders(f"nothing is listening on {subject}") from None
            except nats.errors.ConnectionClosedError:
                raise BusClosed(f"request on {subject}: the NATS connection is closed") from None
            except nats.errors.TimeoutError:
                self._raise_if_denied("publish", subject)
                raise BusTimeout(f"no reply on {subject} within {timeout:g} s") from None
        if scope.cancelled_caught:
            self._raise_if_denied("publish", subject)
            raise BusTimeout(f"no reply on {subject} within {timeout:g} s")
        payload: bytes = reply.data
        return payload

    def was_denied(self, what: str, subject: str, *, since: int = 0) -> bool:
        """Did the server refuse ``what`` ("publish", "subscription") on ``subject`` (among
        the refusals after the ``since``-th, a ``denied_count``)? A subject ending in ``.``
        matches every subject under it. (nats-py lowercases the server's text, so the
        comparison is case-insensitive.)"""
        subject = subject.lower()
        quoted = f'"{subject}' if subject.endswith(".") else f'"{subject}"'
        recent = self.denied[len(self.denied) - min(len(self.denied), self.denied_count - since) :]
        return any(what in d.lower() and quoted in d.lower() for d in recent)

    def permission_error(self, action: str) -> BusPermissionError:
        """``action``: what was refused, e.g. "publish to mesh.ca.command"."""
        return BusPermissionError(f"not allowed to {action} as {self._auth_source}")

    def _raise_if_denied(self, what: str, subject: str) -> None:
        """Turn a silent refusal (the server drops a refused publish) into a clear error."""
        if self.was_denied(what, subject):
            raise self.permission_error(f"{what} to {subject}")

    async def request(
        self, subject: str, message: Message, reply_type: type[M], *, timeout: float = 2.0
    ) -> M:
        data = await self.request_raw(subject, message, timeout=timeout)
        return decode_as(data, reply_type, self.options.max_message_bytes)

    # -- JetStream --------------------------------------------------------

    @property
    def jetstream(self) -> Any:
        """The nats-py JetStream context: for bus/ modules only."""
        return self._js


def _is_auth_error(exc: BaseException | None) -> bool:
    if exc is None:
        return False
    return isinstance(exc, nats.errors.AuthorizationError) or (
        "authorization violation" in str(exc).lower()
    )


@asynccontextmanager
async def connect(
    servers: str | Sequence[str] = "nats://127.0.0.1:4222", **options: Any
) -> AsyncIterator[Bus]:
    """Connect to NATS and yield a `Bus`; drains and closes on exit.

    Keyword options are those of `BusOptions`. Fails with BusConnectError,
    within `connect_timeout` seconds, if no server answers.
    """
    opts = BusOptions(servers=BusOptions.parse_servers(servers), **options)
    bus = Bus(opts)
    with unwrap_single():
        async with trio_asyncio.open_loop():
            await bus._connect()
            bus._open = True
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(bus._raise_errors)
                    nursery.start_soon(bus._flusher)
                    try:
                        yield bus
                        # Leaving normally: deliver what is queued before closing.
                        try:
                            await bus.flush()
                        except BusTimeout as exc:
                            log.warning("leaving the bus: %s", exc)
                    finally:
                        nursery.cancel_scope.cancel()
            finally:
                bus._open = False
                bus._outbox_send.close()
                await bus._drain_and_close()
