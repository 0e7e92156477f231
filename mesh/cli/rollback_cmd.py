"""`mesh rollback [--to REV]`: write an earlier revision again as the newest one."""

from __future__ import annotations

import argparse
from typing import Any

from bus.client import connect
from mesh.cli.apply_cmd import add_wait_flag, change_config
from mesh.cli.common import add_nats_flag, run_trio
from mesh.errors import ConfigError
from mesh.resources import ResourceSet
from mesh.resources_store import Revision, Store


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "rollback", help="restore an earlier configuration revision (default: the previous one)"
    )
    p.add_argument("--to", type=int, metavar="REV", help="the revision to restore")
    p.add_argument("--list", action="store_true", help="list the revisions kept")
    add_wait_flag(p)
    add_nats_flag(p)
    p.set_defaults(func=cmd_rollback)


def cmd_rollback(args: argparse.Namespace) -> int:
    async def main() -> int:
        async with connect(args.nats, name="mesh-cli", connect_timeout=3.0) as bus:
            history = await (await Store.open(bus)).history()
        if args.list:
            for h in history:
                print(f"{h.revision:>6}  {len(h.resources):>3} resource(s)  {h.note}")
            return 0
        if len(history) < 1:
            raise ConfigError("nothing stored yet: there is no revision to roll back to")
        by_rev = {h.revision: h for h in history}
        if args.to is not None:
            target = by_rev.get(args.to)
            if target is None or target.deleted:
                kept = ", ".join(str(h.revision) for h in history if not h.deleted)
                raise ConfigError(f"revision {args.to} is not kept (kept: {kept})")
        else:
            earlier = [h for h in history[:-1] if not h.deleted]
            if not earlier:
                raise ConfigError(f"revision {history[-1].revision} is the only one kept")
            target = earlier[-1]
        chosen = target

        def change(current: Revision) -> tuple[ResourceSet, str]:
            return dict(chosen.resources), f"rollback to {chosen.revision}"

        print(f"rolling back to revision {chosen.revision} ({chosen.note or 'no note'})")
        return await change_config(args, change)

    return run_trio(main)
