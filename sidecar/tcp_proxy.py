"""Opaque TCP, caller side: each accepted local connection is spliced to one endpoint of a
cluster subset, over mTLS when the sidecar has an identity (the endpoint is then the
destination sidecar's inbound listener, which checks who we are; we check who it is).

`TcpListeners` keeps the set of listeners equal to the snapshot's `tcp` list while the
sidecar runs: control-plane snapshots add, move and remove them without a restart.
A port that cannot be bound is counted, never fatal to the sidecar, and tried again with
each later snapshot; it is logged once per (port, error), and once more when it binds.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping

import trio

from mesh.errors import ConfigError
from mesh.snapshot import Cluster, Endpoint, TcpProxy
from sidecar.fastio import close_now, set_nodelay
from sidecar.runtime import Runtime
from sidecar.splice import splice
from sidecar.tcp_telemetry import TcpRecorder

log = logging.getLogger("mesh.sidecar.tcp")

TlsConnect = Callable[[trio.SocketStream, Cluster, Endpoint], Awaitable[trio.abc.Stream]]


class TcpListener:
    def __init__(self, config: TcpProxy, runtime: Callable[[], Runtime], *,
                 service: str = "unknown", recorder: TcpRecorder | None = None,
                 tls: TlsConnect | None = None) -> None:
        self.name = config.name
        self._runtime = runtime
        self.service = service
        self.recorder = recorder if recorder is not None else TcpRecorder()
        self.tls = tls  # None: plaintext (no identity, or --mtls DISABLE)

    async def handle(self, stream: trio.SocketStream) -> None:
        upstream: trio.abc.Stream | None = None
        try:
            set_nodelay(stream)
            rt = self._runtime()
            config = next((t for t in rt.snapshot.tcp if t.name == self.name), None)
            if config is None:
                return  # removed by a reload while this connection was queued
            cluster = rt.clusters[config.cluster]
            ep = cluster.pick(config.subset, None)
            if ep is None:
                log.warning("tcp %s: no healthy endpoint in %s/%s", self.name, config.cluster,
                            config.subset)
                return
            try:
                with trio.fail_after(cluster.config.connect_timeout):
                    tcp = await trio.open_tcp_stream(ep.host, ep.port)
            except (OSError, trio.TooSlowError):
                cluster.outlier.on_failure(ep)
                log.warning("tcp %s: connect to %s failed", self.name, ep)
                return
            upstream = tcp
            set_nodelay(tcp)
            if self.tls is not None and cluster.config.mtls:
                try:
                    upstream = await self.tls(tcp, cluster.config, ep)
                except Exception as exc:  # TlsRefused: logged and counted by UpstreamTls
                    cluster.outlier.on_failure(ep)
                    log.warning("tcp %s: %s", self.name, exc)
                    return
            cluster.outlier.on_success(ep)
            conn = self.recorder.open("source", self.service, config.cluster, config.subset)
            try:
                idled = await splice(stream, upstream, idle_timeout=config.idle_timeout,
                                     a_to_b=conn.sent, b_to_a=conn.received)
            finally:
                self.recorder.close(conn)
            if idled:
                log.info("tcp %s: closed after %g s idle", self.name, config.idle_timeout)
        except Exception:
            log.exception("tcp %s: unexpected error", self.name)
        finally:
            if upstream is not None:
                close_now(upstream)
            stream.socket.close()


class TcpListeners:
    """The running outbound TCP listeners, reconciled with each snapshot (`update`)."""

    def __init__(self, make: Callable[[TcpProxy], TcpListener],
                 port_overrides: Mapping[str, int] | None = None) -> None:
        self._make = make
        self.port_overrides = dict(port_overrides or {})
        self._nursery: trio.Nursery | None = None
        self._running: dict[str, tuple[int, trio.CancelScope]] = {}  # name -> (wanted, scope)
        self.ports: dict[str, int] = {}  # name -> bound port (what the admin and ready show)
        self.bind_failures = 0
        # name -> (port, errno) of the bind failure last logged. A control plane pushes a
        # snapshot per change anywhere in the mesh, and each one retries the bind: without
        # this, a port held by another process would log the same error on every push.
        self._failing: dict[str, tuple[int, int | None]] = {}
        self._wanted_names: set[str] = set()  # the names of the latest snapshot

    def wanted_port(self, t: TcpProxy) -> int:
        return self.port_overrides.get(t.name, t.port)

    async def start(self, nursery: trio.Nursery, tcp: tuple[TcpProxy, ...]) -> None:
        """Bind the first set now (a file snapshot's bind error is the user's to see)."""
        self._nursery = nursery
        self._wanted_names = {t.name for t in tcp}
        for t in tcp:
            # A snapshot applied while an earlier listener bound (update() runs from sync
            # code as soon as _nursery is set) may have removed or moved this one already.
            if t.name not in self._running and t.name in self._wanted_names:
                await nursery.start(self._serve, t, self._claim(t), True)

    def update(self, tcp: tuple[TcpProxy, ...]) -> None:
        """Start new listeners, restart moved ones, stop removed ones (from sync code)."""
        nursery = self._nursery
        if nursery is None:
            return  # not running yet: start() takes the snapshot in force then
        wanted = {t.name: t for t in tcp}
        self._wanted_names = set(wanted)
        for name, (port, scope) in list(self._running.items()):
            t = wanted.get(name)
            if t is None or self.wanted_port(t) != port:
                scope.cancel()
                del self._running[name]
                self.ports.pop(name, None)
        for name in [n for n in self._failing if n not in wanted]:
            del self._failing[name]  # removed: if it comes back, its failure is news again
        for name, t in wanted.items():
            if name not in self._running:
                nursery.start_soon(self._serve, t, self._claim(t), False)

    def _claim(self, t: TcpProxy) -> trio.CancelScope:
        # Registered before the task runs: two snapshots applied in one tick must not start
        # two listeners for one name (the loser's bind error would also drop the winner).
        scope = trio.CancelScope()
        self._running[t.name] = (self.wanted_port(t), scope)
        return scope

    async def _serve(self, t: TcpProxy, scope: trio.CancelScope, strict: bool,
                     task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        port = self.wanted_port(t)
        started = False
        with scope:
            try:
                listeners = await trio.open_tcp_listeners(port, host="127.0.0.1", backlog=1024)
            except OSError as exc:
                self.bind_failures += 1
                entry = self._running.get(t.name)
                if entry is not None and entry[1] is scope:
                    del self._running[t.name]
                if strict:
                    raise ConfigError(f"tcp {t.name} listener: cannot bind 127.0.0.1:{port}: "
                                      f"{exc.strerror}") from None
                if self._failing.get(t.name) != (port, exc.errno):
                    self._failing[t.name] = (port, exc.errno)
                    log.error("tcp listener for service %s: cannot bind 127.0.0.1:%d: %s; "
                              "it stays down and is tried again with each new snapshot "
                              "(logged again when it binds or fails differently)",
                              t.name, port, exc.strerror)
                started = True
                task_status.started()
                return
            bound = listeners[0].socket.getsockname()[1]
            self.ports[t.name] = bound
            if self._failing.pop(t.name, None) is not None:
                # At the error's level: whoever saw the failure must be able to see the end.
                log.warning("tcp listener for service %s: listening on 127.0.0.1:%d, "
                            "after failing to bind", t.name, bound)
            else:
                log.info("tcp %s listening on 127.0.0.1:%d", t.name, bound)
            listener = self._make(t)
            started = True
            task_status.started()
            await trio.serve_listeners(listener.handle, listeners)
        if not started:
            # Cancelled by a newer snapshot (removed or moved) before it was up: that is not
            # a failure of start(), which waits for this.
            task_status.started()
