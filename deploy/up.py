"""`mesh up`: NATS (embedded, or an existing cluster) plus control-plane replicas, as one tree.

Process model: this process supervises children and owns nothing else. The
embedded nats-server and each control-plane replica are separate processes,
so a replica can be killed (chaos, crashes) and restarted without taking NATS
or its siblings with it; Ctrl-C or SIGTERM stops the replicas first, then NATS.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import trio

from actors.ca_config import secret_env_for_children
from actors.dashboard import DEFAULT_DASHBOARD_PORT
from actors.telemetry import DEFAULT_METRICS_PORT
from bus.auth import (
    CREDS_ENV,
    SidecarScope,
    authorization_config,
    child_env,
    ensure_credentials,
    mesh_users,
)
from bus.server import NatsServer, NodeSpec
from deploy.load import DEFAULT_BACKGROUND_DURATION, background_load
from deploy.supervisor import ChildProcess
from deploy.topology import Topology
from deploy.topology_plan import make_plan
from deploy.topology_run import RunningTopology, run_topology
from mesh.concurrency import unwrap_single
from mesh.errors import ConfigError
from mesh.processes import free_port

log = logging.getLogger("mesh.up")

DEFAULT_NATS_PORT = 4222
# Where the replicas' HTTP endpoints listen (MESH_HTTP_HOST, as in actors/dashboard.py),
# as a URL host: a wildcard bind is reached on loopback.
_HTTP_HOST = os.environ.get("MESH_HTTP_HOST", "").replace("0.0.0.0", "") or "127.0.0.1"
# `Running.http_port` arguments: the replica's ready-line key, its env override, its default.
DASHBOARD = ("dashboard", "MESH_DASHBOARD_PORT", DEFAULT_DASHBOARD_PORT)
METRICS = ("metrics", "MESH_METRICS_PORT", DEFAULT_METRICS_PORT)


class StartupInterrupted(Exception):
    """SIGINT/SIGTERM arrived before the mesh was up; everything started is stopped."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"{signal.Signals(signum).name} before the mesh was up")
        self.signum = signum


@dataclass
class UpConfig:
    state_dir: Path
    nats_urls: list[str] = field(default_factory=list)  # empty: run an embedded node
    nats_port: int = DEFAULT_NATS_PORT
    replicas: int = 1
    topology: Topology | None = None
    ingress_port: int | None = None  # overrides the topology's ingress port (0: any free port)
    # Joining a cluster (nats_urls): the credentials file every child uses (controlplane
    # role); None: $MESH_NATS_CREDS, else anonymous. An embedded node ignores it: it makes
    # its own users under <state_dir>/nats-creds.
    creds: Path | None = None
    # Background load through the topology's ingress (requests/s; 0: none), see deploy/load.py.
    load_rate: float = 0.0
    load_duration: float = DEFAULT_BACKGROUND_DURATION


def controlplane_argv(nats_urls: Sequence[str], replica: str, verbosity: int = 0) -> list[str]:
    argv = [sys.executable, "-m", "mesh"]
    if verbosity:
        argv.append("-" + "v" * verbosity)
    return [
        *argv,
        "controlplane",
        "--nats",
        ",".join(nats_urls),
        "--replica",
        replica,
        "--ready-line",
    ]


def _joined_env(config: UpConfig) -> dict[str, str]:
    """Joining a cluster: its credentials (--creds, else $MESH_NATS_CREDS) for every child."""
    joined = config.creds or os.environ.get(CREDS_ENV)
    return {CREDS_ENV: os.path.abspath(joined)} if joined else {}


def _check_port_free(port: int) -> None:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            raise ConfigError(
                f"port {port} on 127.0.0.1 is already in use (another `mesh up` or nats-server?): "
                "stop it, pass --nats-port 0 for a free port, or join it with --nats nats://127.0.0.1:"
                f"{port}"
            ) from None


@dataclass
class Running:
    nats_urls: list[str]
    nats: NatsServer | None
    replicas: list[ChildProcess]
    topology: RunningTopology | None = None
    admin_creds: Path | None = None  # the CLI's credentials for the embedded NATS
    load_rate: float = 0.0
    load_duration: float = DEFAULT_BACKGROUND_DURATION

    def http_port(self, key: str, env: str, default: int) -> tuple[int | None, str]:
        """The port the first replica bound for `key` ("dashboard", "metrics": its ready
        line says, see actors/controlplane.py), None when off; and a note for the banner
        when that is not the port asked for (busy: the replica took an ephemeral one)."""
        info = self.replicas[0].ready_info if self.replicas else {}
        if key not in info:  # a replica that does not report its ports: the port asked for
            wanted = os.environ.get(env, str(default))
            return (None if wanted in ("", "off") else int(wanted)), ""
        bound = info[key]
        if not isinstance(bound, int):
            return None, ""
        wanted = os.environ.get(env, str(default))
        if wanted.isdigit() and int(wanted) not in (0, bound):
            return bound, f"; port {wanted} was busy"
        return bound, ""

    def describe(self, mesh: str = "mesh") -> str:
        """The banner; `mesh` is how the user ran the command (e.g. .venv/bin/mesh), so the
        next steps it suggests can be pasted as they are."""
        lines = ["trio-mesh is up"]
        if self.nats:
            lines.append(
                f"  nats          {self.nats.url}  (embedded, JetStream; pid {self.nats.process.pid if self.nats.process else '?'}; "
                f"monitor http://{self.nats.spec.host}:{self.nats.spec.http_port}; data {self.nats.spec.state_dir})"
            )
        else:
            lines.append(f"  nats          {', '.join(self.nats_urls)}  (existing cluster)")
        if self.admin_creds:
            lines.append(
                f"  credentials   {self.admin_creds.parent}/  (NATS users per role, mode 0600; "
                "the CLI uses admin.json from here by default)"
            )
        for child in self.replicas:
            lines.append(f"  controlplane  {child.name}  pid {child.pid}")
        dash, dash_note = self.http_port(*DASHBOARD)
        metrics, metrics_note = self.http_port(*METRICS)
        if dash is not None:
            lines.append(
                f"  dashboard     http://{_HTTP_HOST}:{dash}/  (served by {self.replicas[0].name}"
                f"{dash_note})"
            )
        if metrics is not None:
            lines.append(
                f"  metrics       http://{_HTTP_HOST}:{metrics}/metrics  (mesh-wide, Prometheus"
                f"{metrics_note})"
            )
        ingress = self.topology.plan.ingress if self.topology is not None else None
        if self.topology is not None:
            lines.append(self.topology.describe())
        if ingress is not None and self.load_rate:
            lines.append(
                f"  load          {self.load_rate:g} requests/s through the ingress in the "
                f"background, for {self.load_duration / 60:g} min (--no-load: none)"
            )
        if ingress is None:
            lines.append(f"Try `{mesh} ping` in another shell. Stop with Ctrl-C.")
            return "\n".join(lines)
        steps = [(f"{mesh} top", "live traffic per edge (every demo edge within seconds)")]
        steps.append(
            (f"curl http://127.0.0.1:{ingress.outbound_port}/", "one request through the mesh")
        )
        if dash is not None:
            steps.append((f"open http://{_HTTP_HOST}:{dash}/", "the dashboard"))
        if self.topology is not None and self.topology.identities.by_account:
            steps.append((f"{mesh} certs", "each sidecar's SPIFFE identity"))
        width = max(len(cmd) for cmd, _ in steps)
        lines.append("Next, in another shell:")
        lines.extend(f"  {cmd.ljust(width)}   {what}" for cmd, what in steps)
        lines.append("Stop with Ctrl-C.")
        return "\n".join(lines)


async def run_up(
    config: UpConfig,
    verbosity: int = 0,
    *,
    task_status: trio.TaskStatus[Running] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Start everything; on SIGINT/SIGTERM stop apps and sidecars, then replicas, then NATS.

    A signal during start-up, or a second signal, stops everything at once.
    """
    if config.replicas < 1:
        raise ConfigError(f"--replicas must be at least 1, not {config.replicas}")
    stopping, started = trio.Event(), trio.Event()
    received: list[int] = []
    with unwrap_single():
        async with trio.open_nursery() as outer:  # owns NATS, which stops last
            with trio.CancelScope() as body:
                await outer.start(_watch_signals, body, stopping, started, received)
                nats: NatsServer | None = None
                urls = list(config.nats_urls)
                plan = None
                if config.topology is not None:
                    plan = make_plan(config.topology, free_port, config.ingress_port)
                if not urls:
                    if config.nats_port:
                        _check_port_free(config.nats_port)
                    # Security by default: every client of our NATS needs a user; the
                    # passwords stay in 0600 files and reach children as paths.
                    # Each sidecar's user may speak only for its service and instance
                    # (bus/auth.py): a compromised sidecar cannot pose as another service.
                    # Its telemetry namespace is not pinned: the sidecar picks that label.
                    scopes = (
                        [
                            SidecarScope(i.service, i.name)
                            for i in plan.instances
                            if i.snapshot is not None
                        ]
                        if plan
                        else []
                    )
                    creds = ensure_credentials(config.state_dir, mesh_users(scopes))
                    spec = NodeSpec(
                        "mesh-embedded",
                        config.state_dir / "nats",
                        port=config.nats_port,
                        authorization=authorization_config(creds.values()),
                    )
                    nats = await outer.start(NatsServer(spec).run)
                    urls = [nats.url]
                    cp_env = child_env(creds["controlplane"])
                    admin_creds = creds["admin"].path

                    def env_for(who: str) -> dict[str, str]:
                        user = "admin" if who == "admin" else f"sidecar-{who}"
                        return child_env(creds[user])
                else:
                    cp_env = _joined_env(config)
                    admin_creds = None

                    def env_for(who: str) -> dict[str, str]:
                        return cp_env

                env = {**secret_env_for_children(config.state_dir), **cp_env}
                async with trio.open_nursery() as cp:
                    replicas = []
                    for i in range(config.replicas):
                        name = f"cp-{i + 1}"
                        child = ChildProcess(
                            name, controlplane_argv(urls, name, verbosity), env=env
                        )
                        replicas.append(await cp.start(child.run))
                    running = Running(urls, nats, replicas, admin_creds=admin_creds)
                    async with trio.open_nursery() as apps:
                        if plan is not None:
                            running.topology = await apps.start(
                                run_topology, plan, config.state_dir, urls, env_for
                            )
                            ingress = plan.ingress.outbound_port if plan.ingress else None
                            if ingress is not None and config.load_rate > 0:
                                # A task in this nursery: it stops first, before the apps.
                                running.load_rate = config.load_rate
                                running.load_duration = config.load_duration
                                apps.start_soon(
                                    _run_background_load,
                                    ingress,
                                    config.load_rate,
                                    config.load_duration,
                                )
                        task_status.started(running)
                        started.set()
                        await stopping.wait()
                        apps.cancel_scope.cancel()
                    cp.cancel_scope.cancel()
            outer.cancel_scope.cancel()
    if not started.is_set():
        # Only a signal cancels the body; everything it started is stopped by now. Returning
        # would leave the caller's nursery.start without a result (a RuntimeError traceback).
        raise StartupInterrupted(received[0] if received else signal.SIGINT)


async def _run_background_load(port: int, rate: float, duration: float) -> None:
    result = await background_load("127.0.0.1", port, rate=rate, duration=duration)
    log.warning(
        "background load stopped after its cap of %g s (%d requests); `mesh load` sends more",
        duration,
        result.sent,
    )


async def _watch_signals(
    body: trio.CancelScope,
    stopping: trio.Event,
    started: trio.Event,
    received: list[int],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        async for signum in signals:
            received.append(signum)
            log.warning("%s received: stopping the mesh", signal.Signals(signum).name)
            if stopping.is_set() or not started.is_set():
                body.cancel()  # a second signal, or still starting: stop everything at once
            stopping.set()
