"""Helpers shared by CLI subcommands: NATS URL flags, the ready line, running trio."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import trio

from mesh.concurrency import unwrap_single

DEFAULT_NATS = "nats://127.0.0.1:4222"


DEFAULT_STATE_DIR = ".mesh"
_LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def add_nats_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--nats",
        default=os.environ.get("MESH_NATS", DEFAULT_NATS),
        help="NATS URL(s), comma-separated for a cluster (default: $MESH_NATS or %(default)s)",
    )
    add_creds_flag(p)


def add_creds_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--creds",
        metavar="FILE",
        help="NATS credentials file (default: $MESH_NATS_CREDS; for a local `mesh up`, its "
        "admin credentials in $MESH_STATE_DIR or .mesh/nats-creds/admin.json)",
    )


def default_admin_creds(nats: str) -> Path | None:
    """The admin credentials a local `mesh up` wrote, if the URLs are all loopback: a
    password of this machine's mesh is never offered to a server elsewhere."""
    hosts = {urlsplit(u.strip()).hostname for u in nats.split(",") if u.strip()}
    if not hosts or not hosts <= _LOOPBACK:
        return None
    state = Path(os.environ.get("MESH_STATE_DIR") or DEFAULT_STATE_DIR)
    path = state / "nats-creds" / "admin.json"
    return path if path.is_file() else None


def use_creds(args: argparse.Namespace) -> None:
    """Make the credentials of this command the bus default for this process (and children
    it starts): --creds wins, then $MESH_NATS_CREDS, then (not for control-plane replicas,
    which `mesh up` hands their own) a local `mesh up`'s admin file. Only a path is set."""
    from bus.auth import CREDS_ENV

    creds = getattr(args, "creds", None)
    if creds:
        os.environ[CREDS_ENV] = str(Path(creds).resolve())
        return
    if os.environ.get(CREDS_ENV) or args.command in ("controlplane", "sidecar", "up", "nats"):
        return
    nats = getattr(args, "nats", None)
    if isinstance(nats, str) and nats:
        found = default_admin_creds(nats)
        if found is not None:
            os.environ[CREDS_ENV] = str(found.resolve())


def print_ready(**info: Any) -> None:
    """The one JSON line a supervisor waits for on stdout."""
    print(json.dumps({"event": "ready", **info}), flush=True)


def run_trio(fn: Callable[[], Awaitable[int | None]]) -> int:
    """Run a trio main; Ctrl-C exits quietly; one user error comes out unwrapped."""
    try:
        with unwrap_single():
            code = trio.run(fn)
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
    return int(code or 0)
