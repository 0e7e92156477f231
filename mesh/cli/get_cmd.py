"""`mesh get KIND [NAME]` and `mesh delete KIND NAME`."""

from __future__ import annotations

import argparse
import json
from typing import Any

from bus.client import connect
from mesh.cli.apply_cmd import add_wait_flag, change_config
from mesh.cli.common import add_nats_flag, run_trio
from mesh.errors import ConfigError
from mesh.resources import KINDS, Resource, ResourceSet, kind_of, to_yaml
from mesh.resources_store import Revision, Store


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "get", help="show stored resources", description=f"KIND: {', '.join(KINDS)} or all"
    )
    p.add_argument("kind", help="resource kind (route, service, dp, authz, meshconfig, all)")
    p.add_argument("name", nargs="?", help="one resource")
    p.add_argument(
        "-o",
        "--output",
        choices=("table", "yaml", "json"),
        default=None,
        help="default: a table for a list, YAML for one resource",
    )
    add_nats_flag(p)
    p.set_defaults(func=cmd_get)

    d: argparse.ArgumentParser = sub.add_parser("delete", help="delete a stored resource")
    d.add_argument("kind")
    d.add_argument("name")
    add_wait_flag(d)
    add_nats_flag(d)
    d.set_defaults(func=cmd_delete)


def _summary(r: Resource) -> str:
    s = r.spec
    if r.kind == "Route":
        return f"service={s['service']} rules={len(s['rules'])}"
    if r.kind == "DestinationPolicy":
        return f"service={s['service']} subsets={','.join(s.get('subsets', {})) or '-'}"
    if r.kind == "AuthorizationPolicy":
        return f"service={s['service']} action={s['action']} rules={len(s['rules'])}"
    if r.kind == "Service":
        return f"hosts={','.join([r.name, *s.get('hosts', [])])}"
    return ", ".join(f"{k}={v}" for k, v in s.items() if not isinstance(v, dict))


def cmd_get(args: argparse.Namespace) -> int:
    kind = None if args.kind.lower() == "all" else kind_of(args.kind)

    async def main() -> int:
        async with connect(args.nats, name="mesh-cli", connect_timeout=3.0) as bus:
            current = await (await Store.open(bus)).current()
        chosen = [
            r
            for r in sorted(current.resources.values(), key=lambda r: r.key)
            if (kind is None or r.kind == kind) and (args.name is None or r.name == args.name)
        ]
        if args.name is not None and not chosen:
            raise ConfigError(f"{kind}/{args.name} does not exist (revision {current.revision})")
        output = args.output or ("yaml" if args.name else "table")
        if output == "yaml":
            print(to_yaml(chosen), end="")
        elif output == "json":
            print(json.dumps([r.to_dict() for r in chosen], indent=1))
        else:
            print(f"{'KIND':<20} {'NAME':<24} DETAILS   (revision {current.revision})")
            for r in chosen:
                print(f"{r.kind:<20} {r.name:<24} {_summary(r)}")
        return 0

    return run_trio(main)


def cmd_delete(args: argparse.Namespace) -> int:
    kind = kind_of(args.kind)

    def change(current: Revision) -> tuple[ResourceSet, str]:
        if (kind, args.name) not in current.resources:
            raise ConfigError(f"{kind}/{args.name} does not exist (revision {current.revision})")
        new = {k: v for k, v in current.resources.items() if k != (kind, args.name)}
        return new, f"delete {kind}/{args.name}"

    async def main() -> int:
        return await change_config(args, change)

    return run_trio(main)
