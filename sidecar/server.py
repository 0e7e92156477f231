"""One sidecar process: listeners, snapshot reloads, and the admin endpoint."""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from mesh.errors import ConfigError
from mesh.snapshot import Cluster, Snapshot, TcpProxy, load_snapshot
from sidecar.admin import AdminServer
from sidecar.identity import IdentityAgent
from sidecar.mirror import Mirror
from sidecar.mtls import InboundGate, UpstreamTls
from sidecar.pool import Pool
from sidecar.proxy import HttpProxy
from sidecar.runtime import Runtime
from sidecar.stats import Stats
from sidecar.tcp_inbound import TcpInbound
from sidecar.tcp_proxy import TcpListener, TcpListeners
from sidecar.tcp_telemetry import TcpCollector, TcpRecorder
from sidecar.telemetry import SidecarTelemetry

log = logging.getLogger("mesh.sidecar")


@dataclass(frozen=True)
class SidecarOptions:
    service: str
    version: str
    app_port: int
    config: Path | None  # None: snapshots come only from the control plane (--nats)
    outbound_port: int = 15001
    inbound_port: int = 15006
    admin_port: int = 15000
    inbound_host: str = "127.0.0.1"  # other hosts' sidecars need 0.0.0.0
    watch_interval: float = 1.0
    # Local ports of outbound TCP listeners by name, over the snapshot's (`--tcp-port`):
    # callers sharing a host cannot all bind a Service's port.
    tcp_ports: tuple[tuple[str, int], ...] = ()


def check_snapshot(snapshot: Snapshot, opts: SidecarOptions) -> None:
    if snapshot.service is not None and snapshot.service != opts.service:
        raise ConfigError(f"{opts.config or 'control plane'}: service: snapshot is for "
                          f"{snapshot.service!r}, this sidecar runs {opts.service!r}")


class Sidecar:
    def __init__(self, opts: SidecarOptions, snapshot: Snapshot,
                 inbound_ssl: ssl.SSLContext | None = None,
                 upstream_ssl: ssl.SSLContext | None = None) -> None:
        """TLS seam for the identity issue: `inbound_ssl` (a server context) wraps the
        inbound listener, `upstream_ssl` (a client context) every outbound connection.
        The local app is always spoken to in plaintext."""
        check_snapshot(snapshot, opts)
        self.opts = opts
        self.stats = Stats()
        self._rng = random.Random()
        self._runtime = Runtime(snapshot, opts.app_port, self._rng, time.monotonic)
        self.stats.snapshot_version = snapshot.version
        self.stats.reloads_ok = 1
        self._local_tcp: tuple[tuple[TcpProxy, ...], tuple[Cluster, ...]] = ((), ())
        if opts.config is not None:
            self._remember_local_tcp(snapshot)
        self._upstream_tls: UpstreamTls | None = None
        self.tcp_listeners: TcpListeners | None = None  # set by run()
        self.telemetry: SidecarTelemetry | None = None  # set before run() to turn it on
        self.inbound_ssl = inbound_ssl
        self.pool = Pool(ssl_context=upstream_ssl)  # to other sidecars
        self.app_pool = Pool()  # to the local app
        # Route mirrors: fire-and-forget copies, in a nursery started by run().
        self.mirror = Mirror(self.pool, self.stats, self._rng)
        self.identity: InboundGate | None = None  # mTLS, set by use_identity
        self._agent: IdentityAgent | None = None
        self._identity_mode = "STRICT"
        self.ports: dict[str, Any] = {}
        self.ready = False
        self.loaded_at = time.time()
        self._mtime = self._stat()

    def runtime(self) -> Runtime:
        return self._runtime

    def use_identity(self, agent: IdentityAgent, mode: str) -> None:
        """mTLS with the agent's SVID (docs/identity.md, "mTLS in the sidecar"): call before
        `run`, once the agent has its first certificate. `mode`: STRICT, PERMISSIVE or
        DISABLE (the snapshot's inbound.mtls wins when set)."""
        self._agent = agent
        if mode != "DISABLE":
            self._upstream_tls = UpstreamTls(agent, self.stats)
            self.pool.tls = self._upstream_tls.connect
        self.stats.cert_expiry = agent.seconds_to_expiry
        self._identity_mode = mode
        # Authorization scopes a bare `source` to our own namespace, known only from now on.
        self._runtime = Runtime(self._runtime.snapshot, self.opts.app_port, self._rng,
                                time.monotonic, previous=self._runtime,
                                namespace=self._namespace())

    def _namespace(self) -> str | None:
        return self._agent.identity.namespace if self._agent is not None else None

    def certs(self) -> dict[str, Any] | None:
        """For the admin `/certs`: the current chain and the trust bundle (never the key)."""
        agent = self._agent
        if agent is None:
            return None
        chain, bundle = agent.certs_pem()
        svid = agent.svid
        return {"identity": svid.identity.uri, "serial": svid.issued.serial_hex,
                "not_after": svid.not_after.isoformat(),
                "seconds_to_expiry": round(agent.seconds_to_expiry(), 3),
                "chain_pem": chain.decode("ascii"), "bundle_pem": bundle.decode("ascii")}

    def _stat(self) -> tuple[int, int] | None:
        if self.opts.config is None:
            return None
        try:
            st = os.stat(self.opts.config)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    def reload(self) -> bool:
        """Load the file again; on any error keep the running snapshot and say why."""
        if self.opts.config is None:
            return False
        try:
            snapshot = load_snapshot(self.opts.config)
        except ConfigError as exc:
            self.stats.reloads_failed += 1
            log.error("snapshot refused, keeping version %s: %s",
                      self._runtime.snapshot.version, exc)
            return False
        except Exception:
            # A parser bug must cost one reload, never the running sidecar.
            self.stats.reloads_failed += 1
            log.exception("snapshot refused (internal error), keeping version %s",
                          self._runtime.snapshot.version)
            return False
        before = self._local_tcp
        self._remember_local_tcp(snapshot)
        if self.apply_snapshot(snapshot) is not None:
            self._local_tcp = before  # refused: the running file's listeners stay the local ones
            return False
        return True

    def _remember_local_tcp(self, snapshot: Snapshot) -> None:
        """TCP listeners of the file snapshot are local to this sidecar (their ports are this
        host's, their clusters may be plain apps); control-plane snapshots keep them, next
        to the TCP services the control plane compiles (docs/resources.md)."""
        wanted = {t.cluster for t in snapshot.tcp}
        self._local_tcp = (snapshot.tcp, tuple(c for c in snapshot.clusters if c.name in wanted))

    def apply_snapshot(self, snapshot: Snapshot) -> str | None:
        """Swap in a snapshot (from the file or the control plane) after the same checks;
        returns None once it is in force, else why it was refused (the old one stays)."""
        tcp, tcp_clusters = self._local_tcp
        if tcp:
            # The snapshot's own listeners win a name clash; the file's keep their clusters.
            names = {c.name for c in snapshot.clusters}
            own = {t.name for t in snapshot.tcp}
            extra = tuple(t for t in tcp if t.name not in own)
            snapshot = dataclasses.replace(
                snapshot, tcp=snapshot.tcp + extra,
                clusters=snapshot.clusters + tuple(
                    c for c in tcp_clusters
                    if c.name not in names and any(t.cluster == c.name for t in extra)))
        try:
            check_snapshot(snapshot, self.opts)
            runtime = Runtime(snapshot, self.opts.app_port, self._rng, time.monotonic,
                              previous=self._runtime, namespace=self._namespace())
        except ConfigError as exc:
            self.stats.reloads_failed += 1
            log.error("snapshot refused, keeping version %s: %s",
                      self._runtime.snapshot.version, exc)
            return str(exc)
        self._runtime = runtime
        if self.tcp_listeners is not None:
            self.tcp_listeners.update(snapshot.tcp)
        self.stats.reloads_ok += 1
        self.stats.snapshot_version = snapshot.version
        if self.telemetry is not None:
            self.telemetry.recorder.config_version = snapshot.version
        self.loaded_at = time.time()
        # Routine (every push, every sidecar at start): -v shows it; refusals are errors.
        log.info("snapshot version %s loaded", snapshot.version)
        return None

    def config_dump(self) -> dict[str, Any]:
        rt = self._runtime
        return {
            "service": self.opts.service, "version": self.opts.version,
            "listeners": self.ports, "loaded_at": self.loaded_at,
            "reloads": {"ok": self.stats.reloads_ok, "failed": self.stats.reloads_failed},
            "ejected": {name: [str(ep) for ep, h in c.health.items()
                               if h.ejected_until > time.monotonic()]
                        for name, c in rt.clusters.items()},
            "snapshot": rt.snapshot.to_dict(),
        }

    async def _watch_file(self) -> None:
        while True:
            await trio.sleep(self.opts.watch_interval)
            current = self._stat()
            if current is not None and current != self._mtime:
                self._mtime = current
                self.reload()

    async def run(self, *, task_status: trio.TaskStatus[dict[str, Any]] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        o = self.opts
        tel = self.telemetry
        outbound = HttpProxy("outbound", self.runtime, self.pool, self.stats, o.service, self._rng,
                             tel, o.version, self.mirror)
        inbound = HttpProxy("inbound", self.runtime, self.app_pool, self.stats, o.service,
                            self._rng, tel, o.version)
        admin = AdminServer(self.stats, self.config_dump, lambda: self.ready, self.certs)
        if tel is not None:
            tel.register(admin.registry)
            tel.recorder.config_version = self._runtime.snapshot.version
        if tel is not None:
            tcp_recorder = tel.recorder.tcp
        else:  # no batches, but /metrics still counts TCP connections and refusals
            tcp_recorder = TcpRecorder()
            admin.registry.register(TcpCollector(tcp_recorder))
        tcp_inbound = TcpInbound(self.runtime, o.app_port, o.service, o.version, tcp_recorder)

        async def inbound_any(stream: trio.abc.Stream, peer: Any = None) -> None:
            # The service's protocol is the snapshot's, read per connection: opaque TCP
            # (inbound.tcp) is spliced to the app, anything else is HTTP.
            if self._runtime.snapshot.inbound.tcp is not None:
                await tcp_inbound.handle(stream, peer)
            else:
                await inbound.handle(stream, peer)

        agent = self._agent
        inbound_handler: Any = inbound_any
        if agent is not None:
            self.identity = InboundGate(agent, self._identity_mode, self.runtime, self.stats,
                                        inbound_any)
            inbound_handler = self.identity.handle
            inbound.trust_declared_source = False
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.mirror.run)
                ports: dict[str, Any] = {}
                for name, port, host, handler in (
                    ("outbound", o.outbound_port, "127.0.0.1", outbound.handle),
                    ("inbound", o.inbound_port, o.inbound_host, inbound_handler),
                    ("admin", o.admin_port, "127.0.0.1", admin.handle),
                ):
                    ssl_context = (self.inbound_ssl if name == "inbound" and agent is None
                                   else None)
                    ports[name] = await self._listen(nursery, name, host, port, handler,
                                                     ssl_context)
                upstream_tls = self._upstream_tls
                tcp = TcpListeners(
                    lambda t: TcpListener(t, self.runtime, service=o.service,
                                          recorder=tcp_recorder,
                                          tls=upstream_tls.connect if upstream_tls else None),
                    dict(o.tcp_ports))
                self.tcp_listeners = tcp  # before start: a snapshot arriving meanwhile updates it
                await tcp.start(nursery, self._runtime.snapshot.tcp)
                ports["tcp"] = tcp.ports  # the live dict: later listeners show in /config_dump
                self.ports = ports
                nursery.start_soon(self._watch_file)
                if tel is not None:
                    await nursery.start(tel.run)
                self.ready = True
                task_status.started(ports)
        finally:
            self.pool.close_all()
            self.app_pool.close_all()

    async def _listen(self, nursery: trio.Nursery, name: str, host: str, port: int,
                      handler: Any, ssl_context: ssl.SSLContext | None = None) -> int:
        try:
            listeners = await trio.open_tcp_listeners(port, host=host, backlog=1024)
        except OSError as exc:
            raise ConfigError(f"{name} listener: cannot bind {host}:{port}: {exc.strerror}"
                              ) from None
        sock = listeners[0].socket
        served: list[trio.abc.Listener[Any]] = list(listeners)
        if ssl_context is not None:
            served = [trio.SSLListener(x, ssl_context, https_compatible=True)
                      for x in listeners]
        nursery.start_soon(trio.serve_listeners, handler, served)
        bound: int = sock.getsockname()[1]
        return bound
