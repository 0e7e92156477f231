"""`mesh controlplane`: run one control-plane replica (what `mesh up` starts per replica)."""

from __future__ import annotations

import argparse
from typing import Any

import trio

from actors.controlplane import run_replica
from bus.client import BusOptions
from mesh.cli.common import add_nats_flag, print_ready, run_trio
from mesh.signals import cancel_on_signals


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "controlplane", help="run one control-plane replica"
    )
    add_nats_flag(p)
    p.add_argument(
        "--replica", default="cp-1", help="replica name, unique in the mesh (default cp-1)"
    )
    p.add_argument(
        "--ready-line", action="store_true", help="print one JSON line on stdout when ready"
    )
    p.set_defaults(func=cmd_controlplane)


def cmd_controlplane(args: argparse.Namespace) -> int:
    servers = BusOptions.parse_servers(args.nats)

    async def main() -> int:
        async with trio.open_nursery() as nursery:
            await nursery.start(cancel_on_signals, nursery.cancel_scope)
            ports = await nursery.start(run_replica, servers, args.replica)
            if args.ready_line:
                # The ports actually bound (a busy default moves to an ephemeral one), for
                # `mesh up`'s banner.
                print_ready(component="controlplane", replica=args.replica, **ports)
        return 0

    return run_trio(main)
