"""`mesh sidecar`: run one sidecar proxy next to one app instance."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser("sidecar", help="run a sidecar proxy (data plane)")
    p.set_defaults(func=lambda args: 2)
