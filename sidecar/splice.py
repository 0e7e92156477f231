"""Copy bytes both ways between two streams until both directions end (tunnels, TCP).

Counting is per chunk but costs one attribute addition (`ByteCount.n += len(data)`):
no dict lookup and no clock read on the path. The counters double as the idle
detector: a watchdog wakes a few times per `idle_timeout` and closes the splice
when neither counter moved for a whole timeout (Envoy's tcp_proxy `idle_timeout`,
default 1 h). So a connection is closed between `idle_timeout` and
`idle_timeout * (1 + 1/IDLE_CHECKS)` after its last byte.
"""

from __future__ import annotations

import math

import trio

_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)

DEFAULT_IDLE_TIMEOUT = 3600.0  # seconds, as Envoy's tcp_proxy
IDLE_CHECKS = 4  # watchdog wake-ups per idle timeout


class ByteCount:
    """Bytes copied in one direction; read by telemetry while the splice runs."""

    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0


async def _pump(
    src: trio.abc.Stream, dst: trio.abc.Stream, both: trio.CancelScope, count: ByteCount
) -> None:
    try:
        while True:
            data = await src.receive_some(65536)
            if not data:
                break
            count.n += len(data)
            await dst.send_all(data)
        # Pass the half-close on, so request/response protocols over TCP still end.
        if isinstance(dst, trio.abc.HalfCloseableStream):
            await dst.send_eof()
        else:
            both.cancel()
    except _ERRORS:
        # A reset on one side ends the tunnel: the other direction has nowhere to go.
        both.cancel()


async def _watch_idle(
    timeout: float, a_to_b: ByteCount, b_to_a: ByteCount, both: trio.CancelScope,
    idled: list[bool],
) -> None:
    step = timeout / IDLE_CHECKS
    seen = (a_to_b.n, b_to_a.n)
    quiet_since = trio.current_time()
    while True:
        await trio.sleep(step)
        now_counts = (a_to_b.n, b_to_a.n)
        now = trio.current_time()
        if now_counts != seen:
            seen, quiet_since = now_counts, now
        elif now - quiet_since >= timeout:
            idled.append(True)
            both.cancel()
            return


async def splice(
    a: trio.abc.Stream,
    b: trio.abc.Stream,
    *,
    idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT,
    a_to_b: ByteCount | None = None,
    b_to_a: ByteCount | None = None,
) -> bool:
    """Copy until both directions end, one fails, or nothing moved for `idle_timeout`
    seconds (None or inf: never). Returns True when it
    ended for idleness; the caller closes both streams either way. `a_to_b`/`b_to_a`
    count the bytes copied."""
    up = a_to_b if a_to_b is not None else ByteCount()
    down = b_to_a if b_to_a is not None else ByteCount()
    idled: list[bool] = []
    async with trio.open_nursery() as nursery:
        pumps = trio.CancelScope()

        async def both_ways() -> None:
            with pumps:
                async with trio.open_nursery() as inner:
                    inner.start_soon(_pump, a, b, inner.cancel_scope, up)
                    inner.start_soon(_pump, b, a, inner.cancel_scope, down)
            nursery.cancel_scope.cancel()  # the watchdog too

        nursery.start_soon(both_ways)
        if idle_timeout is not None and math.isfinite(idle_timeout) and idle_timeout > 0:
            nursery.start_soon(_watch_idle, idle_timeout, up, down, pumps, idled)
    return bool(idled)
