"""`mesh up`: start the mesh. No flags: an embedded NATS node and one control-plane replica."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import trio

from bus.client import BusOptions
from deploy.load import DEFAULT_BACKGROUND_DURATION, DEFAULT_BACKGROUND_RATE
from deploy.topology import demo_topology_path, load_topology
from deploy.up import (
    DASHBOARD,
    DEFAULT_NATS_PORT,
    METRICS,
    Running,
    StartupInterrupted,
    UpConfig,
    run_up,
)
from mesh.cli.common import print_ready, run_trio
from mesh.errors import ConfigError


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "up", help="start NATS (embedded unless --nats) and the control plane"
    )
    p.add_argument(
        "--nats",
        default="",
        help="join an existing NATS cluster (comma-separated URLs) instead of embedding one",
    )
    p.add_argument(
        "--creds",
        type=Path,
        metavar="FILE",
        help="with --nats: the NATS credentials of the control plane (default: "
        "$MESH_NATS_CREDS). The embedded NATS makes its own users in <state-dir>/nats-creds/",
    )
    p.add_argument(
        "--nats-port",
        type=int,
        default=DEFAULT_NATS_PORT,
        help="client port of the embedded NATS (0: any free port)",
    )
    p.add_argument("--replicas", type=int, default=1, help="control-plane replicas (default 1)")
    p.add_argument(
        "--state-dir",
        type=Path,
        default=Path(".mesh"),
        help="where the embedded NATS keeps data and logs",
    )
    p.add_argument(
        "--ready-line", action="store_true", help="print one JSON line on stdout when ready"
    )
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--topology", type=Path, help="also start the apps and sidecars of this topology file"
    )
    group.add_argument(
        "--demo", action="store_true", help="also start the built-in demo application"
    )
    p.add_argument(
        "--ingress-port", type=int, help="override the topology's ingress port (0: any free port)"
    )
    p.add_argument(
        "--no-load",
        action="store_true",
        help="no background load (the demo has a gentle one by default)",
    )
    p.add_argument(
        "--load-rate",
        type=float,
        help=f"background requests/s through the topology's ingress, for at most "
        f"{DEFAULT_BACKGROUND_DURATION / 60:g} min (default: {DEFAULT_BACKGROUND_RATE:g} with "
        "--demo, none with --topology)",
    )
    p.set_defaults(func=cmd_up)


def _mesh_command() -> str:
    """How the user ran us (`.venv/bin/mesh`, `mesh`), for the banner's next steps."""
    argv0 = sys.argv[0] if sys.argv else ""
    return argv0 if os.path.basename(argv0) == "mesh" else "mesh"


def cmd_up(args: argparse.Namespace) -> int:
    urls = list(BusOptions.parse_servers(args.nats)) if args.nats else []
    topology = None
    if args.demo or args.topology:
        topology = load_topology(demo_topology_path() if args.demo else args.topology)
    rate = args.load_rate
    if rate is None:
        # The background load is the demo's; a topology of your own gets one when asked.
        rate = DEFAULT_BACKGROUND_RATE if args.demo else 0.0
    elif not 0 < rate <= 1000:
        raise ConfigError("--load-rate must be above 0 and at most 1000 requests/s")
    config = UpConfig(
        state_dir=args.state_dir,
        nats_urls=urls,
        nats_port=args.nats_port,
        replicas=args.replicas,
        topology=topology,
        ingress_port=args.ingress_port,
        creds=args.creds,
        load_rate=0.0 if args.no_load else rate,
    )

    async def main() -> int:
        async with trio.open_nursery() as nursery:
            running: Running = await nursery.start(run_up, config, args.verbose)
            print(running.describe(_mesh_command()), flush=True)
            if args.ready_line:
                print_ready(
                    component="up",
                    nats=running.nats_urls,
                    replicas={r.name: r.pid for r in running.replicas},
                    topology=_topology_info(running),
                    creds=str(running.admin_creds.resolve()) if running.admin_creds else None,
                    # The ports bound, as the banner prints them (None: off).
                    dashboard=running.http_port(*DASHBOARD)[0],
                    metrics=running.http_port(*METRICS)[0],
                )
        return 0

    try:
        return run_trio(main)
    except StartupInterrupted as exc:  # stopped cleanly; the log said which signal
        return 128 + exc.signum


def _topology_info(running: Running) -> dict[str, Any] | None:
    if running.topology is None:
        return None
    plan = running.topology.plan
    return {
        "ingress": plan.ingress.outbound_port if plan.ingress else None,
        # What issuing the join tokens took (overlapped with applying the routes).
        "tokens_s": round(running.topology.identities.seconds, 3),
        "instances": {
            i.name: {
                "service": i.service,
                "version": i.version,
                "app": i.app_port,
                "inbound": i.inbound_port,
                "outbound": i.outbound_port,
                "admin": i.admin_port,
            }
            for i in plan.instances
        },
    }
