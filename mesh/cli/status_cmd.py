"""`mesh status`: every sidecar's config state, like `istioctl proxy-status`."""

from __future__ import annotations

import argparse
import json
from typing import Any

from bus.client import connect
from mesh.cli.apply_cmd import fetch_status
from mesh.cli.common import add_nats_flag, run_trio


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "status", help="config sync state of every sidecar (SYNCED / STALE / NACKED)"
    )
    p.add_argument("--json", action="store_true", help="one JSON document for scripts")
    p.add_argument("--timeout", type=float, default=3.0)
    add_nats_flag(p)
    p.set_defaults(func=cmd_status)


def cmd_status(args: argparse.Namespace) -> int:
    async def main() -> int:
        async with connect(args.nats, name="mesh-cli", connect_timeout=3.0) as bus:
            st = await fetch_status(bus, timeout=args.timeout)
        if args.json:
            print(
                json.dumps(
                    {
                        "replica": st.replica,
                        "revision": st.revision,
                        "sidecars": st.sidecars,
                        "stats": st.stats,
                    },
                    indent=1,
                )
            )
            return 0
        print(f"control plane {st.replica}, configuration revision {st.revision}")
        cols = ("SERVICE", "INSTANCE", "VERSION", "ACKED", "STATUS", "LAST SEEN", "ADMIN", "REASON")
        rows = [
            (
                s["service"],
                s["instance"],
                s["version"],
                s["acked"] or "-",
                s["status"],
                f"{s['last_seen_s']:.1f}s ago",
                s["admin"] or "-",
                s["reason"],
            )
            for s in st.sidecars
        ]
        widths = [max([len(c)] + [len(str(r[i])) for r in rows]) for i, c in enumerate(cols)]
        for row in (cols, *rows):
            print("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
        if not rows:
            print("(no sidecars registered)")
        return 0

    return run_trio(main)
