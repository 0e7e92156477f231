"""An idle sidecar's telemetry wakes the process as rarely as its documented cadence allows:
on a small VM each wakeup costs ~0.25 ms of CPU however little it does, so the batch
publisher and the span shipper tick on one grid and share their wakeups. Checked by counting
trio's waits for I/O (a structural check, not a timing one); CPU figures are measured by hand
(a real `mesh sidecar`, /proc/PID/schedstat), not asserted."""

from __future__ import annotations

import trio

from bus.server import NatsServer
from sidecar.telemetry import SidecarTelemetry, TelemetryOptions


class IoWaits(trio.abc.Instrument):
    """Numbers trio's waits for I/O: tasks woken by the same wait share a number."""

    def __init__(self) -> None:
        self.n = 0

    def after_io_wait(self, timeout: float) -> None:
        self.n += 1


async def test_every_batch_tick_shares_its_wakeup_with_a_span_tick(
    nats_server: NatsServer,
) -> None:
    tel = SidecarTelemetry("idle", "idle-1", TelemetryOptions(interval=0.5),
                           nats=[nats_server.url])
    waits = IoWaits()
    published: list[int] = []
    shipped: list[int] = []
    publish_once, ship_once = tel.publisher.publish_once, tel.shipper.ship_once

    def publish() -> int:
        published.append(waits.n)
        return publish_once()

    async def ship() -> None:
        shipped.append(waits.n)
        await ship_once()

    tel.publisher.publish_once = publish  # type: ignore[method-assign]
    tel.shipper.ship_once = ship  # type: ignore[method-assign]
    trio.lowlevel.add_instrument(waits)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(tel.run)
            await trio.sleep(2.2)  # four batch ticks (0.5 s), four span ticks (0.5 s)
            nursery.cancel_scope.cancel()
    finally:
        trio.lowlevel.remove_instrument(waits)
    ticks = published[:4]  # the rest: the final publish on the way out
    assert len(ticks) == 4, published
    assert [t for t in ticks if t not in shipped] == [], (published, shipped)
