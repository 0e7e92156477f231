"""The sidecar's side of config sync: register, fetch, apply, ACK/NACK, heartbeat, survive.

The protocol state lives in `mesh.sync.ClientSync` (pure); this is the trio shell around it.
Static stability: the sidecar never waits on the control plane to serve. If NATS or the
control plane is gone it keeps its last good snapshot, keeps heartbeating into the void and
reconnecting, and resyncs (a full snapshot) when they are back.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import trio

from bus import subjects
from bus.client import Bus, connect
from bus.subscription import Overflow
from mesh.errors import ConfigError, MeshError
from mesh.messages import SnapshotPush
from mesh.snapshot import Snapshot
from mesh.sync import Apply, ClientSync, Ignore, RequestFull

log = logging.getLogger("mesh.sidecar.sync")

# Applies a checked snapshot; returns None when it is in force, else why it was refused.
Applier = Callable[[Snapshot], "str | None"]


def default_instance(service: str, label: str) -> str:
    host = os.uname().nodename.split(".")[0]
    return subjects.token(f"{service}-{label}-{host}-{os.getpid()}"[:128])


class SyncClient:
    def __init__(
        self,
        servers: Sequence[str],
        state: ClientSync,
        apply: Applier,
        *,
        heartbeat: float = 1.0,
        request_timeout: float = 3.0,
        initial_wait: float = 5.0,
        connect_timeout: float = 2.0,
    ) -> None:
        self.servers = list(servers)
        self.state = state
        self._apply = apply
        self.heartbeat = heartbeat
        self.request_timeout = request_timeout
        self.initial_wait = initial_wait
        self.connect_timeout = connect_timeout
        self.first = trio.Event()
        self.connected = False
        self._bus: Bus | None = None
        # Shutdown (see `leave`): asked for, then done (the last session and its bus closed).
        self._leaving = trio.Event()
        self._stopped = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Reports started once the first snapshot is applied (or refused), or after
        `initial_wait` seconds without a control plane; then keeps syncing until cancelled."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._forever)
            with trio.move_on_after(self.initial_wait):
                await self.first.wait()
            if not self.first.is_set():
                log.warning(
                    "no snapshot from the control plane within %.1f s; serving with "
                    "what this sidecar has and retrying",
                    self.initial_wait,
                )
            task_status.started()

    async def _forever(self) -> None:
        try:
            await self._sessions()
        finally:
            self._stopped.set()

    async def _sessions(self) -> None:
        delay = 0.1
        while not self._leaving.is_set():  # after a leave, no reconnecting
            try:
                async with connect(
                    self.servers,
                    name=f"sidecar-{self.state.instance}",
                    connect_timeout=self.connect_timeout,
                ) as bus:
                    self.connected = True
                    delay = 0.1
                    await self._session(bus)
            except MeshError as exc:
                log.warning(
                    "config sync: %s; keeping version %s",
                    exc,
                    self.state.version or "(none from the control plane yet)",
                )
                self.first.set()  # no NATS: start serving what this sidecar has, now
            except Exception:  # a bug here must not take the data plane down: log, go on
                log.exception("config sync failed; keeping version %s", self.state.version)
            finally:
                self.connected = False
            if self._leaving.is_set():
                return
            await trio.sleep(delay)
            delay = min(2.0, delay * 2)

    async def _session(self, bus: Bus) -> None:
        st = self.state
        async with (
            bus.subscribe(
                subjects.config_push(st.service), capacity=64, overflow=Overflow.DROP_OLDEST
            ) as pushes,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(self._heartbeats, bus)
            nursery.start_soon(self._leave_when_asked, bus, nursery.cancel_scope)
            self._bus = bus
            try:
                await self._fetch(bus, "start" if not st.version else "reconnect")
                async for d in pushes:
                    if isinstance(d.body, SnapshotPush):
                        await self._handle(bus, d.body)
            finally:
                self._bus = None

    async def _handle(self, bus: Bus, push: SnapshotPush) -> None:
        action = self.state.on_push(push)
        if isinstance(action, Apply):
            self._try_apply(bus, action)
        elif isinstance(action, RequestFull):
            log.warning("config sync: %s; asking for a full snapshot", action.reason)
            await self._fetch(bus, action.reason)
        elif isinstance(action, Ignore):
            log.debug("config push ignored: %s", action.reason)

    def _try_apply(self, bus: Bus, action: Apply) -> None:
        error: str | None
        try:
            error = self._apply(Snapshot.from_dict(action.snapshot))
        except ConfigError as exc:
            error = str(exc)
        except Exception as exc:  # refuse what we cannot load, whatever the reason
            log.exception("loading config version %s failed", action.version)
            error = f"internal error loading the snapshot: {type(exc).__name__}: {exc}"
        ack = self.state.applied(error)
        if error is None:
            log.info("config version %s applied", action.version)
        else:
            log.error(
                "config version %s refused, keeping %s: %s",
                action.version,
                self.state.version or "(none from the control plane yet)",
                error,
            )
        self.first.set()
        try:
            bus.publish_nowait(subjects.config_ack(self.state.service, self.state.instance), ack)
        except MeshError as exc:
            log.warning("ack not sent: %s", exc)

    async def _fetch(self, bus: Bus, reason: str) -> None:
        """Ask for a full snapshot until one arrives (the control plane may be away)."""
        delay = 0.2
        while True:
            try:
                push = await bus.request(
                    subjects.config_full(self.state.service, self.state.instance),
                    self.state.hello(reason),
                    SnapshotPush,
                    timeout=self.request_timeout,
                )
            except MeshError as exc:
                log.info("full snapshot request: %s; retrying", exc)
                await trio.sleep(delay)
                delay = min(2.0, delay * 2)
                continue
            action = self.state.on_push(push)
            if isinstance(action, Apply):
                self._try_apply(bus, action)
            else:
                self.first.set()
            return

    @property
    def _heartbeat_subject(self) -> str:
        # Service and instance in the subject: what this sidecar's NATS user may speak for.
        return subjects.config_heartbeat(self.state.service, self.state.instance)

    async def _heartbeats(self, bus: Bus) -> None:
        # A heartbeat queued after the leaving one would register this instance again.
        while not self._leaving.is_set():
            try:
                bus.publish_nowait(self._heartbeat_subject, self.state.heartbeat(self.heartbeat))
            except MeshError as exc:
                log.debug("heartbeat not sent: %s", exc)
            await trio.sleep(self.heartbeat)

    async def _leave_when_asked(self, bus: Bus, session: trio.CancelScope) -> None:
        """Runs in the session, inside the bus's `async with`: the bus (its trio-asyncio
        loop and its flusher) is open while the leaving heartbeat is sent and flushed."""
        await self._leaving.wait()
        try:
            bus.publish_nowait(
                self._heartbeat_subject, self.state.heartbeat(self.heartbeat, leaving=True)
            )
            await bus.flush(timeout=0.5)
        except MeshError as exc:  # NATS away: the control plane expires us instead
            log.debug("leaving message not sent: %s", exc)
        # Ends the session; `connect` then flushes, drains and closes the bus as usual.
        session.cancel()

    async def leave(self, timeout: float = 2.0) -> None:
        """Before shutting down: tell the control plane this instance is going, so its
        endpoint is removed at once instead of after the heartbeat expiry; then close the
        bus. Returns once the sync client has stopped, or after `timeout` seconds (the
        caller's cancellation then stops the rest, the bus's close being shielded).

        The message is sent by the session task, not by the caller: the bus's calls into
        nats-py need the trio-asyncio loop that `connect` opened, which only tasks started
        inside it can see (a task from outside finds no loop at all)."""
        self._leaving.set()
        if self._bus is None:  # no session (not connected yet, or NATS away): nothing to tell
            return
        with trio.move_on_after(timeout):
            await self._stopped.wait()

def describe(client: SyncClient) -> dict[str, Any]:
    st = client.state
    return {
        "instance": st.instance,
        "connected": client.connected,
        "version": st.version,
        "nacked": st.nacked,
        "reason": st.reason,
        "resyncs": st.resyncs,
    }
