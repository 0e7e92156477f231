"""The actor runtime: supervised, restartable trio services sharing one bus.

An actor is a long-lived trio service: `run(ctx, task_status=...)` subscribes
to its mailbox subject(s) and calls `task_status.started()` only once
subscribed, so "ready" means "will receive". The supervisor restarts an actor
that crashes, with exponential backoff, and publishes every lifecycle event on
the bus (mesh.lifecycle.<replica>) so operators and chaos checks can see it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Protocol

import trio

from bus import subjects
from bus.client import Bus
from mesh.concurrency import single_leaf, unwrap_single
from mesh.errors import MeshError
from mesh.messages import Lifecycle

log = logging.getLogger("mesh.actors")


@dataclass
class ActorContext:
    bus: Bus
    replica: str
    started_at: float = field(default_factory=time.monotonic)
    actor_names: list[str] = field(default_factory=list)


class Actor(Protocol):
    name: str

    async def run(self, ctx: ActorContext, *, task_status: trio.TaskStatus[None] = ...) -> None: ...


class ActorStartupError(MeshError):
    pass


class Supervisor:
    """Runs a set of actors, restarting each one that crashes, independently."""

    def __init__(
        self,
        ctx: ActorContext,
        actors: list[Actor],
        *,
        backoff_base: float = 0.1,
        backoff_cap: float = 10.0,
        startup_attempts: int = 3,
        stable_after: float = 10.0,
    ) -> None:
        self.ctx = ctx
        self.actors = actors
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.startup_attempts = startup_attempts
        self.stable_after = stable_after
        self.restarts: dict[str, int] = {a.name: 0 for a in actors}
        ctx.actor_names = [a.name for a in actors]

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with unwrap_single():
            async with trio.open_nursery() as nursery:
                for actor in self.actors:
                    await nursery.start(self._supervise, actor)
                task_status.started()

    def _event(self, actor: Actor, event: str, detail: str = "") -> None:
        msg = Lifecycle(
            replica=self.ctx.replica,
            actor=actor.name,
            event=event,
            detail=detail,
            restarts=self.restarts[actor.name],
        )
        try:
            self.ctx.bus.publish_nowait(subjects.lifecycle(self.ctx.replica), msg)
        except MeshError as exc:  # lifecycle events are best effort; the actor matters more
            log.warning("lifecycle event for %s not published: %s", actor.name, exc)

    async def _supervise(self, actor: Actor, *, task_status: trio.TaskStatus[None]) -> None:
        ready = False
        failures = 0
        while True:
            started_at = 0.0
            try:
                async with trio.open_nursery() as nursery:
                    await nursery.start(actor.run, self.ctx)
                    started_at = trio.current_time()
                    self._event(actor, "started")
                    log.info("actor %s started on %s", actor.name, self.ctx.replica)
                    if not ready:
                        ready = True
                        task_status.started()
                self._event(actor, "stopped")
                return
            except Exception as caught:
                # Only an actor that ran a while earns a fresh backoff; one that crashes
                # right after starting backs off further each time.
                if started_at and trio.current_time() - started_at >= self.stable_after:
                    failures = 0
                # nursery.start wraps the actor's error in a group; report the error itself.
                exc = caught
                if isinstance(caught, BaseExceptionGroup):
                    leaf = single_leaf(caught)
                    exc = leaf if isinstance(leaf, Exception) else caught
                failures += 1
                self.restarts[actor.name] += 1
                detail = f"{type(exc).__name__}: {exc}"
                log.error("actor %s crashed (%s); restarting", actor.name, detail, exc_info=exc)
                self._event(actor, "crashed", detail)
                if not ready and failures >= self.startup_attempts:
                    raise ActorStartupError(
                        f"actor {actor.name} failed to start {failures} times; last error: {detail}"
                    ) from exc
                await trio.sleep(min(self.backoff_cap, self.backoff_base * 2 ** (failures - 1)))
