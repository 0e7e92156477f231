"""mTLS between sidecars, on top of the identity agent (sidecar/identity.py).

Inbound (`InboundGate.handle`, the inbound listener's handler): each accepted TCP connection
is wrapped with the agent's *current* server context (in `FastTLS`, sidecar/fasttls.py, the
equivalent of `agent.wrap_server` without trio.SSLStream's per-call cost), so a renewal or a
new trust bundle applies to the next connection with no restart; the caller's SPIFFE ID is
checked before any request byte is read and handed to the proxy, which uses it as the verified
source. Modes (`--mtls`, or `inbound.mtls` in the snapshot, read per connection):

- STRICT: TLS with a client SVID chaining to the bundle, nothing else (plaintext is told by
  its first byte and refused with the flag `plaintext`);
- PERMISSIVE: the same, or plaintext: the first byte tells (0x16 opens a TLS handshake);
- DISABLE: plaintext only (and no mTLS on outbound connections either).

Outbound (`UpstreamTls.connect`, the pool's hook for each *new* connection): wrapped with the
agent's current client context; the server must present the SPIFFE ID expected for the
cluster (`identity` in the snapshot, else spiffe://<own td>/ns/<own ns>/sa/<cluster name>).
A refusal is a connect failure (503 `UF`) whose reason names the flag and the identities.

Every refused handshake is logged with its flag (`pki.classify_tls_failure`) and counted in
`Stats.tls_refused[(direction, flag)]`.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Awaitable, Callable

import trio

from mesh import pki
from mesh.logthrottle import LogThrottle, held_note
from mesh.snapshot import MTLS_MODES, Cluster, Endpoint
from mesh.spiffe import SpiffeId, parse_spiffe_id
from sidecar.fastio import close_now
from sidecar.fasttls import FastTLS
from sidecar.identity import IdentityAgent
from sidecar.pool import ConnectFailed
from sidecar.runtime import Runtime
from sidecar.stats import Stats

log = logging.getLogger("mesh.sidecar.mtls")
# Refusals are counted in metrics; the log gets a few lines per flag per window.
_throttle = LogThrottle()

__all__ = ["MTLS_MODES", "InboundGate", "TlsRefused", "UpstreamTls", "refusal_flag"]

HANDSHAKE_TIMEOUT = 10.0
_TLS_HANDSHAKE = 0x16  # first byte of a TLS record carrying a handshake (ClientHello)


class TlsRefused(ConnectFailed):
    """The upstream's TLS handshake or identity check failed."""


class PlaintextRefused(Exception):
    """STRICT: the client's first byte does not start a TLS handshake."""


def refusal_flag(exc: BaseException) -> str:
    """The log/metrics flag of a failed handshake: a refusal reason, else `handshake`."""
    refused = exc if isinstance(exc, pki.CertificateRefused) else pki.classify_tls_failure(exc)
    return refused.reason if refused is not None else "handshake"


def _describe(exc: BaseException) -> str:
    refused = exc if isinstance(exc, pki.CertificateRefused) else pki.classify_tls_failure(exc)
    if refused is not None:
        return str(refused)
    if isinstance(exc, trio.TooSlowError):
        return "the TLS handshake did not finish in time"
    if isinstance(exc, PlaintextRefused):
        return str(exc)
    cause = exc.__cause__ or exc.__context__
    return str(cause or exc) or type(exc).__name__


class UpstreamTls:
    """The pool's `tls` hook: wrap a new upstream connection and check the server's ID."""

    def __init__(self, agent: IdentityAgent, stats: Stats) -> None:
        self.agent = agent
        self.stats = stats
        self._expected: dict[tuple[str, str | None], SpiffeId] = {}

    def expected(self, cluster: Cluster) -> SpiffeId:
        key = (cluster.name, cluster.identity)
        ident = self._expected.get(key)
        if ident is None:
            own = self.agent.identity
            if cluster.identity is not None:
                ident = parse_spiffe_id(cluster.identity)
            else:
                ident = SpiffeId(own.trust_domain, own.namespace, cluster.name)
            self._expected[key] = ident
        return ident

    async def connect(self, tcp: trio.SocketStream, cluster: Cluster,
                      ep: Endpoint) -> trio.abc.Stream:
        if not cluster.mtls:
            return tcp
        expected = self.expected(cluster)
        stream = FastTLS(tcp, self.agent.client_context(), server_side=False)
        try:
            with trio.fail_after(cluster.connect_timeout):
                await stream.do_handshake()
            pki.check_peer_leaf(stream.getpeercert(), trust_domain=self.agent.trust_domain,
                                expected=expected)
        except (trio.BrokenResourceError, trio.TooSlowError, pki.CertificateRefused,
                OSError) as exc:
            flag = refusal_flag(exc)
            self.stats.tls_refused[("outbound", flag)] += 1
            reason = f"mTLS to {ep} ({cluster.name}) refused [{flag}]: {_describe(exc)}"
            logged, held = _throttle.allow(("outbound", flag))
            if logged:
                log.warning("%s%s", reason, held_note(held))
            raise TlsRefused(reason) from None
        self.stats.tls_handshakes[("outbound", "mtls")] += 1
        return stream


async def _first_byte(tcp: trio.SocketStream) -> int | None:
    """Peek at the first byte without consuming it; None if the client closed."""
    data = await tcp.socket.recv(1, socket.MSG_PEEK)
    return data[0] if data else None


class InboundGate:
    """The inbound listener's handler: TLS + identity per connection, then the proxy."""

    def __init__(self, agent: IdentityAgent, mode: str, runtime: Callable[[], Runtime],
                 stats: Stats,
                 proxy: Callable[[trio.abc.Stream, SpiffeId | None], Awaitable[None]]) -> None:
        self.agent = agent
        self.mode = mode  # from --mtls; the snapshot's inbound.mtls wins when set
        self._runtime = runtime
        self.stats = stats
        self._proxy = proxy

    def current_mode(self) -> str:
        return self._runtime().inbound.mtls or self.mode

    async def handle(self, tcp: trio.SocketStream) -> None:
        mode = self.current_mode()
        stream: trio.abc.Stream = tcp
        peer: SpiffeId | None = None
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                tls = False
                if mode != "DISABLE":
                    first = await _first_byte(tcp)
                    if first is None:
                        close_now(tcp)
                        return
                    tls = first == _TLS_HANDSHAKE
                    if not tls and mode == "STRICT":
                        raise PlaintextRefused("plaintext connection (STRICT mTLS requires "
                                               "TLS with a client certificate)")
                if tls:
                    # The agent's *current* context: renewals apply to new connections.
                    tls_stream = FastTLS(tcp, self.agent.server_context(), server_side=True)
                    await tls_stream.do_handshake()
                    peer = pki.check_peer_leaf(tls_stream.getpeercert(),
                                               trust_domain=self.agent.trust_domain)
                    stream = tls_stream
        except (trio.BrokenResourceError, trio.TooSlowError, pki.CertificateRefused,
                PlaintextRefused, OSError) as exc:
            flag = "plaintext" if isinstance(exc, PlaintextRefused) else refusal_flag(exc)
            self.stats.tls_refused[("inbound", flag)] += 1
            logged, held = _throttle.allow(("inbound", flag))
            if logged:
                log.warning("mTLS from %s refused [%s]: %s%s", _peer_address(tcp), flag,
                            _describe(exc), held_note(held))
            close_now(tcp)
            return
        except BaseException:
            close_now(tcp)
            raise
        self.stats.tls_handshakes[("inbound", "mtls" if peer is not None else "plaintext")] += 1
        await self._proxy(stream, peer)


def _peer_address(tcp: trio.SocketStream) -> str:
    try:
        host, port = tcp.socket.getpeername()[:2]
    except OSError:
        return "?"
    return f"{host}:{port}"
