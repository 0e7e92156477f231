"""`mesh doctor`: check that this host is ready to run the mesh, and say what to fix."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from deploy.doctor import FAIL, run_checks
from mesh.cli.common import add_creds_flag, run_trio

DEFAULT_PORTS = ((4222, "embedded NATS"), (8080, "demo ingress"), (15000, "sidecar admin"),
                 (15001, "sidecar outbound"), (15006, "sidecar inbound"))  # fmt: skip


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "doctor", help="check this host is ready to run the mesh"
    )
    p.add_argument(
        "--nats", help="also check this NATS cluster and its control plane (comma-separated URLs)"
    )
    add_creds_flag(p)
    p.add_argument("--state-dir", type=Path, default=Path(".mesh"))
    p.add_argument(
        "--port", type=int, action="append", help="ports that must be free (default: the mesh's)"
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_doctor)


def cmd_doctor(args: argparse.Namespace) -> int:
    ports = tuple((p, "requested") for p in args.port) if args.port else DEFAULT_PORTS

    async def main() -> int:
        checks = await run_checks(args.nats, args.state_dir, ports)
        if args.json:
            print(json.dumps([asdict(c) for c in checks]))
        else:
            for c in checks:
                print(f"[{c.status:>4}] {c.name:<14} {c.detail}")
                if c.fix:
                    print(f"{'':7} {'':<14} fix: {c.fix}")
        return 1 if any(c.status == FAIL for c in checks) else 0

    return run_trio(main)
