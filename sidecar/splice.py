"""Copy bytes both ways between two streams until both directions end (tunnels, TCP)."""

from __future__ import annotations

import trio

_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


async def _pump(src: trio.abc.Stream, dst: trio.abc.Stream, both: trio.CancelScope) -> None:
    try:
        while True:
            data = await src.receive_some(65536)
            if not data:
                break
            await dst.send_all(data)
        # Pass the half-close on, so request/response protocols over TCP still end.
        if isinstance(dst, trio.abc.HalfCloseableStream):
            await dst.send_eof()
        else:
            both.cancel()
    except _ERRORS:
        # A reset on one side ends the tunnel: the other direction has nowhere to go.
        both.cancel()


async def splice(a: trio.abc.Stream, b: trio.abc.Stream) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_pump, a, b, nursery.cancel_scope)
        nursery.start_soon(_pump, b, a, nursery.cancel_scope)
