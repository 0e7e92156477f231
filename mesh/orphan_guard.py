"""The orphan guard: a tiny process that stops a supervisor's children when it dies.

Run by path (`python -I orphan_guard.py`), stdlib only, so it starts in milliseconds and
imports nothing of the mesh. Its parent writes `+PID` when it starts a child (a session
leader, so PID is also its process group) and `-PID` when that child is gone. When the
parent dies in any way, SIGKILL included, the kernel closes the pipe and the guard reads
EOF: it sends SIGTERM to every group still registered, then SIGKILL to those still there
after a grace period. Children that watch MESH_PARENT_PID would exit anyway; nats-server and
a topology's apps do not, and this is what stops them.
"""

from __future__ import annotations

import os
import signal
import sys
import time

GRACE_SECONDS = 3.0


def _alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _signal_all(groups: set[int], sig: int) -> None:
    for pgid in groups:
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def main() -> None:
    # Ctrl-C at the terminal is for the supervisor, which stops its children in order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    groups: set[int] = set()
    for line in sys.stdin:
        line = line.strip()
        if len(line) < 2 or not line[1:].isdigit():
            continue
        pid = int(line[1:])
        if line[0] == "+":
            groups.add(pid)
        elif line[0] == "-":
            groups.discard(pid)
    live = {g for g in groups if _alive(g)}
    if not live:
        return
    _signal_all(live, signal.SIGTERM)
    deadline = time.monotonic() + GRACE_SECONDS
    while live and time.monotonic() < deadline:
        time.sleep(0.05)
        live = {g for g in live if _alive(g)}
    _signal_all(live, signal.SIGKILL)


if __name__ == "__main__":
    main()
