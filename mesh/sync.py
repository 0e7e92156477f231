"""The config sync protocol, sans I/O: deltas, the sidecar's state machine, the server's books.

Versions are content digests (mesh/compile.py). The server pushes, per service, either a
full snapshot or a delta carrying ``(version, base, nonce)``; a sidecar applies a delta only
on top of exactly ``base``, otherwise it keeps its last good snapshot and asks for a full one
(a *gap*). It answers every applied push with an ACK or a NACK (with the reason) echoing the
nonce. See docs/sync.md.

Nothing here does I/O or reads a clock: callers pass `now`.
"""

from __future__ import annotations

import logging
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

from mesh.compile import Compiled, Registration
from mesh.errors import ConfigError
from mesh.logthrottle import LogThrottle, held_note
from mesh.messages import ConfigAck, ConfigHeartbeat, SnapshotPush, SnapshotRequest

log = logging.getLogger("mesh.sync")
_CONFLICT_LOG = LogThrottle()

# What bus/subjects.py accepts as one subject token.
_NAME = re.compile(r"[A-Za-z0-9_-]{1,128}")  # used with fullmatch

# Snapshot sections that are lists of named items, diffed item by item.
LIST_SECTIONS = ("services", "clusters", "tcp")
# Sections replaced whole when they change.
VALUE_SECTIONS = ("service", "limits", "inbound")


def new_nonce() -> str:
    return secrets.token_hex(6)


# --- deltas --------------------------------------------------------------------------------


def make_delta(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """What turns snapshot dict `old` into `new`: {set, upsert, remove}."""
    delta: dict[str, Any] = {"set": {}, "upsert": {}, "remove": {}}
    for key in VALUE_SECTIONS:
        if old.get(key) != new.get(key):
            delta["set"][key] = new.get(key)
    for key in LIST_SECTIONS:
        a = {item["name"]: item for item in old.get(key) or []}
        b = {item["name"]: item for item in new.get(key) or []}
        changed = [b[n] for n in b if a.get(n) != b[n]]
        gone = sorted(n for n in a if n not in b)
        if changed:
            delta["upsert"][key] = changed
        if gone:
            delta["remove"][key] = gone
    return delta


def apply_delta(old: dict[str, Any], delta: dict[str, Any], version: str) -> dict[str, Any]:
    """`old` with `delta` applied; lists keep the order of names (sorted). ConfigError if the
    delta is malformed."""
    try:
        out = dict(old)
        for key, value in delta.get("set", {}).items():
            if key not in VALUE_SECTIONS:
                raise ConfigError(f"delta: unknown section {key!r}")
            out[key] = value
        for key in LIST_SECTIONS:
            items = {item["name"]: item for item in out.get(key) or []}
            for name in delta.get("remove", {}).get(key, []):
                items.pop(name, None)
            for item in delta.get("upsert", {}).get(key, []):
                items[item["name"]] = item
            out[key] = [items[n] for n in sorted(items)]
    except (TypeError, KeyError, AttributeError) as exc:
        raise ConfigError(f"delta is malformed: {type(exc).__name__}: {exc}") from None
    out["version"] = version
    return out


# --- the sidecar side ----------------------------------------------------------------------


@dataclass(frozen=True)
class Apply:
    """Try this snapshot (a plain dict); report the outcome with `ClientSync.applied`."""

    version: str
    nonce: str
    snapshot: dict[str, Any]


@dataclass(frozen=True)
class RequestFull:
    reason: str


@dataclass(frozen=True)
class Ignore:
    reason: str


Action = Apply | RequestFull | Ignore


@dataclass
class ClientSync:
    """One sidecar's view: its last good snapshot and what it last answered."""

    instance: str
    service: str
    label: str
    address: str = ""
    admin: str = ""
    version: str = ""  # last good (applied) version; "" = nothing from the control plane yet
    snapshot: dict[str, Any] | None = None
    nacked: str = ""
    reason: str = ""
    resyncs: int = 0
    applied_count: int = 0
    _pending: Apply | None = None

    def hello(self, reason: str = "start") -> SnapshotRequest:
        return SnapshotRequest(
            instance=self.instance,
            service=self.service,
            label=self.label,
            address=self.address,
            admin=self.admin,
            have=self.version,
            reason=reason,
        )

    def heartbeat(self, interval: float, leaving: bool = False) -> ConfigHeartbeat:
        return ConfigHeartbeat(
            instance=self.instance,
            service=self.service,
            label=self.label,
            address=self.address,
            admin=self.admin,
            acked=self.version,
            nacked=self.nacked,
            reason=self.reason,
            resyncs=self.resyncs,
            interval=interval,
            leaving=leaving,
        )

    def on_push(self, push: SnapshotPush) -> Action:
        if push.instance and push.instance != self.instance:
            return Ignore("for another instance")
        if push.service != self.service:
            # Pushes travel on per-service subjects; one for another service here was sent
            # by someone else: applying it would swap this sidecar's policy for that one's.
            return Ignore(f"for service {push.service!r}, not {self.service!r}")
        if push.version == self.version:
            return Ignore(f"already at {push.version}")
        if push.version == self.nacked:
            return Ignore(f"{push.version} was refused already")
        if push.full:
            return self._try(Apply(push.version, push.nonce, push.body))
        if self.snapshot is None or push.base != self.version:
            self.resyncs += 1
            have = self.version or "nothing"
            return RequestFull(f"gap: have {have}, delta is based on {push.base or 'nothing'}")
        try:
            snapshot = apply_delta(self.snapshot, push.body, push.version)
        except ConfigError as exc:
            self.resyncs += 1
            return RequestFull(f"unusable delta: {exc}")
        return self._try(Apply(push.version, push.nonce, snapshot))

    def _try(self, action: Apply) -> Apply:
        self._pending = action
        return action

    def applied(self, error: str | None) -> ConfigAck:
        """The outcome of the last Apply: None if it is in force, else why it was refused."""
        action = self._pending
        assert action is not None, "applied() without a pending Apply"
        self._pending = None
        if error is None:
            self.version, self.snapshot = action.version, action.snapshot
            self.nacked = self.reason = ""
            self.applied_count += 1
        else:
            self.nacked, self.reason = action.version, error
        return ConfigAck(
            instance=self.instance,
            service=self.service,
            version=action.version,
            nonce=action.nonce,
            ok=error is None,
            reason=error or "",
        )


# --- the control-plane side ----------------------------------------------------------------


SYNCED, STALE, NACKED = "SYNCED", "STALE", "NACKED"


@dataclass
class Peer:
    """What the server knows about one sidecar."""

    instance: str
    service: str
    label: str
    address: str
    admin: str
    interval: float
    last_seen: float
    acked: str = ""
    nacked: str = ""
    reason: str = ""
    resyncs: int = 0
    sent_at: float = -1e9  # last time a targeted full snapshot was sent


@dataclass
class ServiceState:
    compiled: Compiled
    previous: Compiled | None = None
    nonce: str = ""
    pushed_at: float = -1e9  # last delta pushed to every sidecar of the service


@dataclass
class ServerSync:
    """The config actor's books: registered sidecars, compiled snapshots, acks."""

    expiry_factor: float = 3.0
    expiry_slack: float = 1.0
    resend_after: float = 2.0
    peers: dict[str, Peer] = field(default_factory=dict)
    services: dict[str, ServiceState] = field(default_factory=dict)
    name_conflicts: int = 0  # messages refused: their instance name is another service's

    # registry ----------------------------------------------------------

    def registrations(self) -> list[Registration]:
        return sorted(Registration(p.service, p.label, p.address) for p in self.peers.values())

    def wanted_services(self) -> set[str]:
        return {p.service for p in self.peers.values()}

    def _touch(self, m: SnapshotRequest | ConfigHeartbeat, now: float, interval: float) -> bool:
        """Record a sidecar; True if the registry (endpoints) changed. `m` was checked by
        `acceptable`."""
        p = self.peers.get(m.instance)
        key = (m.service, m.label, m.address)
        if p is None:
            self.peers[m.instance] = Peer(
                m.instance, m.service, m.label, m.address, m.admin, interval, now
            )
            return bool(m.address)  # a pure client adds no endpoint
        if p.service != m.service:
            # The instance name is taken by a live sidecar of another service. A sidecar's NATS
            # user may be bound to its service but not to one instance name (bus/auth.py): it
            # must not take over another service's registration. The name frees on expiry.
            # Said out loud: a sidecar squatting a name it will need is otherwise invisible.
            self.name_conflicts += 1
            allowed, held = _CONFLICT_LOG.allow(m.instance)
            if allowed:
                log.warning(
                    "instance %r of service %r is refused: the name is registered to a live "
                    "sidecar of service %r (it frees when that one stops)%s",
                    m.instance, m.service, p.service, held_note(held))
            return False
        changed = (p.service, p.label, p.address) != key
        p.service, p.label, p.address, p.admin = m.service, m.label, m.address, m.admin
        p.last_seen, p.interval = now, interval
        return changed

    @staticmethod
    def acceptable(m: SnapshotRequest | ConfigHeartbeat) -> bool:
        """Service and instance names become NATS subject tokens (the push subject): a
        message with names that cannot must be dropped, not registered."""
        return bool(_NAME.fullmatch(m.service)) and bool(_NAME.fullmatch(m.instance))

    def on_request(self, req: SnapshotRequest, now: float) -> bool:
        """A sidecar asked for a full snapshot; True if the registry changed."""
        if not self.acceptable(req):
            return False
        changed = self._touch(
            req, now, self.peers[req.instance].interval if req.instance in self.peers else 1.0
        )
        if self.owns(req):
            self.peers[req.instance].sent_at = now
        return changed

    def owns(self, m: SnapshotRequest | ConfigHeartbeat | ConfigAck) -> bool:
        """`m`'s service is the one its instance is registered under (see `_touch`)."""
        p = self.peers.get(m.instance)
        return p is not None and p.service == m.service

    def full_for(self, service: str, instance: str = "") -> SnapshotPush | None:
        state = self.services.get(service)
        if state is None:
            return None
        c = state.compiled
        return SnapshotPush(
            service=service,
            version=c.version,
            base="",
            nonce=new_nonce(),
            full=True,
            body=c.snapshot,
            instance=instance,
        )

    def on_heartbeat(self, hb: ConfigHeartbeat, now: float) -> tuple[bool, SnapshotPush | None]:
        """Returns (registry changed, a full snapshot to send to this sidecar or None).

        A sidecar whose acked version is not the current one, that did not refuse the current
        one, and was not sent anything lately, gets a full snapshot: this heals lost pushes
        and a control-plane restart."""
        if not self.acceptable(hb):
            return False, None
        if hb.leaving:
            # Only the instance's own service may unregister it.
            return self.owns(hb) and self.peers.pop(hb.instance, None) is not None, None
        changed = self._touch(hb, now, hb.interval)
        if not self.owns(hb):
            return False, None
        p = self.peers[hb.instance]
        p.acked, p.nacked, p.reason, p.resyncs = hb.acked, hb.nacked, hb.reason, hb.resyncs
        state = self.services.get(hb.service)
        if state is None or changed:
            return changed, None
        current = state.compiled.version
        if (
            hb.acked == current
            or hb.nacked == current
            or now - max(p.sent_at, state.pushed_at) < self.resend_after
        ):
            return False, None  # in step, refused it, or a push to it may be in flight
        p.sent_at = now
        return False, self.full_for(hb.service, hb.instance)

    def on_ack(self, ack: ConfigAck, now: float) -> None:
        p = self.peers.get(ack.instance)
        if p is None or p.service != ack.service:
            return
        p.last_seen = now
        if ack.ok:
            p.acked, p.nacked, p.reason = ack.version, "", ""
        else:
            p.nacked, p.reason = ack.version, ack.reason

    def expire(self, now: float) -> bool:
        """Forget sidecars not heard from in expiry_factor heartbeats; True if any went."""
        gone = [
            i
            for i, p in self.peers.items()
            if now - p.last_seen > self.expiry_factor * p.interval + self.expiry_slack
        ]
        for i in gone:
            del self.peers[i]
        return bool(gone)

    # snapshots ---------------------------------------------------------

    def update(
        self, compiled: dict[str, Compiled], *, prune: bool = True, now: float = 0.0
    ) -> list[SnapshotPush]:
        """New compiled snapshots; returns the pushes (deltas; nothing for a new service, whose
        sidecars ask for a full snapshot). `prune` forgets services not in `compiled`."""
        pushes: list[SnapshotPush] = []
        for service, c in compiled.items():
            state = self.services.get(service)
            if state is None:
                self.services[service] = ServiceState(c, None, new_nonce())
                continue  # nobody has anything yet: sidecars ask for a full snapshot
            if state.compiled.version == c.version:
                continue
            old = state.compiled
            state.previous, state.compiled, state.nonce = old, c, new_nonce()
            state.pushed_at = now
            delta = make_delta(old.snapshot, c.snapshot)
            pushes.append(
                SnapshotPush(
                    service=service,
                    version=c.version,
                    base=old.version,
                    nonce=state.nonce,
                    full=False,
                    body=delta,
                )
            )
        for service in [s for s in self.services if prune and s not in compiled]:
            del self.services[service]
        return pushes

    def status(self, now: float) -> list[dict[str, Any]]:
        rows = []
        for p in sorted(self.peers.values(), key=lambda p: (p.service, p.instance)):
            state = self.services.get(p.service)
            current = state.compiled.version if state else ""
            if p.nacked:  # the last config this sidecar was given, it refused
                status, reason = NACKED, f"refused {p.nacked}: {p.reason}"
            elif current and p.acked == current:
                status, reason = SYNCED, ""
            else:
                status = STALE
                reason = f"has {p.acked or 'nothing'}, current is {current or 'not compiled'}"
            rows.append(
                {
                    "service": p.service,
                    "instance": p.instance,
                    "version": p.label,
                    "acked": p.acked,
                    "current": current,
                    "status": status,
                    "reason": reason,
                    "last_seen_s": round(now - p.last_seen, 1),
                    "address": p.address,
                    "admin": p.admin,
                    "resyncs": p.resyncs,
                }
            )
        return rows
