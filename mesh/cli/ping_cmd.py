"""`mesh ping`: ask the control plane over NATS whether it is alive."""

from __future__ import annotations

import argparse
import json
from typing import Any

import trio

from bus import subjects
from bus.client import connect
from mesh.cli.common import add_nats_flag, run_trio
from mesh.messages import Ping, Pong


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "ping", help="ask the control plane over NATS if it is alive"
    )
    add_nats_flag(p)
    p.add_argument("-c", "--count", type=int, default=1, help="number of pings (default 1)")
    p.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for each answer")
    p.add_argument("--json", action="store_true", help="one JSON object per answer")
    p.set_defaults(func=cmd_ping)


def cmd_ping(args: argparse.Namespace) -> int:
    async def main() -> int:
        async with connect(args.nats, name="mesh-ping", connect_timeout=3.0) as bus:
            for i in range(max(1, args.count)):
                start = trio.current_time()
                pong = await bus.request(
                    subjects.PING, Ping(sender="cli"), Pong, timeout=args.timeout
                )
                ms = (trio.current_time() - start) * 1000
                if args.json:
                    print(
                        json.dumps(
                            {
                                "replica": pong.replica,
                                "version": pong.version,
                                "uptime_s": pong.uptime_s,
                                "actors": pong.actors,
                                "rtt_ms": round(ms, 3),
                            }
                        )
                    )
                else:
                    print(
                        f"pong from {pong.replica} (mesh {pong.version}, up {pong.uptime_s:.1f} s, "
                        f"actors: {', '.join(pong.actors)}) via {bus.connected_url} in {ms:.2f} ms"
                    )
                if i + 1 < args.count:
                    await trio.sleep(0.2)
        return 0

    return run_trio(main)
