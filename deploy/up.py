"""`mesh up`: NATS (embedded, or an existing cluster) plus control-plane replicas, as one tree.

Process model: this process supervises children and owns nothing else. The
embedded nats-server and each control-plane replica are separate processes,
so a replica can be killed (chaos, crashes) and restarted without taking NATS
or its siblings with it; Ctrl-C or SIGTERM stops the replicas first, then NATS.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import trio

from actors.ca_config import secret_env_for_children
from bus.server import NatsServer, NodeSpec
from deploy.supervisor import ChildProcess
from deploy.topology import Topology
from deploy.topology_plan import Plan, make_plan
from deploy.topology_run import RunningTopology, run_topology
from mesh.concurrency import unwrap_single
from mesh.errors import ConfigError
from mesh.processes import free_port
from mesh.signals import cancel_on_signals

DEFAULT_NATS_PORT = 4222


@dataclass
class UpConfig:
    state_dir: Path
    nats_urls: list[str] = field(default_factory=list)  # empty: run an embedded node
    nats_port: int = DEFAULT_NATS_PORT
    replicas: int = 1
    topology: Topology | None = None
    ingress_port: int | None = None  # overrides the topology's ingress port (0: any free port)


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

    def describe(self) -> str:
        lines = ["trio-mesh is up"]
        if self.nats:
            lines.append(
                f"  nats          {self.nats.url}  (embedded, JetStream; pid {self.nats.process.pid if self.nats.process else '?'}; "
                f"monitor http://{self.nats.spec.host}:{self.nats.spec.http_port}; data {self.nats.spec.state_dir})"
            )
        else:
            lines.append(f"  nats          {', '.join(self.nats_urls)}  (existing cluster)")
        for child in self.replicas:
            lines.append(f"  controlplane  {child.name}  pid {child.pid}")
        if self.topology is not None:
            lines.append(self.topology.describe())
        lines.append("Try `mesh ping` in another shell. Stop with Ctrl-C.")
        return "\n".join(lines)


async def run_up(
    config: UpConfig,
    verbosity: int = 0,
    *,
    task_status: trio.TaskStatus[Running] = trio.TASK_STATUS_IGNORED,
) -> None:
    if config.replicas < 1:
        raise ConfigError(f"--replicas must be at least 1, not {config.replicas}")
    with unwrap_single():
        async with trio.open_nursery() as outer:  # owns NATS, which stops last
            with trio.CancelScope() as body:  # a signal cancels this: replicas stop first
                await outer.start(cancel_on_signals, body)
                nats: NatsServer | None = None
                urls = list(config.nats_urls)
                if not urls:
                    if config.nats_port:
                        _check_port_free(config.nats_port)
                    spec = NodeSpec(
                        "mesh-embedded", config.state_dir / "nats", port=config.nats_port
                    )
                    nats = await outer.start(NatsServer(spec).run)
                    urls = [nats.url]
                env = secret_env_for_children(config.state_dir)  # CA operator secret
                async with trio.open_nursery() as cp:
                    replicas = []
                    for i in range(config.replicas):
                        name = f"cp-{i + 1}"
                        child = ChildProcess(
                            name, controlplane_argv(urls, name, verbosity), env=env
                        )
                        replicas.append(await cp.start(child.run))
                    running = Running(urls, nats, replicas)
                    if config.topology is not None:
                        plan = make_plan(config.topology, free_port, config.ingress_port)
                        # Nested: apps and sidecars stop before the control plane and NATS.
                        apps = await cp.start(_run_nested, plan, config.state_dir)
                        running.topology = apps
                    task_status.started(running)
            outer.cancel_scope.cancel()


async def _run_nested(
    plan: Plan,
    state_dir: Path,
    *,
    task_status: trio.TaskStatus[RunningTopology] = trio.TASK_STATUS_IGNORED,
) -> None:
    async with trio.open_nursery() as nursery:
        running = await nursery.start(run_topology, plan, state_dir)
        task_status.started(running)
