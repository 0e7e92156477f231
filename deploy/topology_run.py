"""Start a planned topology: every app instance, then its sidecar, supervised together.

Apps start first (a sidecar whose app is not listening yet would answer 503 to
the first requests); each child is restarted if it dies. Stopping cancels the
nursery: sidecars and apps get SIGTERM, then SIGKILL after a grace period.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import trio
import yaml

from deploy.supervisor import ChildProcess
from deploy.topology_plan import HOST, Instance, Plan, topology_resources
from mesh.errors import ConfigError


@dataclass
class RunningTopology:
    plan: Plan
    children: dict[str, ChildProcess]

    def describe(self) -> str:
        lines = [f"  topology      {self.plan.topology.name}: {len(self.plan.instances)} instances"]
        for inst in self.plan.instances:
            parts = [f"    {inst.name:<18}"]
            if inst.has_app:
                parts.append(f"app :{inst.app_port}")
            if inst.inbound_port is not None:
                parts.append(
                    f"sidecar in :{inst.inbound_port} out :{inst.outbound_port} admin :{inst.admin_port}"
                )
            lines.append("  ".join(parts))
        ingress = self.plan.ingress
        if ingress is not None:
            lines.append(f"  ingress       http://{HOST}:{ingress.outbound_port}/")
        return "\n".join(lines)


def sidecar_argv(inst: Instance, config: Path, nats_urls: list[str]) -> list[str]:
    argv = [
        sys.executable, "-m", "mesh", "sidecar",
        "--service", inst.service, "--version", inst.version,
        "--app-port", str(inst.app_port), "--config", str(config),
        "--inbound-port", str(inst.inbound_port), "--outbound-port", str(inst.outbound_port),
        "--admin-port", str(inst.admin_port), "--instance", inst.name,
    ]  # fmt: skip
    for name, port in sorted(inst.tcp_ports.items()):  # callers share this host's ports
        argv += ["--tcp-port", f"{name}={port}"]
    if nats_urls:
        # Routes come from the control plane (so `mesh route weights` and `mesh apply` act
        # on the topology); telemetry and spans go to the same NATS (mesh top, dashboard).
        urls = ",".join(nats_urls)
        argv += ["--nats", urls, "--telemetry-nats", urls]
    return argv


async def apply_resources(
    plan: Plan, state_dir: Path, nats_urls: list[str], env: dict[str, str] | None = None
) -> None:
    """Write the topology's routing as control-plane resources, with `mesh apply` itself."""
    path = state_dir / "topology-resources.yaml"
    path.write_text(yaml.safe_dump_all(topology_resources(plan.topology), sort_keys=False))
    argv = [sys.executable, "-m", "mesh", "apply", "-f", str(path), "--nats", ",".join(nats_urls),
            "--note", f"topology {plan.topology.name}"]  # fmt: skip
    with trio.fail_after(30):
        result = await trio.run_process(
            argv, capture_stdout=True, capture_stderr=True, check=False,
            env={**os.environ, **(env or {})},
        )  # fmt: skip
    if result.returncode != 0:
        raise ConfigError(
            f"applying the topology's routes failed: {result.stderr.decode().strip()}"
        )


async def run_topology(
    plan: Plan,
    state_dir: Path,
    nats_urls: list[str] | None = None,
    # NATS credentials per child, as environment: "admin" for `mesh apply`, else the
    # instance name of a sidecar (bus/auth.py; only paths, never secrets).
    creds_env: Callable[[str], dict[str, str]] | None = None,
    *,
    task_status: trio.TaskStatus[RunningTopology] = trio.TASK_STATUS_IGNORED,
) -> None:
    config_dir = state_dir / "sidecars"
    config_dir.mkdir(parents=True, exist_ok=True)
    if nats_urls:
        await apply_resources(plan, state_dir, nats_urls, creds_env("admin") if creds_env else None)
    children: dict[str, ChildProcess] = {}
    async with trio.open_nursery() as nursery:
        for inst in plan.instances:
            if inst.has_app:
                app = ChildProcess(
                    f"{inst.name}/app", inst.app_argv, env=inst.env, ready_port=inst.app_port
                )
                children[app.name] = await nursery.start(app.run)
        for inst in plan.instances:
            if inst.snapshot is not None:
                config = config_dir / f"{inst.name}.json"
                config.write_text(json.dumps(inst.snapshot, indent=2))
                sidecar = ChildProcess(
                    f"{inst.name}/sidecar",
                    sidecar_argv(inst, config, nats_urls or []),
                    env=creds_env(inst.name) if creds_env and nats_urls else None,
                )
                children[sidecar.name] = await nursery.start(sidecar.run)
        task_status.started(RunningTopology(plan, children))
