"""`mesh certs`: every identity agent's SPIFFE ID, serial and expiry (scatter-gather)."""

from __future__ import annotations

import argparse
import json
import secrets
from datetime import UTC, datetime
from typing import Any

import trio

from bus import subjects
from bus.client import connect
from mesh.cli.common import add_nats_flag, run_trio
from mesh.messages import CertsQuery, IdentityStatus


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "certs", help="each sidecar's identity, certificate serial and expiry"
    )
    add_nats_flag(p)
    p.add_argument("--wait", type=float, default=1.0, help="seconds to collect answers (default 1)")
    p.add_argument("--json", action="store_true", help="one JSON object per agent")
    p.set_defaults(func=cmd_certs)


def cmd_certs(args: argparse.Namespace) -> int:
    async def main() -> int:
        found: dict[str, IdentityStatus] = {}
        async with connect(args.nats, name="mesh-certs", connect_timeout=3.0) as bus:
            inbox = subjects.certs_inbox(secrets.token_hex(8))
            async with bus.subscribe(inbox, capacity=65536) as sub:
                await bus.publish(subjects.CERTS_QUERY, CertsQuery(reply_to=inbox))
                with trio.move_on_after(args.wait):
                    async for delivery in sub:
                        if isinstance(delivery.body, IdentityStatus):
                            found[delivery.body.agent] = delivery.body
        rows = sorted(found.values(), key=lambda s: (s.identity, s.agent))
        if args.json:
            for s in rows:
                print(
                    json.dumps(
                        {
                            "agent": s.agent,
                            "identity": s.identity,
                            "serial": s.serial,
                            "not_after": s.not_after,
                            "seconds_left": s.seconds_left,
                            "renewals": s.renewals,
                            "roots": s.roots,
                            "last_error": s.last_error,
                        }
                    )
                )
            return 0
        if not rows:
            print(f"no identity agent answered within {args.wait:g} s")
            return 0
        print(f"{'AGENT':<20} {'IDENTITY':<50} {'SERIAL':<18} {'EXPIRES (UTC)':<20} LEFT")
        for s in rows:
            expires = (
                datetime.fromtimestamp(s.not_after, UTC).strftime("%Y-%m-%d %H:%M:%S")
                if s.not_after
                else "-"
            )
            left = f"{s.seconds_left:.0f}s" if s.serial else s.last_error or "no certificate"
            print(f"{s.agent:<20} {s.identity:<50} {s.serial[:16]:<18} {expires:<20} {left}")
        return 0

    return run_trio(main)
