"""The CA actor: a singleton behind a lease that signs SVIDs from CSRs over NATS.

Every control-plane replica runs one; the one holding the ``ca`` lease (actors/lease.py) is the
leader and the only one subscribed to ``mesh.ca.sign``. The others wait as standbys.

State, all in the ``mesh_ca`` KV bucket, none of it secret in clear:

* ``ca``: ``pki.seal_ca(ca, operator secret)``: certificates and roots in clear, the signing
  key AES-256-GCM-sealed under scrypt(operator secret). The first leader generates a root (or
  loads the operator's files) and creates this key; every later leader -- a standby after a
  failover, or a restarted replica -- unseals it with the secret from *its own* environment.
  So a failover keeps the same root and key, and the key is never on the bus in clear.
* ``bundle``: the current *signed* ``BundleAnnounce`` (also published on ``mesh.ca.bundle`` on
  every change and every ``announce_interval``), for agents and tools that start later. It is
  signed once per change (mesh/pki_announce.py) and republished as stored, so the old root's
  signature on a rotation's overlap bundle survives a failover.
* ``rotation``: when a rotation is in progress, when it started, the old roots and the leaf
  TTL then.

The applied MeshConfig (KV ``mesh_config/resources``, written by `mesh apply`; the same key the
config actor compiles from) is followed by every replica, leader or not, so a standby that takes
over already knows it: ``cert_ttl_hours`` sets the lifetime of every leaf signed from then on,
first issues and renewals alike (``leaf_ttl()``; without it, ``CaConfig.leaf_ttl``). Leaves
already out keep their expiry and renew at their usual point of life, then get the new TTL.
``trust_domain`` cannot be followed -- it is in the root and in every leaf -- so a different
value is refused: `mesh apply` refuses it when a CA has announced its bundle; one stored before
any CA ran is refused here, in the log and in `mesh ca status`, and the CA keeps its own.

Join tokens live in ``mesh_tokens`` (``mesh.tokens``: hashed, CAS-redeemed).

A CSR request (``CsrRequest``) carries either a join token (first certificate) or the current
chain plus a renewal proof. The identity signed is always the one the credential allows (the
token's, or the current certificate's); ``sign_csr`` refuses a CSR asking for anything else.
Refusals go back as ``CsrReply(ok=False, reason, message)``; the agent rebuilds the typed
error with ``pki.refusal_from_reason``. Signing (~120 us) runs inline in one of ``workers``
tasks; first-issue requests wait on KV for the token, so several run concurrently.

Rotation (``mesh ca rotate``; docs/identity.md "Rotation, step by step"): ``rotate`` makes a new
root, signs with it and trusts old + new (overlap); agents renew early when the announced
signing CA is not their issuer; ``retire`` drops the old roots once every old leaf has expired
or been re-issued (refused before ``introduced_at + leaf_ttl`` unless forced).
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta

import trio
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import Encoding

from actors.ca_config import CaConfig, CaConfigError, KvTokenStore, meshconfig_leaf_ttl
from actors.lease import Lease, LeaseTerm, open_leases
from actors.runtime import ActorContext
from bus import subjects
from bus.client import Bus
from bus.errors import KVConflict
from bus.kv import INITIAL_DONE, KV, KVEntry, open_kv
from bus.subscription import Subscription
from mesh import pki
from mesh.concurrency import unwrap_single
from mesh.errors import BusError, ConfigError, IdentityError, MeshError
from mesh.messages import (
    BundleAnnounce,
    BundleQuery,
    CaCommand,
    CaCommandReply,
    CsrReply,
    CsrRequest,
    Message,
    MessageError,
    decode_as,
    encode,
)
from mesh.pki_announce import SigningKey, sign_announcement
from mesh.pki_csr import checked_csr_key
from mesh.pki_errors import CsrRefused
from mesh.resources import ResourceSet, check_trust_domain, decode_set
from mesh.resources_store import Store
from mesh.tokens import key_fingerprint, redeem_token

log = logging.getLogger("mesh.ca")

__all__ = ["CaActor", "CaConfig", "CaConfigError", "signing_root"]

KEY_CA, KEY_BUNDLE, KEY_ROTATION = "ca", "bundle", "rotation"
LEASE_NAME = "ca"


def signing_root(ca: pki.CertificateAuthority) -> x509.Certificate:
    """The root of the bundle that the CA's own chain leads to."""
    top = ca.intermediates[-1] if ca.intermediates else ca.certificate
    if top in ca.bundle:
        return top
    for root in ca.bundle.issuers_named(top.issuer):
        try:
            top.verify_directly_issued_by(root)
            return root
        except (ValueError, TypeError, InvalidSignature):
            continue
    raise pki.CaLoadError("the CA chain does not lead to any root of its bundle")


class CaActor:
    """Actor ``ca``. ``config=None`` reads the environment (``CaConfig.from_env``) here, so a
    replica without an operator secret fails before it connects, with one clear error."""

    name = "ca"

    def __init__(self, config: CaConfig | None = None, *, clock: Callable[[], float] = time.time):
        self._config = config if config is not None else CaConfig.from_env()
        self._clock = clock
        self.ca: pki.CertificateAuthority | None = None  # set while leading
        self.leading = trio.Event()  # set while this replica serves as leader
        self.signed = 0
        self.refused = 0
        self._mesh_resources: ResourceSet = {}  # the applied resource set, for MeshConfig
        self._mesh_revision = 0  # its KV revision (also of a refused one, not to re-log it)
        self._mesh_ttl: timedelta | None = None
        # Why the applied MeshConfig is not followed (a foreign trust domain), "" if it is.
        self.mesh_config_problem = ""

    def leaf_ttl(self) -> timedelta:
        """Lifetime of the next leaf: MeshConfig ``cert_ttl_hours`` if applied, else ours."""
        return self._mesh_ttl if self._mesh_ttl is not None else self._config.leaf_ttl

    # -- lifecycle ----------------------------------------------------------------------------

    async def run(
        self, ctx: ActorContext, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        config = self._config
        bus = ctx.bus
        kv_ca = await open_kv(bus, subjects.KV_CA, replicas=config.kv_replicas, direct=True)
        kv_tokens = await open_kv(bus, subjects.KV_TOKENS, replicas=config.kv_replicas)
        leases = await open_leases(bus, replicas=config.kv_replicas)
        lease = Lease(leases, LEASE_NAME, ctx.replica, ttl=config.lease_ttl)
        lead = functools.partial(self._lead, ctx, config, kv_ca, KvTokenStore(kv_tokens))
        store = await Store.open(bus)
        # unwrap_single: the supervisor and callers see a leader's failure (a SealError) as
        # itself, as before this nursery existed.
        with unwrap_single():
            async with trio.open_nursery() as nursery:
                # Read before competing for the lease, so a new leader's very first leaf already
                # has the applied TTL.
                await nursery.start(self._follow_mesh_config, store)
                await lease.run_as_leader(lead, task_status=task_status)
                nursery.cancel_scope.cancel()

    # -- the applied MeshConfig -----------------------------------------------------------------

    async def _follow_mesh_config(
        self, store: Store, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        async with store.kv.watch(subjects.CONFIG_KEY) as watch:
            async for item in watch:
                if item is INITIAL_DONE:
                    break
                if isinstance(item, KVEntry):
                    self._take_mesh_config(item)
            task_status.started()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._poll_mesh_config, store)
                try:
                    async for item in watch:
                        if isinstance(item, KVEntry):
                            self._take_mesh_config(item)
                except Exception as exc:
                    # Whatever breaks the watch (errors of the NATS client come through raw
                    # here) must not end this actor and with it a leader's term: polling
                    # keeps following the configuration.
                    log.warning("CA: configuration watch ended (%s); following it by polling", exc)

    async def _poll_mesh_config(self, store: Store) -> None:
        while True:
            await trio.sleep(self._config.config_poll)
            try:
                entry = await store.kv.get(subjects.CONFIG_KEY)
            except MeshError as exc:
                log.debug("CA: reading the applied configuration: %s", exc)
                continue
            if entry is not None:
                self._take_mesh_config(entry)

    def _take_mesh_config(self, entry: KVEntry) -> None:
        if entry.revision <= self._mesh_revision:
            return
        self._mesh_revision = entry.revision
        resources: ResourceSet = {}
        if not entry.deleted and entry.value:
            try:
                resources, _ = decode_set(entry.value)
            except ConfigError as exc:  # written by something that skipped validation
                log.error(
                    "CA: configuration revision %d refused, leaf TTL stays %s: %s",
                    entry.revision,
                    self.leaf_ttl(),
                    exc,
                )
                return
        self._mesh_resources = resources
        ttl = meshconfig_leaf_ttl(resources)
        if ttl != self._mesh_ttl:
            self._mesh_ttl = ttl
            log.info(
                "CA: leaf TTL %s from configuration revision %d (%s)",
                self.leaf_ttl(),
                entry.revision,
                "MeshConfig cert_ttl_hours" if ttl is not None else "no cert_ttl_hours: CA setting",
            )
        self._check_trust_domain()

    def _check_trust_domain(self) -> None:
        """Only a leader knows its root, hence its trust domain: a standby checks on taking
        over."""
        ca = self.ca
        if ca is None:
            return
        try:
            check_trust_domain(self._mesh_resources, ca.trust_domain)
        except ConfigError as exc:
            problem = f"MeshConfig refused: {exc}; the CA keeps signing for {ca.trust_domain!r}"
            if problem != self.mesh_config_problem:
                log.error("CA: %s", problem)
            self.mesh_config_problem = problem
            return
        self.mesh_config_problem = ""

    async def _lead(
        self,
        ctx: ActorContext,
        config: CaConfig,
        kv_ca: KV,
        store: KvTokenStore,
        term: LeaseTerm,
    ) -> None:
        try:
            revision = await self._load_or_create(config, kv_ca)
            assert self.ca is not None
            self._check_trust_domain()
            log.info(
                "%s: CA leader for %s, signing root %s",
                ctx.replica,
                self.ca.trust_domain,
                pki.fingerprint(signing_root(self.ca))[:16],
            )
            state = _LeaderState(self, ctx, config, kv_ca, store, revision, term)
            await state.resume_announcement()
            async with trio.open_nursery() as nursery:
                await nursery.start(state.serve_csrs)
                await nursery.start(state.serve_commands)
                await nursery.start(state.serve_bundle_queries)
                nursery.start_soon(state.announce_periodically)
                self.leading.set()
        finally:
            self.ca = None
            self.leading = trio.Event()
            self.mesh_config_problem = ""

    async def _load_or_create(self, config: CaConfig, kv: KV) -> int:
        """Unseal the CA from KV, or make (generate / load operator files) and store it."""
        while True:
            entry = await kv.get(KEY_CA)
            if entry is not None:
                ca = await trio.to_thread.run_sync(pki.unseal_ca, entry.value, config.secret)
                if ca.trust_domain != config.trust_domain and config.cert_pem is None:
                    log.warning(
                        "KV holds the CA of trust domain %r; MESH_TRUST_DOMAIN=%r is ignored",
                        ca.trust_domain,
                        config.trust_domain,
                    )
                self.ca = ca
                return entry.revision
            if config.cert_pem is not None and config.key_pem is not None:
                ca = pki.load_ca(
                    config.trust_domain,
                    config.cert_pem,
                    config.key_pem,
                    password=config.key_password,
                    bundle_pem=config.bundle_pem,
                )
                how = "loaded the operator's CA"
            else:
                ca = pki.generate_root(config.trust_domain)
                how = "generated a new root"
            blob = await trio.to_thread.run_sync(pki.seal_ca, ca, config.secret)
            try:
                revision = await kv.create(KEY_CA, blob)
            except KVConflict:
                continue  # another leader stored one first (should not happen under the lease)
            log.info(
                "CA: %s for trust domain %s (root %s); key sealed in KV",
                how,
                ca.trust_domain,
                pki.fingerprint(signing_root(ca))[:16],
            )
            self.ca = ca
            return revision


class _LeaderState:
    """What one term of leadership serves. Holds the KV revision of the sealed CA."""

    def __init__(
        self,
        actor: CaActor,
        ctx: ActorContext,
        config: CaConfig,
        kv: KV,
        store: KvTokenStore,
        revision: int,
        term: LeaseTerm,
    ) -> None:
        self.actor = actor
        self.term = term
        self.ctx = ctx
        self.bus: Bus = ctx.bus
        self.config = config
        self.kv = kv
        self.store = store
        self.revision = revision
        self._changing = trio.Lock()
        self.current: BundleAnnounce | None = None  # the signed announcement in force

    @property
    def ca(self) -> pki.CertificateAuthority:
        assert self.actor.ca is not None
        return self.actor.ca

    # -- bundle ---------------------------------------------------------------------------------

    def bundle_message(
        self,
        *,
        after: float = 0.0,
        also_signed_by: Sequence[tuple[x509.Certificate, SigningKey]] = (),
    ) -> BundleAnnounce:
        """The current bundle, signed by the CA's key (and ``also_signed_by``: the old root
        during a rotation, which agents still trust). ``issued_at`` is never below ``after``,
        the last one signed, so agents' replay check holds across replicas' clocks."""
        ca = self.ca
        unsigned = BundleAnnounce(
            trust_domain=ca.trust_domain,
            roots_pem=ca.bundle.pem,
            signing_ca=ca.certificate.public_bytes(Encoding.DER),
            leader=self.ctx.replica,
            issued_at=max(self.actor._clock(), after + 0.001),
            intermediates=[c.public_bytes(Encoding.DER) for c in ca.intermediates],
        )
        return sign_announcement(unsigned, [*also_signed_by, (ca.certificate, ca.key)])

    async def _stored_announcement(self) -> BundleAnnounce | None:
        entry = await self.kv.get(KEY_BUNDLE)
        if entry is None:
            return None
        try:
            return decode_as(entry.value, BundleAnnounce)
        except MessageError as exc:  # written by an older version, or damaged: sign anew
            log.warning("CA: stored bundle announcement unreadable (%s); signing a new one", exc)
            return None

    async def resume_announcement(self) -> None:
        """On becoming leader: republish the stored announcement if it is of this very bundle
        (it may carry the old root's signature of a rotation in progress, which this replica
        cannot make), else sign and store a new one."""
        stored = await self._stored_announcement()
        ca = self.ca
        if (
            stored is not None
            and stored.signatures
            and stored.roots_pem == ca.bundle.pem
            and stored.signing_ca == ca.certificate.public_bytes(Encoding.DER)
        ):
            self.current = stored
            await self.bus.publish(subjects.CA_BUNDLE, stored)
            return
        await self.announce_new(after=stored.issued_at if stored else 0.0)

    async def announce_new(
        self,
        *,
        after: float | None = None,
        also_signed_by: Sequence[tuple[x509.Certificate, SigningKey]] = (),
    ) -> None:
        """Sign the current bundle, store it in KV, publish it."""
        if after is None:
            after = self.current.issued_at if self.current else 0.0
        msg = self.bundle_message(after=after, also_signed_by=also_signed_by)
        await self.kv.put(KEY_BUNDLE, encode(msg))
        self.current = msg
        await self.bus.publish(subjects.CA_BUNDLE, msg)

    async def announce(self) -> None:
        """Republish the current signed announcement (a missed message heals)."""
        if self.current is None:
            await self.announce_new()
        else:
            await self.bus.publish(subjects.CA_BUNDLE, self.current)

    async def announce_periodically(self) -> None:
        while True:
            await trio.sleep(self.config.announce_interval)
            await self.announce()

    # -- CSRs -----------------------------------------------------------------------------------

    async def serve_csrs(self, *, task_status: trio.TaskStatus[None]) -> None:
        async with self.bus.subscribe(
            subjects.CA_SIGN, queue=subjects.CA_QUEUE, capacity=8192
        ) as sub:
            async with trio.open_nursery() as nursery:
                for _ in range(self.config.workers):
                    nursery.start_soon(self._csr_worker, sub)
                task_status.started()

    async def _csr_worker(self, sub: Subscription[Message]) -> None:
        async for delivery in sub:
            body = delivery.body
            if not (isinstance(body, CsrRequest) and delivery.reply):
                continue
            if not self.term.valid():
                # Paused past our lease (another replica may lead now): stay silent, the
                # agent times out and retries, reaching the current leader.
                continue
            try:
                reply = await self.handle_csr(body)
            except Exception as exc:  # a request must never crash-loop the CA: answer, log
                log.error("CA: internal error on a request for %s", body.identity, exc_info=exc)
                reply = CsrReply(
                    ok=False, reason="ca-error", message=f"internal CA error: {type(exc).__name__}"
                )
            try:
                self.bus.reply(delivery, reply)
            except MeshError as exc:  # outbox full: the agent times out and retries
                log.warning("CA: reply to %s not sent: %s", body.identity, exc)

    async def handle_csr(self, req: CsrRequest) -> CsrReply:
        ca = self.ca  # one CA for the whole request, even if a rotation lands meanwhile
        ttl = self.actor.leaf_ttl()
        try:
            ident = pki.parse_spiffe_id(req.identity, trust_domain=ca.trust_domain)
            if req.chain:
                chain = pki.IssuedSvid.from_der(req.chain).chain
                pki.verify_renewal(chain, req.proof, req.csr, ca.bundle, ident)
                issued = ca.sign_csr(req.csr, ident, ttl=ttl)
            elif req.token:
                # CSR first, so a bad CSR does not spend a token use.
                _, pub = checked_csr_key(req.csr, ident, allowed_curves=ca.allowed_curves)
                await redeem_token(self.store, req.token, ident, key=key_fingerprint(pub))
                issued = ca.issue(ident, pub, ttl=ttl)
            else:
                raise CsrRefused(
                    "the request carries no credential: send a join token (first "
                    "certificate) or the current chain with a renewal proof"
                )
        except IdentityError as exc:
            self.actor.refused += 1
            reason = str(getattr(exc, "reason", "refused"))
            log.info("CA refused %s: %s (%s)", req.identity, exc, reason)
            return CsrReply(ok=False, reason=reason, message=str(exc))
        except BusError as exc:
            self.actor.refused += 1
            return CsrReply(
                ok=False, reason="ca-unavailable", message=f"the CA could not check: {exc}"
            )
        self.actor.signed += 1
        current = self.current
        return CsrReply(
            ok=True,
            chain=list(issued.chain_der),
            bundle_pem=ca.bundle.pem,
            signing_ca=ca.certificate.public_bytes(Encoding.DER),
            bundle_issued_at=current.issued_at
            if current and current.roots_pem == ca.bundle.pem
            else 0.0,
        )

    # -- commands (mesh ca ...) -----------------------------------------------------------------

    async def serve_bundle_queries(self, *, task_status: trio.TaskStatus[None]) -> None:
        """The signed announcement in force, to whoever asks (the bundle is public)."""
        async with self.bus.subscribe(subjects.CA_BUNDLE_GET, queue=subjects.CA_QUEUE) as sub:
            task_status.started()
            async for delivery in sub:
                current = self.current
                if not isinstance(delivery.body, BundleQuery) or current is None:
                    continue
                if not self.term.valid():
                    continue
                try:
                    self.bus.reply(delivery, current)
                except MeshError as exc:
                    log.warning("bundle query reply not sent: %s", exc)

    async def serve_commands(self, *, task_status: trio.TaskStatus[None]) -> None:
        async with self.bus.subscribe(subjects.CA_COMMAND, queue=subjects.CA_QUEUE) as sub:
            task_status.started()
            async for delivery in sub:
                if not isinstance(delivery.body, CaCommand) or not self.term.valid():
                    continue
                try:
                    async with self._changing:
                        reply = await self.command(delivery.body)
                except MeshError as exc:
                    reply = self.status(False, str(exc), reason=type(exc).__name__)
                except (
                    Exception
                ) as exc:  # e.g. a corrupt record in KV: answer, don't crash the leader
                    log.exception("CA command %s failed", delivery.body.action)
                    reply = self.status(
                        False, f"internal error: {type(exc).__name__}: {exc}", reason="internal"
                    )
                try:
                    self.bus.reply(delivery, reply)
                except MeshError as exc:
                    log.warning("CA command reply not sent: %s", exc)

    def status(self, ok: bool, message: str, *, reason: str = "") -> CaCommandReply:
        ca = self.ca
        return CaCommandReply(
            ok=ok,
            message=message,
            leader=self.ctx.replica,
            trust_domain=ca.trust_domain,
            roots=ca.bundle.fingerprints(),
            signing_root=pki.fingerprint(signing_root(ca)),
            reason=reason,
        )

    async def command(self, cmd: CaCommand) -> CaCommandReply:
        if cmd.action == "status":
            rotation = await self._rotation_state()
            if rotation is None:
                message = "no rotation in progress"
            else:
                message = f"rotation in progress since {_iso(rotation['introduced_at'])}"
            message += f"; leaf TTL {self.actor.leaf_ttl()}"
            if self.actor.mesh_config_problem:
                message += f"\n{self.actor.mesh_config_problem}"
            return self.status(True, message)
        if cmd.action == "rotate":
            return await self._rotate()
        if cmd.action == "retire":
            return await self._retire(force=cmd.force)
        return self.status(False, f"unknown CA command {cmd.action!r}", reason="bad-command")

    async def _rotation_state(self) -> dict[str, float | list[str]] | None:
        entry = await self.kv.get(KEY_ROTATION)
        if entry is None:
            return None
        state: dict[str, float | list[str]] = json.loads(entry.value)
        return state

    async def _store(
        self,
        ca: pki.CertificateAuthority,
        also_signed_by: Sequence[tuple[x509.Certificate, SigningKey]] = (),
    ) -> None:
        blob = await trio.to_thread.run_sync(pki.seal_ca, ca, self.config.secret)
        self.revision = await self.kv.update(KEY_CA, blob, self.revision)  # CAS: still ours
        self.actor.ca = ca
        await self.announce_new(also_signed_by=also_signed_by)

    async def _rotate(self) -> CaCommandReply:
        old = self.ca
        if len(old.bundle) > 1:
            return self.status(
                False,
                "a rotation is already in progress (the bundle holds several roots): retire the "
                "old root first with `mesh ca rotate --retire`",
                reason="rotation-in-progress",
            )
        if self.config.cert_pem is not None:
            return self.status(
                False,
                "this CA uses the operator's certificate (MESH_CA_CERT): rotate it by replacing "
                "the files; `mesh ca rotate` only rotates generated roots",
                reason="operator-ca",
            )
        new_root = pki.generate_root(old.trust_domain)
        overlap = old.bundle.with_root(new_root.certificate)
        await self.kv.put(
            KEY_ROTATION,
            json.dumps(
                {
                    "introduced_at": self.actor._clock(),
                    "old_roots": old.bundle.fingerprints(),
                    # The TTL may change before retirement; old leaves got this one.
                    "leaf_ttl": self.actor.leaf_ttl().total_seconds(),
                }
            ).encode(),
        )
        # Agents trust only the old root yet: its signature is what lets them accept the new.
        await self._store(new_root.with_roots(overlap.roots), [(old.certificate, old.key)])
        fp = pki.fingerprint(new_root.certificate)
        log.warning("CA rotation: new root %s introduced, old roots still trusted", fp[:16])
        return self.status(
            True,
            f"new root {fp[:16]} signs from now on; both roots are trusted. Agents renew early; "
            f"retire the old root after {self.actor.leaf_ttl()} with `mesh ca rotate --retire`",
        )

    async def _retire(self, *, force: bool) -> CaCommandReply:
        ca = self.ca
        if len(ca.bundle) == 1:
            return self.status(False, "no old root to retire", reason="no-rotation")
        rotation = await self._rotation_state()
        introduced = rotation.get("introduced_at") if rotation else None
        if isinstance(introduced, int | float):
            then = rotation.get("leaf_ttl") if rotation else None
            longest = max(
                then if isinstance(then, int | float) else 0.0,
                self.actor.leaf_ttl().total_seconds(),
            )
            safe_at = introduced + longest
            if self.actor._clock() < safe_at and not force:
                return self.status(
                    False,
                    f"leaves of the old root may be valid until {_iso(safe_at)}; retiring now "
                    "would cut off agents that have not renewed yet (check `mesh certs`, or "
                    "pass --force)",
                    reason="too-early",
                )
        root = signing_root(ca)
        await self._store(ca.with_roots([root]))
        await self.kv.delete(KEY_ROTATION)
        log.warning("CA rotation: old roots retired; only %s is trusted", pki.fingerprint(root))
        return self.status(True, f"old roots retired; only {pki.fingerprint(root)[:16]} is trusted")


def _iso(ts: float | list[str]) -> str:
    if not isinstance(ts, int | float):
        return "?"
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")
