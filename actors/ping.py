"""The ping actor: answers `mesh.ping` so tools can see which replicas are alive."""

from __future__ import annotations

import time

import trio

from actors.runtime import ActorContext
from bus import subjects
from mesh import __version__
from mesh.messages import Ping, Pong


class PingActor:
    name = "ping"

    async def run(
        self, ctx: ActorContext, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        # A queue group: one replica answers each ping, spreading the load.
        async with ctx.bus.subscribe(subjects.PING, queue=subjects.PING_QUEUE) as mailbox:
            task_status.started()
            async for delivery in mailbox:
                if isinstance(delivery.body, Ping):
                    ctx.bus.reply(
                        delivery,
                        Pong(
                            replica=ctx.replica,
                            version=__version__,
                            uptime_s=round(time.monotonic() - ctx.started_at, 3),
                            actors=ctx.actor_names,
                        ),
                    )
