"""`mesh ca status|rotate`: ask the CA leader about its roots, or rotate the root."""

from __future__ import annotations

import argparse
import json
from typing import Any

from bus import subjects
from bus.client import connect
from bus.errors import BusTimeout, NoResponders
from mesh.cli.common import add_nats_flag, run_trio
from mesh.errors import MeshError
from mesh.messages import CaCommand, CaCommandReply


class CaCommandFailed(MeshError):
    pass


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser("ca", help="the certificate authority")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    s = actions.add_parser("status", help="leader, trust domain, roots")
    r = actions.add_parser(
        "rotate",
        help="introduce a new root (both trusted; leaves re-issued), or --retire the old one",
    )
    r.add_argument("--retire", action="store_true", help="second step: stop trusting the old root")
    r.add_argument(
        "--force", action="store_true", help="retire even if old leaves may still be valid"
    )
    for q in (s, r):
        add_nats_flag(q)
        q.add_argument("--json", action="store_true", help="print the reply as JSON")
        q.add_argument("--timeout", type=float, default=5.0)
        q.set_defaults(func=cmd_ca)


def cmd_ca(args: argparse.Namespace) -> int:
    action = "status" if args.action == "status" else "retire" if args.retire else "rotate"

    async def main() -> int:
        async with connect(args.nats, name="mesh-ca", connect_timeout=3.0) as bus:
            try:
                reply = await bus.request(
                    subjects.CA_COMMAND,
                    CaCommand(action=action, force=getattr(args, "force", False)),
                    CaCommandReply,
                    timeout=args.timeout,
                )
            except (NoResponders, BusTimeout) as exc:
                raise CaCommandFailed(
                    f"no CA leader answered ({exc}); is the control plane running?"
                ) from None
        if args.json:
            print(
                json.dumps(
                    {
                        "ok": reply.ok,
                        "message": reply.message,
                        "reason": reply.reason,
                        "leader": reply.leader,
                        "trust_domain": reply.trust_domain,
                        "roots": reply.roots,
                        "signing_root": reply.signing_root,
                    }
                )
            )
        else:
            print(f"CA leader {reply.leader}, trust domain {reply.trust_domain}")
            for fp in reply.roots:
                mark = "  (signing)" if fp == reply.signing_root else ""
                print(f"  root {fp}{mark}")
            if reply.ok:
                print(reply.message)
        if not reply.ok:
            raise CaCommandFailed(f"{action} refused: {reply.message}")
        return 0

    return run_trio(main)
