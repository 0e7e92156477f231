"""Leader election for singleton actors, on a JetStream key-value bucket.

One key per lease (``mesh_leases/<name>``) holds a ``LeaseRecord`` (holder, ttl). The rules:

* **Acquire**: ``create`` the key (only succeeds if it is absent or deleted): exactly one
  contender wins, the others get ``KVConflict``.
* **Heartbeat**: the holder rewrites the key every ``ttl / 3`` with a compare-and-swap
  ``update(key, value, revision)``. A conflict means someone took the lease over: the holder
  has lost it and its work is cancelled at once.
* **Expiry without clocks**: a standby polls the key and remembers, *on its own monotonic
  clock*, when it first saw the current revision. If the revision has not moved for the
  record's ``ttl``, the holder is presumed dead and the standby takes over with a CAS update on
  that exact revision (two standbys racing: one wins). No wall-clock comparison between hosts
  is involved, so clock skew cannot elect two leaders.
* **The holder steps down first**: it counts ``ttl`` from the *start* of its last successful
  heartbeat and gives the lease up (cancelling its work) at ``0.75 * ttl`` without a confirmed
  heartbeat, i.e. before any standby can have seen the revision unchanged for ``ttl``. A
  partitioned leader therefore stops before the new one starts.
* **Release**: a clean stop deletes the key (conditional on the holder's revision), so a
  standby takes over on its next poll instead of waiting for the ttl.

A holder that finds a record under its *own* holder identity (its previous incarnation crashed
and was restarted by the actor supervisor, in the same process) takes it back at once. The
identity stored is the holder name plus a random id per process, so two processes given the
same name (a second `mesh up` against the same NATS, say) compete instead of co-leading; a
restarted *process* waits out the ttl like any standby.

Use::

    lease = Lease(kv, "ca", holder="cp-1", ttl=3.0)
    await lease.run_as_leader(serve)        # serve() runs only while leader; cancelled on loss

or, for one term::

    async with lease.held() as term:        # waits until leader
        ...                                 # cancelled (LeaseLost raised) if leadership is lost
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio

from bus import subjects
from bus.client import Bus
from bus.errors import KVConflict
from bus.kv import KV, open_kv
from mesh.concurrency import unwrap_single
from mesh.errors import BusError, MeshError
from mesh.messages import LeaseRecord, MessageError, decode_as, encode

log = logging.getLogger("mesh.lease")

__all__ = ["Lease", "LeaseLost", "LeaseTerm", "open_leases"]

# Distinguishes this process from any other using the same holder name.
_PROCESS_ID = secrets.token_hex(4)

# Fraction of the ttl after the last confirmed heartbeat at which a holder gives up.
_STEP_DOWN = 0.75


class LeaseLost(MeshError):
    """Leadership ended while the holder's work was running (taken over, or unconfirmed)."""


@dataclass
class LeaseTerm:
    """One period of leadership: which revision the holder wrote last, and since when."""

    name: str
    holder: str
    revision: int
    acquired_at: float  # trio.current_time()
    confirmed_until: float = 0.0  # leadership is certain until then (trio time)

    def valid(self) -> bool:
        """True while no standby can have taken over. Check before a side effect that must
        not happen twice: after a pause (SIGSTOP, a long GC) work may run for a moment before
        the heartbeat notices the loss."""
        return trio.current_time() < self.confirmed_until


async def open_leases(bus: Bus, *, replicas: int = 1) -> KV:
    """The lease bucket. History 1: only the current holder matters."""
    return await open_kv(bus, subjects.KV_LEASES, replicas=replicas, history=1)


class Lease:
    """A named lease that ``holder`` competes for. Cheap; create one per singleton."""

    def __init__(
        self, kv: KV, name: str, holder: str, *, ttl: float = 3.0, poll: float | None = None
    ) -> None:
        if ttl <= 0:
            raise ValueError("lease ttl must be positive")
        self.kv = kv
        self.name = subjects.token(name)
        self.holder = holder
        self._identity = f"{holder}#{_PROCESS_ID}"
        self.ttl = ttl
        self.poll = poll if poll is not None else min(0.5, ttl / 5)
        self.term: LeaseTerm | None = None

    def _value(self) -> bytes:
        return encode(LeaseRecord(holder=self._identity, ttl=self.ttl))

    async def current_holder(self) -> str | None:
        """Who holds the lease now as stored (may be a dead holder not yet expired)."""
        entry = await self.kv.get(self.name)
        if entry is None:
            return None
        try:
            return decode_as(entry.value, LeaseRecord).holder.split("#", 1)[0]
        except MessageError:
            return None

    async def acquire(self) -> LeaseTerm:
        """Wait until this holder owns the lease; return the term."""
        seen_rev: int | None = None
        seen_at = 0.0
        while True:
            try:
                entry = await self.kv.get(self.name)
            except BusError as exc:
                log.warning("lease %s: reading failed (%s); retrying", self.name, exc)
                entry, seen_rev = None, None
                await trio.sleep(self.poll)
                continue
            now = trio.current_time()
            try:
                if entry is None:
                    rev = await self.kv.create(self.name, self._value())
                    return self._won(rev, "free", now)
                try:
                    record: LeaseRecord | None = decode_as(entry.value, LeaseRecord)
                except MessageError:
                    record = None  # garbage in the key: treat as expired once it stays put
                if record is not None and record.holder == self._identity:
                    rev = await self.kv.update(self.name, self._value(), entry.revision)
                    return self._won(rev, "own previous record", now)
                if entry.revision != seen_rev:
                    seen_rev, seen_at = entry.revision, now
                else:
                    ttl = record.ttl if record is not None and record.ttl > 0 else self.ttl
                    if now - seen_at >= ttl:
                        rev = await self.kv.update(self.name, self._value(), entry.revision)
                        old = record.holder.split("#", 1)[0] if record else "?"
                        return self._won(rev, f"{old} silent for {ttl:g} s", now)
            except KVConflict:
                seen_rev = None  # someone else moved first: watch the new revision
            except BusError as exc:
                log.warning("lease %s: write failed (%s); retrying", self.name, exc)
            await trio.sleep(self.poll)

    def _won(self, revision: int, why: str, sent_at: float) -> LeaseTerm:
        """`sent_at`: when the winning write was sent; the safety margin counts from there,
        not from its (possibly slow) reply."""
        log.info("lease %s: %s is leader (%s)", self.name, self.holder, why)
        now = trio.current_time()
        self.term = LeaseTerm(
            self.name, self.holder, revision, now, sent_at + _STEP_DOWN * self.ttl
        )
        return self.term

    async def _heartbeat(self, term: LeaseTerm) -> None:
        """Renew by CAS every ttl/3; raise LeaseLost on a conflict or when unconfirmed too long."""
        interval = self.ttl / 3
        last_ok = term.confirmed_until - _STEP_DOWN * self.ttl  # when the winning write was sent
        while True:
            await trio.sleep_until(last_ok + interval)
            give_up_at = last_ok + _STEP_DOWN * self.ttl
            while True:
                started = trio.current_time()
                if started >= give_up_at:
                    raise LeaseLost(
                        f"lease {self.name}: no confirmed heartbeat for {_STEP_DOWN * self.ttl:g} s"
                    )
                with trio.move_on_at(give_up_at):
                    try:
                        term.revision = await self.kv.update(
                            self.name, self._value(), term.revision
                        )
                        last_ok = started
                        term.confirmed_until = started + _STEP_DOWN * self.ttl
                        break
                    except KVConflict:
                        # An earlier attempt may have landed after we stopped waiting for it
                        # (cancelled at give_up_at, or a timeout): then the key holds our own
                        # record at a newer revision. Holder names are unique, so adopt it.
                        if not await self._still_ours(term):
                            raise LeaseLost(
                                f"lease {self.name}: taken over by another holder"
                            ) from None
                        continue
                    except BusError as exc:
                        log.warning("lease %s: heartbeat failed (%s)", self.name, exc)
                await trio.sleep(min(0.1, interval / 4))

    async def _still_ours(self, term: LeaseTerm) -> bool:
        try:
            entry = await self.kv.get(self.name)
        except BusError:
            return True  # unknown: the give-up deadline decides
        if entry is None:
            return False
        try:
            holder = decode_as(entry.value, LeaseRecord).holder
        except MessageError:
            return False
        if holder != self._identity:
            return False
        term.revision = entry.revision
        return True

    async def release(self, term: LeaseTerm) -> None:
        """Delete the key if it is still ours, so a standby takes over at once."""
        with trio.CancelScope(shield=True), trio.move_on_after(2):
            try:
                await self.kv.delete(self.name, revision=term.revision)
                log.info("lease %s: %s released it", self.name, self.holder)
            except (KVConflict, BusError) as exc:
                log.info("lease %s: not released (%s)", self.name, exc)
        if self.term is term:
            self.term = None

    @asynccontextmanager
    async def held(self) -> AsyncIterator[LeaseTerm]:
        """Wait for leadership, run the body as leader, release on exit.

        If leadership is lost the body is cancelled and ``LeaseLost`` comes out of the block.
        """
        term = await self.acquire()
        try:
            with unwrap_single():
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._heartbeat, term)
                    yield term
                    nursery.cancel_scope.cancel()
        finally:
            await self.release(term)

    async def run_as_leader(
        self,
        fn: Callable[[LeaseTerm], Awaitable[None]],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Compete forever; run ``fn(term)`` whenever leader, cancelling it when leadership is
        lost and competing again. Returns when ``fn`` returns. Started at once (as a standby).
        """
        task_status.started()
        while True:
            try:
                async with self.held() as term:
                    await fn(term)
                    return
            except LeaseLost as exc:
                log.warning("%s: %s; competing again", self.holder, exc)
