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


def _shown(value: Any) -> str:
    """A field as one safe line: request data (paths, hosts, ids) comes from whoever sent the
    request, so control characters (terminal escapes, newlines) are shown escaped."""
    text = str(value)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def line(e: dict[str, Any], service: str = "") -> str:
    """One request line; `service`: the sidecar that logged it, from the subject (NATS only
    lets that service's sidecars publish there), not from the entry's own fields."""
    s = {k: _shown(v) for k, v in e.items()}
    flags = f" flags={s['response_flags']}" if e.get("response_flags") else ""
    at = f"[{_shown(service)}] " if service else ""
    return (
        f"{at}{s.get('start_time', '')} {s.get('source') or '-'} -> {s.get('authority') or '-'} "
        f"{s.get('method', '')} {s.get('path', '')} {s.get('status', '')} "
        f"{s.get('duration_ms', 0)}ms{flags} upstream={s.get('upstream') or '-'} "
        f"id={s.get('request_id') or '-'} trace={s.get('trace_id') or '-'}"
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
                service = d.subject.rsplit(".", 1)[-1] if args.service == "*" else ""
                print(json.dumps(d.body.entry) if args.json else line(d.body.entry, service),
                      flush=True)
                seen += 1
                if args.count and seen >= args.count:
                    break
        return 0

    return run_trio(main)
