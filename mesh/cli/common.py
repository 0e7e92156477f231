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
        help="NATS credentials file (default: $MESH_NATS_CREDS; with loopback URLs, the "
        "file a local `mesh up` wrote for this command's role in $MESH_STATE_DIR or "
        ".mesh/nats-creds/: admin.json for CLI commands)",
    )


def default_creds(nats: str, role: str = "admin") -> Path | None:
    """The ``role`` credentials a local `mesh up` / `mesh nats` wrote, if every URL is
    loopback: a password of this machine's mesh is never offered to a server elsewhere."""
    hosts = {urlsplit(u.strip()).hostname for u in nats.split(",") if u.strip()}
    if not hosts or not hosts <= _LOOPBACK:
        return None
    state = Path(os.environ.get("MESH_STATE_DIR") or DEFAULT_STATE_DIR)
    path = state / "nats-creds" / f"{role}.json"
    return path if path.is_file() else None


def default_admin_creds(nats: str) -> Path | None:
    return default_creds(nats, "admin")


# Which local credentials a command uses by default: replicas and sidecars their own role
# (so `mesh nats` + `mesh controlplane` + `mesh sidecar` work on one machine), every other
# command admin. `mesh up` hands its children their files itself.
_DEFAULT_ROLE = {"controlplane": "controlplane", "sidecar": "sidecar"}


def use_creds(args: argparse.Namespace) -> None:
    """Make the credentials of this command the bus default for this process (and children
    it starts): --creds wins, then $MESH_NATS_CREDS, then the local mesh's file of the
    command's role (loopback URLs only). Only a path is set, never the secret."""
    from bus.auth import CREDS_ENV

    creds = getattr(args, "creds", None)
    if creds:
        os.environ[CREDS_ENV] = str(Path(creds).resolve())
        return
    if os.environ.get(CREDS_ENV) or args.command in ("up", "nats"):
        return
    urls = [
        u
        for u in (getattr(args, k, None) for k in ("nats", "ca_nats", "telemetry_nats"))
        if isinstance(u, str) and u
    ]
    if urls:
        found = default_creds(",".join(urls), _DEFAULT_ROLE.get(args.command, "admin"))
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
