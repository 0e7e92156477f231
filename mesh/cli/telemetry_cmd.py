"""`mesh telemetry [SUBJECT]`: subscribe and print decoded mesh messages as JSON lines."""

from __future__ import annotations

import argparse
import base64
import dataclasses
import json
from typing import Any

from bus import subjects
from bus.client import connect
from mesh.cli.common import add_nats_flag, run_trio
from mesh.messages import MessageError, decode


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "telemetry", help="print telemetry batches (or any mesh subject) as JSON lines"
    )
    add_nats_flag(p)
    p.add_argument(
        "subject",
        nargs="?",
        default=subjects.TELEMETRY_ALL,
        help=f"NATS subject, wildcards allowed (default {subjects.TELEMETRY_ALL}; "
        f"also {subjects.GOLDEN_ALL}, {subjects.SPANS_ALL}, {subjects.ACCESSLOG_ALL})",
    )
    p.add_argument("-n", "--count", type=int, default=0, help="exit after N messages")
    p.set_defaults(func=cmd_telemetry)


def jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def to_line(subject: str, data: bytes) -> str:
    try:
        msg = decode(data)
    except MessageError as exc:
        return json.dumps({"subject": subject, "error": str(exc), "bytes": len(data)})
    body = {f.name: getattr(msg, f.name) for f in dataclasses.fields(msg)}
    return json.dumps({"subject": subject, "type": msg.TYPE, "body": jsonable(body)})


def cmd_telemetry(args: argparse.Namespace) -> int:
    async def main() -> int:
        async with (
            connect(args.nats, name="mesh-telemetry", connect_timeout=3.0) as bus,
            bus.subscribe_raw(args.subject, capacity=65536) as sub,
        ):
            seen = 0
            async for d in sub:
                print(to_line(d.subject, d.body), flush=True)
                seen += 1
                if args.count and seen >= args.count:
                    break
        return 0

    return run_trio(main)
