"""One control-plane replica: a process that connects to NATS and supervises the actors."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import trio

from actors.ca import CaActor
from actors.config import ConfigActor
from actors.dashboard import DashboardActor
from actors.ping import PingActor
from actors.runtime import Actor, ActorContext, Supervisor
from actors.telemetry import TelemetryActor
from bus.client import connect

log = logging.getLogger("mesh.controlplane")


def default_actors() -> list[Actor]:
    return [
        PingActor(),
        CaActor(),
        TelemetryActor.from_env(),
        DashboardActor.from_env(),
        ConfigActor(),
    ]


async def run_replica(
    nats: Sequence[str],
    replica: str,
    *,
    actors: list[Actor] | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled. Reports started once every actor is subscribed."""
    async with connect(nats, name=f"controlplane-{replica}") as bus:
        ctx = ActorContext(bus=bus, replica=replica)
        supervisor = Supervisor(ctx, actors if actors is not None else default_actors())
        async with trio.open_nursery() as nursery:
            await nursery.start(supervisor.run)
            log.info("control-plane replica %s ready on %s", replica, bus.connected_url)
            task_status.started()
