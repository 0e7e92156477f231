"""`mesh nats`: run a local nats-server, or a local N-node cluster, for development."""

from __future__ import annotations

import argparse
import os
import secrets
from pathlib import Path
from typing import Any

import trio

from bus import subjects
from bus.auth import (
    Credentials,
    SidecarScope,
    authorization_config,
    ensure_credentials,
    mesh_users,
)
from bus.server import NatsCluster, NatsServer, NodeSpec
from mesh.cli.common import print_ready, run_trio
from mesh.errors import ConfigError
from mesh.signals import cancel_on_signals


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "nats", help="run a local NATS node or cluster (JetStream on)"
    )
    p.add_argument(
        "--cluster", type=int, default=1, metavar="N", help="number of nodes (default 1)"
    )
    p.add_argument(
        "--port", type=int, default=4222, help="client port of a single node (0: any free port)"
    )
    p.add_argument(
        "--state-dir",
        type=Path,
        default=Path(".mesh/nats"),
        help="data and logs (default .mesh/nats)",
    )
    p.add_argument(
        "--ready-line", action="store_true", help="print one JSON line on stdout when ready"
    )
    p.add_argument(
        "--write-auth",
        type=Path,
        metavar="DIR",
        help="do not run NATS: write the mesh's NATS users for real hosts into DIR "
        "(nats-creds/<user>.json and nats-auth.conf, mode 0600; `include` the latter in "
        "nats.conf) and exit; existing files are kept",
    )
    p.add_argument(
        "--sidecar",
        action="append",
        default=[],
        metavar="SERVICE[/INSTANCE]",
        help="with --write-auth: also a user for the sidecar(s) of SERVICE, allowed to speak "
        "for that service only: sidecar-INSTANCE, bound to that instance name too (give the "
        "sidecar --instance INSTANCE), or without /INSTANCE sidecar-SERVICE, any instance "
        "of SERVICE (repeatable)",
    )
    p.set_defaults(func=cmd_nats)


def parse_sidecar(item: str) -> SidecarScope:
    """`--sidecar SERVICE[/INSTANCE]` as a scope; a ConfigError names the flag."""
    service, _, instance = item.partition("/")
    try:
        return SidecarScope(service, instance or subjects.ANY)
    except ConfigError as exc:
        raise ConfigError(
            f"--sidecar {item!r}: expected SERVICE or SERVICE/INSTANCE: {exc}"
        ) from None


def write_auth(folder: Path, sidecars: list[SidecarScope]) -> tuple[Path, list[Credentials]]:
    """Credentials + the `authorization` block for an operator's own nats.conf; returns the
    config file and the scoped sidecar users."""
    creds = ensure_credentials(folder, mesh_users(sidecars))
    conf = folder / "nats-auth.conf"
    fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("# trio-mesh NATS users (bus/auth.py); secret: keep mode 0600\n")
        f.write(authorization_config(creds.values()))
    return conf, [c for c in creds.values() if c.scope is not None]


def cmd_nats(args: argparse.Namespace) -> int:
    if args.write_auth:
        conf, scoped = write_auth(args.write_auth, [parse_sidecar(s) for s in args.sidecar])
        folder = conf.parent / "nats-creds"
        print(
            f"wrote {conf} (include it in nats.conf) and {folder}/ (give each host only its "
            "role's file: controlplane.json to replicas, admin.json to operators)"
        )
        for c in scoped:
            assert c.scope is not None
            inst = "" if c.scope.instance == subjects.ANY else f" --instance {c.scope.instance}"
            print(
                f"  {c.user}.json: may speak for {c.scope.describe()} only "
                f"(mesh sidecar --service {c.scope.service}{inst} --creds .../{c.user}.json)"
            )
        print(
            "  sidecar.json: any service (sidecars without a user of their own; "
            "prefer --sidecar SERVICE/INSTANCE)"
        )
        return 0
    # Security by default, as `mesh up`: users per role, their files next to the data
    # (<state-dir>/../nats-creds, so `.mesh/nats-creds/admin.json` for the CLI by default).
    creds_dir = args.state_dir.parent
    creds = ensure_credentials(creds_dir, mesh_users())
    auth = authorization_config(creds.values())
    route_auth = ("route", secrets.token_urlsafe(24))  # new each run: only these nodes

    async def main() -> int:
        async with trio.open_nursery() as nursery:
            await nursery.start(cancel_on_signals, nursery.cancel_scope)
            if args.cluster > 1:
                cluster: NatsCluster = await nursery.start(
                    NatsCluster(
                        args.cluster, args.state_dir, authorization=auth, route_auth=route_auth
                    ).run
                )
                urls = cluster.urls
                for node in cluster.nodes:
                    print(
                        f"{node.spec.name}: {node.url}  monitor http://{node.spec.host}:{node.spec.http_port}  log {node.log_path}"
                    )
            else:
                node = NatsServer(
                    NodeSpec("mesh-dev", args.state_dir, port=args.port, authorization=auth)
                )
                await nursery.start(node.run)
                urls = [node.url]
                print(
                    f"{node.spec.name}: {node.url}  monitor http://{node.spec.host}:{node.spec.http_port}  log {node.log_path}"
                )
            folder = creds_dir / "nats-creds"
            print(
                f"connect with: --nats {','.join(urls)} --creds {folder}/<role>.json  "
                "(roles: admin for the CLI, controlplane, sidecar; Ctrl-C stops)",
                flush=True,
            )
            if args.ready_line:
                print_ready(component="nats", urls=urls, creds=str(folder.resolve()))
        return 0

    return run_trio(main)
