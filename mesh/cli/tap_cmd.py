"""`mesh tap SERVICE`: live request lines from a service's sidecars.

Reads the access-log entries the sidecars publish on ``mesh.accesslog.<service>``
(sidecars started with access-log publishing on; docs/telemetry.md).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from bus import subjects
from bus.client import connect
from mesh.cli.common import add_nats_flag, run_trio
from mesh.messages import AccessLogEntry


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "tap", help="live request lines from a service's sidecars (needs access-log publishing)"
    )
    add_nats_flag(p)
    p.add_argument("service", help="service name, or '*' for every service")
    p.add_argument("-n", "--count", type=int, default=0, help="exit after N requests")
    p.add_argument("--json", action="store_true", help="print the entries as JSON lines")
    p.set_defaults(func=cmd_tap)


def line(e: dict[str, Any]) -> str:
    flags = f" flags={e['response_flags']}" if e.get("response_flags") else ""
    return (
        f"{e.get('start_time', '')} {e.get('source') or '-'} -> {e.get('authority') or '-'} "
        f"{e.get('method', '')} {e.get('path', '')} {e.get('status', '')} "
        f"{e.get('duration_ms', 0)}ms{flags} upstream={e.get('upstream') or '-'} "
        f"id={e.get('request_id') or '-'} trace={e.get('trace_id') or '-'}"
    )


def cmd_tap(args: argparse.Namespace) -> int:
    subject = subjects.ACCESSLOG_ALL if args.service == "*" else subjects.accesslog(args.service)

    async def main() -> int:
        async with (
            connect(args.nats, name="mesh-tap", connect_timeout=3.0) as bus,
            bus.subscribe(subject, capacity=65536) as sub,
        ):
            seen = 0
            async for d in sub:
                if not isinstance(d.body, AccessLogEntry):
                    continue
                print(json.dumps(d.body.entry) if args.json else line(d.body.entry), flush=True)
                seen += 1
                if args.count and seen >= args.count:
                    break
        return 0

    return run_trio(main)
