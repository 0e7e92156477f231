"""The sidecar's identity agent: its SVID and trust bundle, kept fresh over NATS.

The private key is generated here, in memory, and never leaves the process: only the CSR and
a credential go to the CA (``mesh.ca.sign``): the join token for the first certificate, then
the current chain plus a renewal proof signed by the current key. Each renewal uses a fresh key.

What the proxy uses (see docs/identity.md "Using the agent from the proxy")::

    agent = IdentityAgent(SpiffeId(td, ns, sa), token=token, name="checkout-1")
    await nursery.start(agent.run, bus)
    await agent.wait_ready()                     # first certificate installed
    ctx = agent.server_context()                 # inbound listener (STRICT unless permissive)
    ctx = agent.client_context()                 # upstream pool
    ssl_stream = agent.wrap_server(tcp_stream)   # or wrap_client(tcp_stream)
    peer = await agent.check_peer(ssl_stream, expected=...)  # handshake + SPIFFE ID check

Contexts are rebuilt on every renewal and bundle change; callers fetch the current one for
each *new* connection (existing connections keep theirs, which is what TLS allows anyway), so
rotation needs no restart. ``generation`` counts rebuilds, for pools that want to retire idle
connections made with an old certificate.

Renewal: at ``pki.renewal_time`` (40-60 % of the life, counted from when the certificate was
received, so the CA's 30 s back-dating does not shorten it), with exponential backoff and full
jitter on failure (``pki.retry_delay``). When the CA announces a new signing CA (a rotation),
an agent whose leaf was issued by another CA renews within a few seconds (jittered).

``mesh certs`` asks every agent (``CertsQuery``); each answers with its ``IdentityStatus``.
"""

from __future__ import annotations

import logging
import random
import ssl
from collections.abc import Callable
from datetime import UTC, datetime

import trio
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec

from bus import subjects
from bus.client import Bus
from mesh import pki
from mesh.concurrency import unwrap_single
from mesh.errors import BusError, IdentityError, MeshError
from mesh.messages import BundleAnnounce, CertsQuery, CsrReply, CsrRequest, IdentityStatus
from mesh.pki_announce import verify_announcement
from mesh.spiffe import SpiffeId

log = logging.getLogger("mesh.identity")

__all__ = ["CaUnavailable", "IdentityAgent", "NotReady"]

_INBOX_PREFIX = subjects.certs_inbox("x")[:-1]
_REKEY_SPREAD = 5.0  # seconds: spread of early renewals after a rotation


class NotReady(MeshError):
    """No certificate yet: call ``wait_ready`` first."""


class CaUnavailable(MeshError):
    """The CA did not answer or could not decide (transient; the agent retries)."""


def _issued_by(leaf: x509.Certificate, issuer: x509.Certificate) -> bool:
    if leaf.issuer != issuer.subject:
        return False
    try:
        leaf.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


class IdentityAgent:
    """Holds one workload's SVID + bundle; run it with ``await nursery.start(agent.run, bus)``."""

    def __init__(
        self,
        identity: SpiffeId,
        *,
        token: str | None = None,
        name: str = "",
        permissive: bool = False,
        request_timeout: float = 5.0,
        rekey_spread: float = _REKEY_SPREAD,
        rng: random.Random | None = None,
    ) -> None:
        self.identity = identity
        self.name = name or identity.service_account
        self.permissive = permissive
        self.request_timeout = request_timeout
        self.rekey_spread = rekey_spread
        self._token = token
        self._rng = rng or random.SystemRandom()
        self._svid: pki.Svid | None = None
        self._bundle: pki.TrustBundle | None = None
        self._signing_ca: x509.Certificate | None = None
        # issued_at of the newest bundle accepted: older announcements are replays.
        self._bundle_issued_at = 0.0
        self.rejected_bundles = 0
        self._contexts: tuple[ssl.SSLContext, ssl.SSLContext] | None = None
        self._ready = trio.Event()
        self._wake = trio.Event()
        self._renew_deadline = float("inf")
        self.generation = 0
        self._listeners: list[Callable[[IdentityAgent], None]] = []
        self.renewals = 0
        self.failures = 0
        self.last_error = ""

    def __repr__(self) -> str:
        serial = self._svid.issued.serial_hex if self._svid else "-"
        return f"IdentityAgent({self.identity}, serial={serial}, generation={self.generation})"

    # -- what the proxy reads -------------------------------------------------------------------

    @property
    def trust_domain(self) -> str:
        return self.identity.trust_domain

    @property
    def svid(self) -> pki.Svid:
        if self._svid is None:
            raise NotReady(f"{self.identity} has no certificate yet")
        return self._svid

    @property
    def bundle(self) -> pki.TrustBundle:
        if self._bundle is None:
            raise NotReady(f"{self.identity} has no trust bundle yet")
        return self._bundle

    def server_context(self) -> ssl.SSLContext:
        """Inbound context for a *new* connection: STRICT (client cert required) unless
        ``permissive``."""
        if self._contexts is None:
            raise NotReady(f"{self.identity} has no certificate yet")
        return self._contexts[0]

    def client_context(self) -> ssl.SSLContext:
        """Outbound context for a *new* connection (connect with ``server_hostname=None``)."""
        if self._contexts is None:
            raise NotReady(f"{self.identity} has no certificate yet")
        return self._contexts[1]

    def wrap_server(self, stream: trio.abc.Stream) -> trio.SSLStream[trio.abc.Stream]:
        return trio.SSLStream(stream, self.server_context(), server_side=True)

    def wrap_client(self, stream: trio.abc.Stream) -> trio.SSLStream[trio.abc.Stream]:
        return trio.SSLStream(stream, self.client_context(), server_hostname=None)

    async def check_peer(
        self, stream: trio.SSLStream[trio.abc.Stream], *, expected: SpiffeId | None = None
    ) -> SpiffeId:
        """Handshake and return the peer's SPIFFE ID; ``expected`` for the outbound side.

        Raises ``pki.CertificateRefused`` (use ``pki.classify_tls_failure`` on a
        ``trio.BrokenResourceError`` for the log flag)."""
        return await pki.handshake_and_check(
            stream, trust_domain=self.trust_domain, expected=expected
        )

    def certs_pem(self) -> tuple[bytes, bytes]:
        """(current chain, trust bundle) as PEM for the admin endpoint ``/certs``. Never the
        key."""
        return self.svid.issued.chain_pem, self.bundle.pem

    def seconds_to_expiry(self) -> float:
        """For the metrics gauge; 0 before the first certificate."""
        if self._svid is None:
            return 0.0
        return max(0.0, self._svid.issued.seconds_to_expiry(datetime.now(UTC)))

    def add_change_listener(self, fn: Callable[[IdentityAgent], None]) -> None:
        """Call ``fn(agent)`` after every context rebuild (renewal, bundle change), e.g. to
        hand ``agent.client_context()`` to a pool that keeps one context. Must not block."""
        self._listeners.append(fn)

    async def wait_ready(self) -> None:
        await self._ready.wait()

    def status(self) -> IdentityStatus:
        svid = self._svid
        if svid is None:
            return IdentityStatus(
                agent=self.name, identity=self.identity.uri, last_error=self.last_error
            )
        now = datetime.now(UTC)
        return IdentityStatus(
            agent=self.name,
            identity=svid.identity.uri,
            serial=svid.issued.serial_hex,
            not_after=svid.not_after.timestamp(),
            seconds_left=round(svid.issued.seconds_to_expiry(now), 3),
            renewals=self.renewals,
            roots=self.bundle.fingerprints() if self._bundle else [],
            last_error=self.last_error,
        )

    # -- the service ----------------------------------------------------------------------------

    async def run(
        self, bus: Bus, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Subscribe to bundle updates and status queries, get the first certificate, renew
        forever. Started once subscribed (before the first certificate: ``wait_ready``).
        A refused first request (bad token, foreign identity) raises the typed refusal."""
        with unwrap_single():
            async with trio.open_nursery() as nursery:
                await nursery.start(self._watch_bundle, bus)
                await nursery.start(self._answer_queries, bus)
                task_status.started()
                await self._first_certificate(bus)
                await self._renew_forever(bus)

    async def _first_certificate(self, bus: Bus) -> None:
        if not self._token:
            raise IdentityError(
                f"{self.identity}: no join token; create one with `mesh token create "
                f"--namespace {self.identity.namespace} --service-account "
                f"{self.identity.service_account}`"
            )
        attempt = 0
        while True:
            key = pki.generate_key()
            csr = pki.build_csr(key, self.identity)
            try:
                await self._request(bus, CsrRequest(self.identity.uri, csr, token=self._token), key)
                return
            except (BusError, CaUnavailable) as exc:
                attempt += 1
                self._failed(exc)
                await trio.sleep(pki.retry_delay(attempt, time_left=20.0, cap=2.0, rng=self._rng))
            except IdentityError as exc:
                self._failed(exc)
                raise

    async def _renew_once(self, bus: Bus) -> None:
        current = self.svid
        key = pki.generate_key()
        csr = pki.build_csr(key, self.identity)
        req = CsrRequest(
            self.identity.uri,
            csr,
            chain=list(current.issued.chain_der),
            proof=pki.renewal_proof(current, csr),
        )
        await self._request(bus, req, key)
        self.renewals += 1

    async def _renew_forever(self, bus: Bus) -> None:
        while True:
            while trio.current_time() < self._renew_deadline:
                with trio.move_on_at(self._renew_deadline):
                    await self._wake.wait()
                self._wake = trio.Event()
            attempt = 0
            while True:
                try:
                    await self._renew_once(bus)
                    break
                except (BusError, CaUnavailable, IdentityError) as exc:
                    attempt += 1
                    self._failed(exc)
                    left = self.svid.issued.seconds_to_expiry(datetime.now(UTC))
                    if left <= 0:
                        # A renewal is proven with the current certificate: once it has
                        # expired, only a new join token can get this workload back in.
                        raise pki.CertExpired(
                            f"{self.identity}: certificate {self.svid.issued.serial_hex} "
                            f"expired before it could be renewed (last error: "
                            f"{self.last_error}); restart the sidecar with a new join token"
                        ) from exc
                    await trio.sleep(pki.retry_delay(attempt, time_left=left, rng=self._rng))

    def _failed(self, exc: BaseException) -> None:
        self.failures += 1
        flag = getattr(exc, "reason", type(exc).__name__)
        self.last_error = f"{flag}: {exc}"
        log.warning("identity %s: certificate request failed: %s", self.identity, self.last_error)

    async def _request(self, bus: Bus, req: CsrRequest, key: ec.EllipticCurvePrivateKey) -> None:
        try:
            reply = await bus.request(subjects.CA_SIGN, req, CsrReply, timeout=self.request_timeout)
        except BusError as exc:
            raise CaUnavailable(f"no answer from the CA on {subjects.CA_SIGN}: {exc}") from None
        if not reply.ok:
            if reply.reason in ("ca-unavailable", "ca-error"):  # transient: retried
                raise CaUnavailable(reply.message)
            raise pki.refusal_from_reason(reply.reason, reply.message)
        received = datetime.now(UTC)
        issued = pki.IssuedSvid.from_der(reply.chain)
        bundle = pki.TrustBundle.from_pem(self.trust_domain, reply.bundle_pem)
        # Never install a chain that peers would refuse.
        pki.verify_svid(issued.chain, bundle, expected=self.identity, now=received)
        svid = pki.Svid(issued, key)
        try:
            signing = x509.load_der_x509_certificate(reply.signing_ca) if reply.signing_ca else None
        except ValueError as exc:  # a malformed reply is the CA's problem, not a crash of ours
            raise pki.NotAnSvid(
                f"the CA sent a signing certificate that does not parse: {exc}"
            ) from None
        self._bundle_issued_at = max(self._bundle_issued_at, reply.bundle_issued_at)
        self._install(svid, bundle, signing, received)

    def _install(
        self,
        svid: pki.Svid,
        bundle: pki.TrustBundle,
        signing: x509.Certificate | None,
        received: datetime,
    ) -> None:
        self._svid, self._bundle = svid, bundle
        if signing is not None:
            self._signing_ca = signing
        self._rebuild()
        start = max(svid.issued.not_before, received)
        at = pki.renewal_time(start, svid.not_after, rng=self._rng)
        self._schedule((at - received).total_seconds())
        self.last_error = ""
        self._ready.set()
        log.info(
            "identity %s: serial %s until %s",
            svid.identity,
            svid.issued.serial_hex,
            svid.not_after.isoformat(),
        )

    def _schedule(self, seconds: float) -> None:
        self._renew_deadline = trio.current_time() + max(0.0, seconds)
        self._wake.set()

    def _rebuild(self) -> None:
        svid, bundle = self.svid, self.bundle
        self._contexts = (
            pki.server_context(svid, bundle, require_client_cert=not self.permissive),
            pki.client_context(svid, bundle),
        )
        self.generation += 1
        for fn in self._listeners:
            try:
                fn(self)
            except Exception as exc:  # a listener's bug must not stop renewals
                log.error("identity %s: change listener failed: %r", self.identity, exc)

    # -- bus listeners ----------------------------------------------------------------------------

    async def _watch_bundle(self, bus: Bus, *, task_status: trio.TaskStatus[None]) -> None:
        async with bus.subscribe(subjects.CA_BUNDLE, capacity=16) as sub:
            task_status.started()
            async for delivery in sub:
                if isinstance(delivery.body, BundleAnnounce):
                    self.on_bundle(delivery.body)

    def on_bundle(self, msg: BundleAnnounce) -> None:
        """Apply an announced bundle: rebuild contexts; renew soon if signed by another CA.

        Only a bundle signed by a root already trusted is applied (mesh/pki_announce.py);
        the first bundle comes in the CA's reply to the join-token request, so announcements
        before the first certificate are ignored. Anything else is logged and counted."""
        if msg.trust_domain != self.trust_domain:
            return
        if self._svid is None or self._bundle is None:
            log.debug(
                "identity %s: bundle announcement before the first certificate", self.identity
            )
            return
        try:
            bundle = verify_announcement(msg, self._bundle, last_issued_at=self._bundle_issued_at)
            signing = x509.load_der_x509_certificate(msg.signing_ca)
        except (IdentityError, ValueError) as exc:
            self.rejected_bundles += 1
            log.warning(
                "identity %s: ignoring a bundle announcement (from %r): %s",
                self.identity,
                msg.leader,
                exc,
            )
            return
        self._bundle_issued_at = msg.issued_at
        self._signing_ca = signing
        if bundle != self._bundle:
            self._bundle = bundle
            self._rebuild()
            log.info("identity %s: trust bundle now %r", self.identity, bundle)
        if not _issued_by(self._svid.issued.certificate, signing):
            soon = self._rng.uniform(0.0, self.rekey_spread)
            lifetime = (self._svid.not_after - self._svid.issued.not_before).total_seconds()
            soon = min(soon, lifetime * 0.1)
            if trio.current_time() + soon < self._renew_deadline:
                self._schedule(soon)

    async def _answer_queries(self, bus: Bus, *, task_status: trio.TaskStatus[None]) -> None:
        async with bus.subscribe(subjects.CERTS_QUERY, capacity=16) as sub:
            task_status.started()
            async for delivery in sub:
                body = delivery.body
                # Only to a status inbox: a query must not make agents publish elsewhere.
                if isinstance(body, CertsQuery) and body.reply_to.startswith(_INBOX_PREFIX):
                    try:
                        bus.publish_nowait(body.reply_to, self.status())
                    except MeshError as exc:
                        log.debug("certs status not sent: %s", exc)
