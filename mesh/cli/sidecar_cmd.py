"""`mesh sidecar`: run one sidecar proxy next to one app instance."""

from __future__ import annotations

import argparse
import json
import logging
import signal
from pathlib import Path
from typing import Any

import trio

from mesh.cli.common import add_creds_flag
from mesh.cli.sidecar_identity import add_identity_flags, identity_config, run_identity
from mesh.errors import ConfigError, MeshError
from mesh.signals import watch_parent
from mesh.snapshot import Snapshot, load_snapshot

log = logging.getLogger("mesh.sidecar")


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "sidecar", help="run a sidecar proxy (data plane)",
        description="Run one sidecar next to one app instance. Prints one JSON line "
                    "{\"event\": \"ready\", ...ports} on stdout once every listener is bound. "
                    "SIGHUP or a change of the file reloads the snapshot.")
    p.add_argument("--service", required=True, help="the service this sidecar serves")
    p.add_argument("--version", dest="service_version", default="v1",
                   help="this instance's version (subset), e.g. v2")
    p.add_argument("--app-port", type=int, required=True, help="the local app's HTTP port")
    p.add_argument("--config", type=Path,
                   help="snapshot file (YAML or JSON); with --nats, used until the control "
                        "plane answers")
    p.add_argument("--nats", help="NATS URL(s): get snapshots from the control plane "
                                  "(docs/sync.md)")
    add_creds_flag(p)  # the sidecar role's file (bus/auth.py); default $MESH_NATS_CREDS
    p.add_argument("--instance", help="instance name for the control plane "
                                      "(default: service-version-host-pid)")
    p.add_argument("--heartbeat", type=float, default=1.0,
                   help="seconds between heartbeats to the control plane")
    p.add_argument("--outbound-port", type=int, default=15001, help="0: pick a free port")
    p.add_argument("--inbound-port", type=int, default=15006, help="0: pick a free port")
    p.add_argument("--admin-port", type=int, default=15000, help="0: pick a free port")
    p.add_argument("--tcp-port", action="append", default=[], metavar="NAME=PORT",
                   help="local port of the outbound TCP listener NAME (a TCP Service), over "
                        "the Service's port; repeatable; 0: pick a free port")
    p.add_argument("--inbound-host", default="127.0.0.1", help="address the inbound listener binds")
    p.add_argument("--ready-file", type=Path, help="also write the ready JSON line here")
    p.add_argument("--watch-interval", type=float, default=1.0,
                   help="seconds between checks of the snapshot file")
    t = p.add_argument_group("telemetry (docs/telemetry.md)")
    t.add_argument("--telemetry-nats", help="NATS URL(s) for telemetry batches and spans "
                                            "(default: --nats; none: /metrics only)")
    t.add_argument("--telemetry-interval", type=float, default=1.0,
                   help="seconds between telemetry batches")
    t.add_argument("--trace-sample", type=float, default=0.01,
                   help="ratio of new traces sampled (0..1, default 0.01)")
    t.add_argument("--otlp-endpoint", help="also export spans with OTLP/HTTP, e.g. "
                                          "http://127.0.0.1:4318")
    t.add_argument("--access-log", help="JSON access log: a file, or - for stdout")
    t.add_argument("--access-log-publish", action="store_true",
                   help="also publish access-log entries on mesh.accesslog.<service>")
    t.add_argument("--no-telemetry", action="store_true", help="turn request telemetry off")
    add_identity_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Imported here so that `mesh --help` does not pay for the data plane.
    from sidecar.server import Sidecar, SidecarOptions

    for flag in ("app_port", "outbound_port", "inbound_port", "admin_port"):
        value = getattr(args, flag)
        if not 0 <= value <= 65535 or (flag == "app_port" and value == 0):
            raise ConfigError(f"--{flag.replace('_', '-')}: {value} is not a valid port")
    if args.config is None and not args.nats:
        raise ConfigError("give --config FILE, --nats URL (the control plane), or both")
    tcp_ports: list[tuple[str, int]] = []
    for item in args.tcp_port:
        name, sep, port = item.partition("=")
        if not sep or not name or not port.isdigit() or int(port) > 65535:
            raise ConfigError(f"--tcp-port {item!r}: expected NAME=PORT, e.g. stock=16379")
        tcp_ports.append((name, int(port)))
    opts = SidecarOptions(
        service=args.service, version=args.service_version, app_port=args.app_port,
        config=args.config, outbound_port=args.outbound_port, inbound_port=args.inbound_port,
        admin_port=args.admin_port, inbound_host=args.inbound_host,
        watch_interval=args.watch_interval, tcp_ports=tuple(tcp_ports))
    initial = (load_snapshot(args.config) if args.config is not None
               else Snapshot(version="0", service=args.service))
    identity = identity_config(args, f"{args.service}-{args.service_version}")
    sidecar = Sidecar(opts, initial)
    if not args.no_telemetry:
        from sidecar.telemetry import SidecarTelemetry, TelemetryOptions

        nats = args.telemetry_nats or args.nats
        sidecar.telemetry = SidecarTelemetry(
            args.service, args.instance or f"{args.service}-{args.service_version}-{_pid()}",
            TelemetryOptions(namespace=getattr(args, "namespace", None) or "default", interval=args.telemetry_interval,
                             trace_sample_ratio=args.trace_sample,
                             otlp_endpoint=args.otlp_endpoint, access_log=args.access_log,
                             access_log_publish=args.access_log_publish),
            nats=nats.split(",") if nats else None)
    sync = _sync_client(args, sidecar) if args.nats else None

    async def main() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            async with trio.open_nursery() as nursery:
                # Signals are handled from the start: a sidecar still waiting for its first
                # certificate or for NATS must stop on SIGTERM, not after its deadline.
                async def handle_signals() -> None:
                    async for signum in signals:
                        if signum == signal.SIGHUP:
                            sidecar.reload()
                        else:
                            if sync is not None:
                                # Tells the control plane and closes the bus from inside
                                # the sync task (sync_client.py says why), then returns.
                                await sync.leave()
                            nursery.cancel_scope.cancel()
                            return

                nursery.start_soon(handle_signals)
                nursery.start_soon(watch_parent, nursery.cancel_scope)
                if identity is not None:  # ready only with a certificate (or exit)
                    await nursery.start(run_identity, identity, sidecar)
                ports = await nursery.start(sidecar.run)
                if sync is not None:
                    host = "127.0.0.1" if opts.inbound_host in ("0.0.0.0", "") else opts.inbound_host
                    sync.state.address = f"{host}:{ports['inbound']}"
                    sync.state.admin = f"127.0.0.1:{ports['admin']}"
                    await nursery.start(sync.run)
                    ports["instance"] = sync.state.instance
                line = json.dumps({"event": "ready", "service": opts.service,
                                   "version": opts.version, "pid": _pid(), **ports})
                if args.ready_file is not None:  # before stdout: either signal means both
                    tmp = args.ready_file.with_suffix(".tmp")
                    try:
                        tmp.write_text(line + "\n")
                        tmp.replace(args.ready_file)  # readers never see half a line
                    except OSError as exc:
                        raise ConfigError(f"--ready-file {args.ready_file}: cannot write: "
                                          f"{exc.strerror}") from None
                print(line, flush=True)

    try:
        trio.run(main)
    except MeshError:
        raise
    except BaseExceptionGroup as group:
        # A bind failure raised inside a nursery arrives wrapped in (nested) groups.
        leaf = _first_mesh_error(group)
        if leaf is not None:
            raise leaf from None
        raise
    # A log line, not a print: under `mesh up` every sidecar's stderr is the user's terminal,
    # and a stop they asked for needs no line per sidecar (-v shows it).
    log.info("sidecar %s stopped", opts.service)
    return 0


def _sync_client(args: argparse.Namespace, sidecar: Any) -> Any:
    from bus.client import BusOptions
    from mesh.sync import ClientSync
    from sidecar.sync_client import SyncClient, default_instance

    instance = args.instance or default_instance(args.service, args.service_version)
    state = ClientSync(instance=instance, service=args.service, label=args.service_version)
    client = SyncClient(BusOptions.parse_servers(args.nats), state, sidecar.apply_snapshot,
                        heartbeat=args.heartbeat)
    return client


def _first_mesh_error(exc: BaseException) -> MeshError | None:
    if isinstance(exc, MeshError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _first_mesh_error(inner)
            if found is not None:
                return found
    return None


def _pid() -> int:
    import os

    return os.getpid()
