"""`mesh route weights SERVICE v1=95 v2=5`: a quick canary shift of the default rule."""

from __future__ import annotations

import argparse
import copy
from typing import Any

from mesh.cli.apply_cmd import add_wait_flag, change_config
from mesh.cli.common import add_nats_flag, run_trio
from mesh.errors import ConfigError
from mesh.resources import Resource, ResourceSet, parse_resource, route_for
from mesh.resources_store import Revision


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser("route", help="quick route changes")
    rsub = p.add_subparsers(dest="route_command", metavar="ACTION", required=True)
    w: argparse.ArgumentParser = rsub.add_parser(
        "weights", help="set the split of SERVICE's catch-all rule, e.g. v1=95 v2=5"
    )
    w.add_argument("service")
    w.add_argument("weights", nargs="+", metavar="SUBSET=WEIGHT")
    add_wait_flag(w)
    add_nats_flag(w)
    w.set_defaults(func=cmd_weights)


def parse_weights(items: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        name, sep, weight = item.partition("=")
        if not sep or not name or not weight.isdigit():
            raise ConfigError(f"{item!r}: expected SUBSET=WEIGHT, e.g. v1=95")
        out[name] = int(weight)
    return out


def with_weights(resources: ResourceSet, service: str, split: dict[str, int]) -> Resource:
    """The service's Route with its catch-all rule (the last rule without a match) set to
    `split`; a catch-all rule is appended if there is none, a Route created if needed."""
    route = route_for(resources, service)
    if route is None:
        doc: dict[str, Any] = {
            "kind": "Route",
            "name": service,
            "spec": {"service": service, "rules": [{"split": split}]},
        }
    else:
        doc = copy.deepcopy(route.to_dict())
        rules = doc["spec"]["rules"]
        catch_all = [r for r in rules if not r.get("match")]
        if catch_all:
            catch_all[-1]["split"] = split
        else:
            rules.append({"split": split})
    return parse_resource(doc, "mesh route weights")


def cmd_weights(args: argparse.Namespace) -> int:
    split = parse_weights(args.weights)

    def change(current: Revision) -> tuple[ResourceSet, str]:
        route = with_weights(current.resources, args.service, split)
        new = dict(current.resources)
        new[route.key] = route
        pairs = " ".join(f"{k}={v}" for k, v in split.items())
        return new, f"route weights {args.service} {pairs}"

    async def main() -> int:
        return await change_config(args, change)

    return run_trio(main)
