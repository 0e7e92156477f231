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


def http_ports(actors: Sequence[Actor]) -> dict[str, int | None]:
    """The HTTP ports this replica's actors bound (None: off), once they have started.

    A busy port makes an actor fall back to an ephemeral one (actors/httpserve.py), so
    only the bound port is worth telling a user: `mesh up` prints these in its banner."""
    ports: dict[str, int | None] = {"dashboard": None, "metrics": None}
    for actor in actors:
        if isinstance(actor, DashboardActor) and actor.port_wanted is not None:
            ports["dashboard"] = actor.port
        elif isinstance(actor, TelemetryActor) and actor.metrics_port_wanted is not None:
            ports["metrics"] = actor.metrics_port
    return ports


async def run_replica(
    nats: Sequence[str],
    replica: str,
    *,
    actors: list[Actor] | None = None,
    task_status: trio.TaskStatus[dict[str, int | None]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled. Reports started, with the HTTP ports bound (`http_ports`),
    once every actor is subscribed and listening."""
    if actors is None:
        actors = default_actors()
    async with connect(nats, name=f"controlplane-{replica}") as bus:
        ctx = ActorContext(bus=bus, replica=replica)
        supervisor = Supervisor(ctx, actors)
        async with trio.open_nursery() as nursery:
            await nursery.start(supervisor.run)
            log.info("control-plane replica %s ready on %s", replica, bus.connected_url)
            task_status.started(http_ports(actors))
