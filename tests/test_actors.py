"""The actor runtime on a real nats-server: restarts, lifecycle events, startup failures."""

from __future__ import annotations

import pytest
import trio

from actors.runtime import ActorContext, ActorStartupError, Supervisor
from bus import subjects
from bus.client import connect
from bus.server import NatsServer
from mesh.messages import Blob, Lifecycle


class Flaky:
    """Subscribes, then crashes on its first two messages."""

    name = "flaky"

    def __init__(self) -> None:
        self.runs = 0

    async def run(
        self, ctx: ActorContext, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        self.runs += 1
        async with ctx.bus.subscribe("t.flaky") as sub:
            task_status.started()
            async for _ in sub:
                if self.runs <= 2:
                    raise RuntimeError(f"crash number {self.runs}")


class NeverStarts:
    name = "broken"

    async def run(
        self, ctx: ActorContext, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        raise ValueError("missing setting X")


async def test_crashed_actor_is_restarted_and_events_are_published(nats_server: NatsServer) -> None:
    flaky = Flaky()
    async with connect(nats_server.url) as bus, bus.subscribe(subjects.LIFECYCLE_ALL) as events:
        supervisor = Supervisor(ActorContext(bus, "r1"), [flaky], backoff_base=0.01)
        async with trio.open_nursery() as nursery:
            await nursery.start(supervisor.run)
            seen: list[tuple[str, int]] = []
            with trio.fail_after(10):
                async for d in events:
                    assert isinstance(d.body, Lifecycle) and d.subject == "mesh.lifecycle.r1"
                    seen.append((d.body.event, d.body.restarts))
                    if d.body.event == "started":
                        bus.publish_nowait("t.flaky", Blob(label="poke", data=b""))
                    if len(seen) == 5:
                        break
            nursery.cancel_scope.cancel()
    assert seen == [("started", 0), ("crashed", 1), ("started", 1), ("crashed", 2), ("started", 2)]
    assert flaky.runs == 3


async def test_actor_that_cannot_start_fails_the_replica_with_its_reason(
    nats_server: NatsServer,
) -> None:
    async with connect(nats_server.url) as bus:
        supervisor = Supervisor(ActorContext(bus, "r1"), [NeverStarts()], backoff_base=0.01)
        with pytest.raises(
            ActorStartupError,
            match="broken failed to start 3 times; last error: ValueError: missing setting X",
        ):
            await supervisor.run()
