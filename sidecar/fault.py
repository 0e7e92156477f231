"""Fault decisions: whether this request is delayed and/or aborted. Pure."""

from __future__ import annotations

import random

from mesh.snapshot import Fault


def decide(fault: Fault, rng: random.Random) -> tuple[float, int | None]:
    """Return (delay seconds, abort status or None)."""
    delay = 0.0
    if fault.delay is not None and rng.random() * 100 < fault.delay.percent:
        delay = fault.delay.seconds
    abort = None
    if fault.abort is not None and rng.random() * 100 < fault.abort.percent:
        abort = fault.abort.status
    return delay, abort
