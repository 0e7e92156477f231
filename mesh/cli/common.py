"""Helpers shared by CLI subcommands: NATS URL flags, the ready line, running trio."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from mesh.concurrency import unwrap_single

DEFAULT_NATS = "nats://127.0.0.1:4222"


def add_nats_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--nats",
        default=os.environ.get("MESH_NATS", DEFAULT_NATS),
        help="NATS URL(s), comma-separated for a cluster (default: $MESH_NATS or %(default)s)",
    )


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
