"""`mesh nats`: run a local nats-server, or a local N-node cluster, for development."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import trio

from bus.server import NatsCluster, NatsServer, NodeSpec
from mesh.cli.common import print_ready, run_trio
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
    p.set_defaults(func=cmd_nats)


def cmd_nats(args: argparse.Namespace) -> int:
    async def main() -> int:
        async with trio.open_nursery() as nursery:
            await nursery.start(cancel_on_signals, nursery.cancel_scope)
            if args.cluster > 1:
                cluster: NatsCluster = await nursery.start(
                    NatsCluster(args.cluster, args.state_dir).run
                )
                urls = cluster.urls
                for node in cluster.nodes:
                    print(
                        f"{node.spec.name}: {node.url}  monitor http://{node.spec.host}:{node.spec.http_port}  log {node.log_path}"
                    )
            else:
                node = NatsServer(NodeSpec("mesh-dev", args.state_dir, port=args.port))
                await nursery.start(node.run)
                urls = [node.url]
                print(
                    f"{node.spec.name}: {node.url}  monitor http://{node.spec.host}:{node.spec.http_port}  log {node.log_path}"
                )
            print(f"connect with: --nats {','.join(urls)}   (Ctrl-C stops)", flush=True)
            if args.ready_line:
                print_ready(component="nats", urls=urls)
        return 0

    return run_trio(main)
