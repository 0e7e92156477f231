"""The config actor: resources in JetStream KV -> compiled snapshots -> sidecars, with acks.

Inputs:
  * KV `mesh_config`, key `resources`: the whole resource set, one revision per apply (the
    bucket keeps history for `mesh rollback`). Watched; every revision is re-validated.
  * `mesh.config.heartbeat`: sidecars announce themselves (service, version label, inbound
    and admin address) and what they run. This is the endpoint registry.
  * `mesh.config.full` (request/reply): a sidecar asks for its full snapshot.
  * `mesh.config.ack`: ACK / NACK of every applied push.
  * `mesh.config.status` (request/reply): `mesh status`.

Bursts of changes (resources or endpoints) are debounced, then every service with sidecars is
compiled (mesh/compile.py) and each changed snapshot goes out as one delta on
`mesh.config.push.<service>` (mesh/sync.py keeps the books).

Several replicas: every replica runs this actor hot (same KV, same heartbeats, same acks), so
each has the same books; compilation is deterministic and versions are content digests, so
whichever replica answers a full-snapshot request (a queue group) gives the same answer. Only
the holder of the `config` lease (actors/lease.py) pushes deltas and heals lagging sidecars;
a standby that takes over needs no hand-over, since heartbeats show it who is behind. A replica
that starts waits `warmup` seconds collecting heartbeats before it compiles, so that it never
pushes a mesh with endpoints missing.
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from actors.lease import Lease, LeaseTerm, open_leases
from actors.runtime import ActorContext
from bus import subjects
from bus.client import Bus
from bus.kv import INITIAL_DONE, KV, KVEntry, open_kv
from bus.subscription import Delivery, Overflow
from mesh.compile import compile_service
from mesh.errors import ConfigError, MeshError
from mesh.logthrottle import LogThrottle, held_note
from mesh.messages import (
    ConfigAck,
    ConfigHeartbeat,
    ConfigStatus,
    ConfigStatusRequest,
    Message,
    SnapshotPush,
    SnapshotRequest,
    encode,
)
from mesh.resources import ResourceSet, decode_set
from mesh.sync import ServerSync

log = logging.getLogger("mesh.actors.config")
# A misbehaving sidecar can send thousands of forged messages a second: a few lines per 10 s.
_log_throttle = LogThrottle()

KV_HISTORY = 64
LEASE_NAME = "config"  # JetStream's maximum: revisions kept for rollback


class ConfigActor:
    name = "config"

    def __init__(
        self,
        *,
        debounce: float = 0.02,
        max_delay: float = 0.25,
        warmup: float = 1.5,
        lease_ttl: float = 3.0,
        poll: float = 5.0,
    ) -> None:
        self.debounce = debounce
        self.max_delay = max_delay
        self.warmup = warmup
        self.lease_ttl = lease_ttl
        self.poll = poll

    async def run(
        self, ctx: ActorContext, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        state = _ConfigState(self, ctx)
        await state.run(task_status=task_status)


class _ConfigState:
    """One run of the actor (a restart starts from nothing)."""

    def __init__(self, actor: ConfigActor, ctx: ActorContext) -> None:
        self.a = actor
        self.ctx = ctx
        self.bus: Bus = ctx.bus
        self.sync = ServerSync()
        self.resources: ResourceSet = {}
        self.revision = 0
        self.warm_at = trio.current_time() + actor.warmup
        self.warm = trio.Event()
        self._dirty = trio.Event()
        self.leading = False
        self._refused = 0  # the last stored revision that failed validation
        self.compiled_revision = 0  # the revision the current snapshots were compiled from
        self._full_cache: dict[str, tuple[str, bytes]] = {}
        self.stats: dict[str, Any] = {
            "compiles": 0,
            "pushes": 0,
            "push_bytes": 0,
            "full_replies": 0,
            "full_bytes": 0,
            "acks": 0,
            "nacks": 0,
            "heartbeats": 0,
            "last_change_bytes": 0,
            "impersonations": 0,
        }

    def now(self) -> float:
        return trio.current_time()

    def mark_dirty(self) -> None:
        self._dirty.set()

    async def _lead(self) -> None:
        leases = await open_leases(self.bus)
        lease = Lease(leases, LEASE_NAME, self.ctx.replica, ttl=self.a.lease_ttl)

        async def lead(term: LeaseTerm) -> None:
            log.info("%s leads config pushes", self.ctx.replica)
            self.leading = True
            try:
                await trio.sleep_forever()
            finally:
                self.leading = False

        await lease.run_as_leader(lead)

    async def run(self, *, task_status: trio.TaskStatus[None]) -> None:
        kv = await open_kv(self.bus, subjects.KV_CONFIG, history=KV_HISTORY)
        bus = self.bus
        async with (
            bus.subscribe(
                subjects.CONFIG_FULL_ALL, queue=subjects.CONFIG_QUEUE, capacity=65536
            ) as full,
            bus.subscribe(
                subjects.CONFIG_HEARTBEAT_ALL, capacity=65536, overflow=Overflow.DROP_OLDEST
            ) as heartbeats,
            bus.subscribe(
                subjects.CONFIG_ACK_ALL, capacity=65536, overflow=Overflow.DROP_OLDEST
            ) as acks,
            bus.subscribe(subjects.CONFIG_STATUS, queue=subjects.CONFIG_QUEUE) as status,
            kv.watch(subjects.CONFIG_KEY) as watch,
            trio.open_nursery() as nursery,
        ):
            async for item in watch:
                if item is INITIAL_DONE:
                    break
                assert isinstance(item, KVEntry)
                self._take(item)
            nursery.start_soon(self._watch_rest, watch)
            nursery.start_soon(self._poll, kv)
            nursery.start_soon(self._serve_full, full)
            nursery.start_soon(self._serve_heartbeats, heartbeats)
            nursery.start_soon(self._serve_acks, acks)
            nursery.start_soon(self._serve_status, status)
            nursery.start_soon(self._lead)
            nursery.start_soon(self._compiler)
            nursery.start_soon(self._expirer)
            log.info(
                "config actor on %s: revision %d, %d resources, warm in %.1f s",
                self.ctx.replica,
                self.revision,
                len(self.resources),
                self.a.warmup,
            )
            task_status.started()

    # -- resources ------------------------------------------------------

    def _take(self, entry: KVEntry) -> None:
        if entry.deleted:
            resources: ResourceSet = {}
        else:
            try:
                resources, _ = decode_set(entry.value)
            except ConfigError as exc:  # written by something that skipped validation
                log.error(
                    "config revision %d refused, keeping %d: %s", entry.revision, self.revision, exc
                )
                self._refused = entry.revision
                return
        self.resources, self.revision = resources, entry.revision
        self.mark_dirty()

    async def _watch_rest(self, watch: Any) -> None:
        async for item in watch:
            if isinstance(item, KVEntry) and item.revision > self.revision:
                self._take(item)

    async def _poll(self, kv: KV) -> None:
        """Belt and braces: a watch that silently died (server restarts) must not leave this
        replica on an old revision forever, so read the key every `poll` seconds too."""
        while True:
            await trio.sleep(self.a.poll)
            try:
                entry = await kv.get(subjects.CONFIG_KEY)
            except MeshError as exc:
                log.debug("config poll: %s", exc)
                continue
            if entry is not None and entry.revision > max(self.revision, self._refused):
                log.warning("config revision %d seen by polling, not by the watch", entry.revision)
                self._take(entry)

    # -- compile and push ------------------------------------------------

    async def _compiler(self) -> None:
        await trio.sleep_until(self.warm_at)
        self.warm.set()
        while True:
            await self._dirty.wait()
            first = self.now()
            while True:  # debounce: wait for a quiet spell, but not longer than max_delay
                self._dirty = trio.Event()
                quiet = min(self.a.debounce, first + self.a.max_delay - self.now())
                if quiet <= 0:
                    break
                with trio.move_on_after(quiet):
                    await self._dirty.wait()
                    continue
                break
            self.recompile()

    def _compile(self, services: set[str]) -> dict[str, Any]:
        registrations = self.sync.registrations()
        out = {}
        for service in sorted(services):
            try:
                out[service] = compile_service(self.resources, registrations, service)
            except ConfigError as exc:
                log.error("cannot compile for %s, keeping its last snapshot: %s", service, exc)
                state = self.sync.services.get(service)
                if state is not None:
                    out[service] = state.compiled
        self.stats["compiles"] += 1
        return out

    def nothing_good_read(self) -> bool:
        """The stored set was refused and nothing good was ever read: compiling from nothing
        would send empty snapshots (no routes, no authorization) to every sidecar. They
        keep their last good configuration instead, until a readable set is stored."""
        return self.revision == 0 and self._refused > 0

    def recompile(self) -> None:
        if self.nothing_good_read():
            return
        revision = self.revision
        pushes = self.sync.update(self._compile(self.sync.wanted_services()), now=self.now())
        self.compiled_revision = revision  # status reports this: what sidecars are compared to
        if not pushes:
            return
        sent = 0
        for push in pushes:
            if self.leading:
                data = encode(push)
                self._publish(subjects.config_push(push.service), data)
                sent += len(data)
                self.stats["pushes"] += 1
        self.stats["push_bytes"] += sent
        self.stats["last_change_bytes"] = sent
        log.info("revision %d: pushed %d delta(s), %d bytes", self.revision, len(pushes), sent)

    def _publish(self, subject: str, message: Message | bytes) -> None:
        try:
            self.bus.publish_nowait(subject, message)
        except MeshError as exc:
            log.warning("config push on %s not sent: %s", subject, exc)

    def _full_bytes(self, service: str) -> bytes | None:
        state = self.sync.services.get(service)
        if state is None:
            if not self.warm.is_set() or self.nothing_good_read():
                return None
            self.sync.update(self._compile({service}), prune=False)
            state = self.sync.services.get(service)
            if state is None:
                return None
        version = state.compiled.version
        cached = self._full_cache.get(service)
        if cached is None or cached[0] != version:
            push = SnapshotPush(
                service=service,
                version=version,
                base="",
                nonce=state.nonce,
                full=True,
                body=state.compiled.snapshot,
            )
            cached = (version, encode(push))
            self._full_cache[service] = cached
        return cached[1]

    # -- mailboxes ------------------------------------------------------

    def _from_sender(self, d: Delivery[Any], body: Any) -> bool:
        """True if `body` (service and instance) is what its subject names. The subject is
        what the sender's NATS user may publish on (bus/auth.py binds a sidecar's user to its
        service and instance), the body is what the sender says: a sidecar of one service
        could otherwise register, or unregister with a `leaving` heartbeat, another
        service's endpoints by naming them in the body of a message on its own subject."""
        if subjects.config_sender(d.subject) == (body.service, body.instance):
            return True
        self.stats["impersonations"] += 1
        logged, held = _log_throttle.allow("impersonation")
        if logged:
            log.warning(
                "dropped a %s on %s naming service %r instance %r: not the subject's%s",
                type(body).__name__,
                d.subject,
                str(body.service)[:64],
                str(body.instance)[:64],
                held_note(held),
            )
        return False

    async def _serve_full(self, mailbox: Any) -> None:
        async for d in mailbox:
            req = d.body
            if not isinstance(req, SnapshotRequest) or not self._from_sender(d, req):
                continue
            if not self.sync.acceptable(req):
                log.warning("snapshot request with unusable names dropped (service %r, "
                            "instance %r)", req.service[:64], req.instance[:64])
                continue
            if self.sync.on_request(req, self.now()):
                self.mark_dirty()
            await self.warm.wait()
            data = self._full_bytes(req.service)
            if data is None:
                continue
            self._reply(d, data)
            self.stats["full_replies"] += 1
            self.stats["full_bytes"] += len(data)

    async def _serve_heartbeats(self, mailbox: Any) -> None:
        async for d in mailbox:
            hb = d.body
            if not isinstance(hb, ConfigHeartbeat) or not self._from_sender(d, hb):
                continue
            self.stats["heartbeats"] += 1
            changed, push = self.sync.on_heartbeat(hb, self.now())
            if changed:
                self.mark_dirty()
            if push is not None and self.warm.is_set() and self.leading:
                data = encode(push)
                self._publish(subjects.config_push(push.service), data)
                self.stats["full_bytes"] += len(data)

    async def _serve_acks(self, mailbox: Any) -> None:
        async for d in mailbox:
            ack = d.body
            if isinstance(ack, ConfigAck) and self._from_sender(d, ack):
                self.stats["acks" if ack.ok else "nacks"] += 1
                if not ack.ok:
                    log.warning(
                        "%s (%s) refused %s: %s", ack.instance, ack.service, ack.version, ack.reason
                    )
                self.sync.on_ack(ack, self.now())

    async def _serve_status(self, mailbox: Any) -> None:
        d: Delivery[Any]
        async for d in mailbox:
            req = d.body
            if not isinstance(req, ConfigStatusRequest):
                continue
            rows = [
                r
                for r in self.sync.status(self.now())
                if not req.service or r["service"] == req.service
            ]
            counts: dict[str, int] = {}
            for r in rows:
                counts[r["status"]] = counts.get(r["status"], 0) + 1
            self._reply(
                d,
                ConfigStatus(
                    replica=self.ctx.replica,
                    revision=self.compiled_revision,
                    sidecars=rows[req.offset : req.offset + max(0, req.limit)],
                    stats={
                        **self.stats,
                        "leading": self.leading,
                        "warm": self.warm.is_set(),
                        "stored_revision": self.revision,
                    },
                    total=len(rows),
                    counts=counts,
                ),
            )

    def _reply(self, delivery: Delivery[Any], message: Message | bytes) -> None:
        try:
            self.bus.reply(delivery, message)
        except MeshError as exc:  # too large, outbox full: the asker times out, we go on
            log.warning("reply not sent: %s", exc)

    async def _expirer(self) -> None:
        while True:
            await trio.sleep(0.5)
            if self.sync.expire(self.now()):
                self.mark_dirty()
