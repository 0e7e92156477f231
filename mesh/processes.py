"""Child-process plumbing shared by everything that starts processes.

Children get their own session so a Ctrl-C at the terminal reaches only the
parent, which then stops them in order. PR_SET_PDEATHSIG cannot be used: trio
forks children from a worker thread, and the kernel sends that signal when the
*thread* exits (after ~10 s idle), not the parent process. Instead our own
children are told their supervisor's pid (MESH_PARENT_PID) and exit when it
goes away (`mesh.signals.cancel_on_signals` watches it); nats-server children
are stopped by the `finally` of whoever started them.
"""

from __future__ import annotations

import os
import socket
from typing import Any

import trio

PARENT_ENV = "MESH_PARENT_PID"


def child_kwargs(env: dict[str, str] | None = None) -> dict[str, Any]:
    """Keyword arguments for trio.lowlevel.open_process / subprocess.Popen."""
    return {"start_new_session": True, "env": {**(env or os.environ), PARENT_ENV: str(os.getpid())}}


async def terminate(process: trio.Process, grace: float = 5.0) -> int:
    """SIGTERM, then SIGKILL after `grace` seconds. Safe to call on an exited process."""
    with trio.CancelScope(shield=True):
        if process.returncode is None:
            process.terminate()
            with trio.move_on_after(grace):
                await process.wait()
            if process.returncode is None:
                process.kill()
        code = await process.wait()
    return code


async def terminate_all(processes: list[trio.Process], grace: float = 5.0) -> None:
    """SIGTERM every process at once, then SIGKILL whatever is left after `grace` seconds.

    Stopping them together keeps a group's shutdown at one grace period, not one each."""
    with trio.CancelScope(shield=True):
        for p in processes:
            if p.returncode is None:
                p.terminate()
        with trio.move_on_after(grace):
            for p in processes:
                await p.wait()
        for p in processes:
            if p.returncode is None:
                p.kill()
                await p.wait()


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago. Races are possible but rare on loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port
