"""Opaque TCP, destination side: the inbound listener of a sidecar whose service is TCP
(snapshot `inbound.tcp`). `InboundGate` (sidecar/mtls.py) has already done TLS and the
STRICT/PERMISSIVE check and hands over the verified caller; here the caller is
authorized (sidecar/tcp_authz.py), then the connection is spliced to the local app.

A refused connection is closed before any byte reaches the app, logged with the flag
`DENY` and counted (`mesh_tcp_connections_denied_total`, reporter `destination`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from mesh.logthrottle import LogThrottle, held_note
from mesh.snapshot import DEFAULT_TCP_IDLE_TIMEOUT
from mesh.spiffe import SpiffeId
from sidecar.fastio import close_now, set_nodelay
from sidecar.runtime import Runtime
from sidecar.splice import splice
from sidecar.tcp_authz import check_tcp
from sidecar.tcp_telemetry import TcpRecorder

log = logging.getLogger("mesh.sidecar.tcp")
# Denials are counted in telemetry; the log gets a few lines per window.
_throttle = LogThrottle()

APP_CONNECT_TIMEOUT = 1.0


class TcpInbound:
    def __init__(self, runtime: Callable[[], Runtime], app_port: int, service: str,
                 version: str, recorder: TcpRecorder, app_host: str = "127.0.0.1") -> None:
        self._runtime = runtime
        self.app = (app_host, app_port)
        self.service = service
        self.version = version
        self.recorder = recorder

    async def handle(self, stream: trio.abc.Stream, peer: SpiffeId | None = None) -> None:
        """Connection handler: never raises (but lets cancellation through)."""
        app: trio.SocketStream | None = None
        src = peer.service_account if peer is not None else "unknown"
        try:
            rt = self._runtime()
            inbound = rt.snapshot.inbound
            reason = check_tcp(inbound.authz, peer, rt.namespace)
            if reason is not None:
                self.recorder.deny("destination", src, self.service, self.version)
                logged, held = _throttle.allow("deny")
                if logged:
                    log.warning("tcp inbound connection refused [DENY]: %s%s", reason,
                                held_note(held))
                return
            try:
                with trio.fail_after(APP_CONNECT_TIMEOUT):
                    app = await trio.open_tcp_stream(*self.app)
            except (OSError, trio.TooSlowError):
                log.warning("tcp inbound: app at %s:%d does not accept connections", *self.app)
                return
            set_nodelay(app)
            set_nodelay(stream)
            idle = inbound.tcp.idle_timeout if inbound.tcp else DEFAULT_TCP_IDLE_TIMEOUT
            conn = self.recorder.open("destination", src, self.service, self.version)
            try:
                # a_to_b: caller -> app, i.e. what the source sent.
                idled = await splice(stream, app, idle_timeout=idle, a_to_b=conn.sent,
                                     b_to_a=conn.received)
            finally:
                self.recorder.close(conn)
            if idled:
                log.info("tcp inbound from %s: closed after %g s idle", src, idle)
        except Exception:
            log.exception("tcp inbound: unexpected error")
        finally:
            if app is not None:
                close_now(app)
            close_now(stream)
