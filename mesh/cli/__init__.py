"""The `mesh` command: one module per subcommand, registered here."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from mesh import __version__
from mesh.errors import MeshError

# Each module defines `register(subparsers)`, which adds its parser and sets
# `func(args) -> int`. Listed by name so a broken optional module names itself.
COMMAND_MODULES = (
    "mesh.cli.up_cmd",
    "mesh.cli.nats_cmd",
    "mesh.cli.ping_cmd",
    "mesh.cli.controlplane_cmd",
    "mesh.cli.sidecar_cmd",
    "mesh.cli.load_cmd",
    "mesh.cli.doctor_cmd",
    "mesh.cli.top_cmd",
    "mesh.cli.telemetry_cmd",
    "mesh.cli.trace_cmd",
    "mesh.cli.tap_cmd",
    "mesh.cli.token_cmd",
    "mesh.cli.ca_cmd",
    "mesh.cli.certs_cmd",
    "mesh.cli.apply_cmd",
    "mesh.cli.get_cmd",
    "mesh.cli.rollback_cmd",
    "mesh.cli.status_cmd",
    "mesh.cli.route_cmd",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mesh", description="trio-mesh: a service mesh on trio and NATS"
    )
    parser.add_argument("--version", action="version", version=f"mesh {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def setup_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity == 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    setup_logging(args.verbose)
    try:
        from mesh.cli.common import use_creds

        use_creds(args)
        code: int = args.func(args)
    except MeshError as exc:
        print(f"mesh {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
