"""Start a planned topology: every app instance, then its sidecar, supervised together.

Apps start first (a sidecar whose app is not listening yet would answer 503 to
the first requests); each child is restarted if it dies. Stopping cancels the
nursery: sidecars and apps get SIGTERM, then SIGKILL after a grace period.

With NATS and unless the topology says `mtls: off`, every sidecar gets an
identity: one join token per service account (the service's name, which is what
callers expect a server to present and what authorization matches), issued with
the code behind `mesh token create` and handed over in a 0600 file, never on a
command line; each sidecar redeems it with the CA before it reports ready.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import trio
import yaml

from bus.auth import CREDS_ENV
from bus.client import connect
from deploy.supervisor import ChildProcess
from deploy.topology_plan import HOST, Instance, Plan, topology_resources
from mesh.cli.token_cmd import create_token, trust_domain_of_running_ca
from mesh.errors import ConfigError
from mesh.spiffe import SpiffeId

# The mesh's secrets (the CA sealing secret, NATS credentials) are for the mesh's own
# processes; an app written without mesh code needs none of them.
APP_WITHHELD_ENV = ("MESH_CA_SECRET", "MESH_CA_SECRET_FILE", CREDS_ENV)
# A sidecar gets its own NATS credentials (env) but never the CA sealing secret.
SIDECAR_WITHHELD_ENV = ("MESH_CA_SECRET", "MESH_CA_SECRET_FILE")

# Redemptions per sidecar in a service account's token: its first start plus restarts by
# the supervisor (each restart is a new process with a new key, so a new first certificate).
TOKEN_USES_PER_SIDECAR = 4
CA_WAIT_S = 30.0  # a fresh control plane stores its trust bundle within a second or two


@dataclass(frozen=True)
class SidecarIdentity:
    spiffe_id: SpiffeId
    token_file: Path
    mode: str  # STRICT | PERMISSIVE


@dataclass
class Identities:
    trust_domain: str = ""
    by_account: dict[str, SidecarIdentity] = field(default_factory=dict)
    seconds: float = 0.0  # what issuing the tokens cost at start-up


@dataclass
class RunningTopology:
    plan: Plan
    children: dict[str, ChildProcess]
    identities: Identities = field(default_factory=Identities)

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
        ids = self.identities
        if ids.by_account:
            mode = next(iter(ids.by_account.values())).mode
            lines.append(
                f"  identities    spiffe://{ids.trust_domain}/ns/{self.plan.topology.name}/sa/<service>,"
                f" mTLS {mode} between sidecars (`mesh certs`)"
            )
        elif self.plan.topology.mtls == "DISABLE":
            lines.append(
                "  identities    none: plaintext between sidecars (the topology says mtls: off)"
            )
        return "\n".join(lines)


def sidecar_argv(
    inst: Instance, config: Path, nats_urls: list[str], identity: SidecarIdentity | None = None
) -> list[str]:
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
    if identity is not None:  # the token itself stays in the file (ps shows command lines)
        argv += ["--identity", identity.spiffe_id.uri, "--token-file", str(identity.token_file),
                 "--mtls", identity.mode]  # fmt: skip
    return argv


def _write_secret(path: Path, text: str) -> None:
    """Create (or replace) a file only this user can read, without a moment of wider mode."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")


async def issue_identities(
    plan: Plan, state_dir: Path, nats_urls: list[str], env: dict[str, str] | None = None
) -> Identities:
    """One join token per service account of the topology's sidecars, in
    `<state_dir>/tokens/<account>.token`; an empty result when the topology is `mtls: off`."""
    ids = Identities()
    if plan.topology.mtls == "DISABLE":
        return ids
    started = trio.current_time()
    accounts = Counter(i.service for i in plan.instances if i.snapshot is not None)
    token_dir = state_dir / "tokens"
    token_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    token_dir.chmod(0o700)
    creds = (env or {}).get(CREDS_ENV)
    async with connect(nats_urls, name="mesh-up-tokens", connect_timeout=3.0,
                       creds_file=creds or None) as bus:
        # The CA leader stores its bundle (with the trust domain) once it has a root; on a
        # fresh mesh that can be a moment after the replica reported ready.
        with trio.move_on_after(CA_WAIT_S):
            while True:
                try:
                    ids.trust_domain = await trust_domain_of_running_ca(bus)
                    break
                except ConfigError:
                    await trio.sleep(0.05)
        if not ids.trust_domain:
            raise ConfigError(
                f"no CA published a trust bundle within {CA_WAIT_S:g} s, so the topology's "
                "sidecars cannot get certificates; is the control plane healthy? "
                "(`mtls: off` in the topology runs them without identities)"
            )
        for account, count in sorted(accounts.items()):
            spiffe_id = SpiffeId(ids.trust_domain, plan.topology.name, account)
            text, _ = await create_token(bus, spiffe_id, uses=count * TOKEN_USES_PER_SIDECAR)
            path = token_dir / f"{account}.token"
            _write_secret(path, text)
            ids.by_account[account] = SidecarIdentity(spiffe_id, path, plan.topology.mtls)
    ids.seconds = trio.current_time() - started
    return ids


async def _start_all(
    nursery: trio.Nursery, children: Iterable[ChildProcess], started: dict[str, ChildProcess]
) -> None:
    """Start children side by side (each start waits for the child's ready signal: its port,
    or its ready line after its first certificate), and return once all are ready."""

    async def one(child: ChildProcess) -> None:
        started[child.name] = await nursery.start(child.run)

    async with trio.open_nursery() as starting:
        for child in children:
            starting.start_soon(one, child)


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
    identities = Identities()
    if nats_urls:
        admin_env = creds_env("admin") if creds_env else None
        # Both talk to NATS only; side by side they cost the longer of the two.
        async with trio.open_nursery() as prep:
            prep.start_soon(apply_resources, plan, state_dir, nats_urls, admin_env)

            async def issue() -> None:
                nonlocal identities
                identities = await issue_identities(plan, state_dir, nats_urls, admin_env)

            prep.start_soon(issue)
    children: dict[str, ChildProcess] = {}
    async with trio.open_nursery() as nursery:
        apps = [
            ChildProcess(f"{inst.name}/app", inst.app_argv, env=inst.env, ready_port=inst.app_port,
                         withhold_env=APP_WITHHELD_ENV)
            for inst in plan.instances
            if inst.has_app
        ]
        await _start_all(nursery, apps, children)
        sidecars = []
        for inst in plan.instances:
            if inst.snapshot is not None:
                config = config_dir / f"{inst.name}.json"
                config.write_text(json.dumps(inst.snapshot, indent=2))
                identity = identities.by_account.get(inst.service)
                argv = sidecar_argv(inst, config, nats_urls or [], identity)
                env = creds_env(inst.name) if creds_env and nats_urls else None
                sidecars.append(ChildProcess(f"{inst.name}/sidecar", argv, env=env,
                                             withhold_env=SIDECAR_WITHHELD_ENV))
        await _start_all(nursery, sidecars, children)
        # Report them in plan order whatever order they became ready in.
        ordered = {name: children[name] for name in sorted(children, key=_plan_order(plan))}
        task_status.started(RunningTopology(plan, ordered, identities))


def _plan_order(plan: Plan) -> Callable[[str], tuple[int, str]]:
    rank = {inst.name: i for i, inst in enumerate(plan.instances)}
    return lambda name: (rank.get(name.split("/")[0], len(rank)), name)
